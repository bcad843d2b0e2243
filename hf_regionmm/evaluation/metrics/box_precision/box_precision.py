"""Box precision Prec@X: the fraction of predicted boxes whose IoU with their reference reaches X.

u-LLaVA reports REC as Prec@0.5 (paper Sec. 4, Table 6, following its ref. [7]): each expression gets one box, decoded
from the ``[LOC]`` state, and counts when its IoU with the ground-truth box is at least 0.5. Several thresholds can be
asked at once (``iou_thresholds=(0.5, 0.7, 0.9)``). A missing box counts as a miss.

The comparison is inclusive (``>=``) by default, as the usual Prec@X definition; the released u-LLaVA script compares
with ``>`` (``inclusive=False`` reproduces it). The two differ only for an IoU exactly at the threshold.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Prec@X for boxes: the fraction of samples whose predicted box has IoU >= X with the ground-truth box (inclusive by
default; `inclusive=False` for the strict > of u-LLaVA's released script). A missing prediction counts as a miss.
Boxes are absolute pixel xyxy; IoU uses continuous coordinates.
"""

_CITATION = """\
@article{xu2023ullava,
  title={u-LLaVA: Unifying Multi-Modal Tasks via Large Language Model},
  author={Xu, Jinjin and Xu, Liwu and Yang, Yuzhe and Li, Xiang and Wang, Fanyi and Xie, Yanchun and Huang, Yi-Jie and Li, Yaqian},
  journal={arXiv preprint arXiv:2311.05348},
  year={2023}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list[float]` or `None`): one predicted box [x1, y1, x2, y2] per sample (absolute
        pixels), `None` or `[]` when there is none.
    references (`list` of `list[float]`): the ground-truth box [x1, y1, x2, y2] per sample.
    iou_thresholds (`float` or sequence of `float`, default (0.5,)): the X values of Prec@X.
    inclusive (`bool`, default True): IoU == X counts as a hit.
Returns:
    "precision@X" (`float`) for each threshold X (formatted with `:g`, e.g. "precision@0.5"), in [0, 1], and
    num_samples (`int`).
Examples:
    >>> prec = hf_regionmm.evaluation.load_metric("box_precision")
    >>> prec.compute(predictions=[[0, 0, 10, 5]], references=[[0, 0, 10, 10]])
    {'precision@0.5': 1.0, 'num_samples': 1}
"""


# ---- Helpers copied verbatim from hf_regionmm/evaluation/functional.py (tests/test_metrics.py checks that they
# stay identical; edit both together).
# names: check_boxes, box_iou_matrix
def check_boxes(boxes: np.typing.ArrayLike | None, name: str) -> np.ndarray:
    """Validate and convert boxes to a float64 array.

    Args:
        boxes: ``(n, 4)`` absolute pixel xyxy boxes (list, numpy array or tensor); ``n`` may be 0.
        name: the argument name used in error messages (e.g. ``"references[3]"``).

    Returns:
        ``(n, 4)`` float64 numpy array, xyxy.

    Raises:
        ValueError: wrong shape, non-finite values, or ``x2 < x1`` / ``y2 < y1``.
    """
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu().numpy()
    array = np.asarray(boxes if boxes is not None else [], dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(
            f"`{name}` must be a list of absolute pixel xyxy boxes with shape (n, 4); got shape {array.shape}. "
            "Pass [[x1, y1, x2, y2], ...]."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or inf coordinates; got {array.tolist()}. Pass finite pixel boxes.")
    inverted = np.nonzero((array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))[0]
    if len(inverted):
        index = int(inverted[0])
        raise ValueError(
            f"`{name}` must have x2 >= x1 and y2 >= y1; got box {index} = {array[index].tolist()}. "
            "Pass absolute pixel xyxy boxes (convert xywh or cxcywh first)."
        )
    return array


def box_iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """Pairwise IoU between two sets of xyxy boxes, as pycocotools' ``bbIou``.

    Args:
        boxes_a: ``(n, 4)`` float64 xyxy boxes (the detections when ``crowd`` is given).
        boxes_b: ``(m, 4)`` float64 xyxy boxes (the ground truth when ``crowd`` is given).
        crowd: optional ``(m,)`` bool; for a crowd box the union is the area of ``boxes_a[i]`` alone (COCO rule: a
            detection inside a crowd region is not penalised for the rest of the region).

    Returns:
        ``(n, m)`` float64 IoU; 0 where the union is empty (two degenerate boxes).
    """
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return np.zeros((len(boxes_a), len(boxes_b)), dtype=np.float64)
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    width = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2]) - np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    height = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3]) - np.maximum(
        boxes_a[:, None, 1], boxes_b[None, :, 1]
    )
    intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
    union = area_a[:, None] + area_b[None, :] - intersection
    if crowd is not None:
        union = np.where(np.asarray(crowd, dtype=bool)[None, :], area_a[:, None], union)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


# ---- End of copied helpers.


class BoxPrecision(evaluate.Metric):
    """Prec@X for single-box predictions (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
            codebase_urls=["https://github.com/OPPOMKLab/u-LLaVA"],
        )

    def _compute(self, predictions: list, references: list, iou_thresholds=(0.5,), inclusive: bool = True) -> dict:
        thresholds = [float(iou_thresholds)] if np.isscalar(iou_thresholds) else [float(t) for t in iou_thresholds]
        if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(f"`iou_thresholds` must be one or more values in [0, 1]; got {iou_thresholds!r}.")
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass one box (or None) per sample.")
        ious = np.zeros(len(predictions), dtype=np.float64)
        has_box = np.zeros(len(predictions), dtype=bool)
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            reference_box = check_boxes([reference] if reference else [], f"references[{index}]")
            if len(reference_box) != 1:
                raise ValueError(f"`references[{index}]` must be one [x1, y1, x2, y2] box; got {reference!r}.")
            if prediction is not None and len(prediction) > 0:
                has_box[index] = True
                ious[index] = box_iou_matrix(check_boxes([prediction], f"predictions[{index}]"), reference_box)[0, 0]
        results = {}
        for threshold in thresholds:
            hits = (ious >= threshold) if inclusive else (ious > threshold)
            results[f"precision@{threshold:g}"] = float((hits & has_box).mean())
        results["num_samples"] = len(ious)
        return results
