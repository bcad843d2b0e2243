"""Referring expression comprehension (REC) accuracy@IoU, mean IoU and no-box rate.

The metric of Groma's REC benchmarks (paper Sec. 4.2, Table 2; original ``groma/eval/eval_rec.py``): one predicted
box per referring expression against one ground-truth box. A prediction counts when its IoU with the reference is
above the threshold. Groma compares with a strict ``>`` 0.5, so that is the default here; ``inclusive=True`` gives
the ``>=`` rule of other REC code bases. A missing prediction (the model produced no box) counts as wrong with IoU 0,
and its share is reported as ``no_box_rate`` (Groma's "missing percentage").
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
REC accuracy@IoU: the fraction of referring expressions whose single predicted box has IoU with the ground-truth box
above `iou_threshold` (strictly above by default, as Groma's eval_rec.py; `inclusive=True` for >=). Also the mean
IoU over all samples and the fraction of samples without a predicted box (those count as IoU 0, wrong). Boxes are
absolute pixel xyxy; IoU uses continuous coordinates (no +1).
"""

_CITATION = """\
@article{ma2024groma,
  title={Groma: Localized Visual Tokenization for Grounding Multimodal Large Language Models},
  author={Ma, Chuofan and Jiang, Yi and Wu, Jiannan and Yuan, Zehuan and Qi, Xiaojuan},
  journal={arXiv preprint arXiv:2404.13013},
  year={2024}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list[float]` or `None`): one predicted box [x1, y1, x2, y2] per sample, absolute pixels;
        `None` or `[]` when the model produced no box.
    references (`list` of `list[float]`): the ground-truth box [x1, y1, x2, y2] per sample, absolute pixels.
    iou_threshold (`float`, default 0.5): IoU a prediction needs to count as correct.
    inclusive (`bool`, default False): count IoU == iou_threshold as correct (>=) instead of Groma's strict >.
Returns:
    accuracy (`float`): fraction of samples with a correct box, in [0, 1].
    miou (`float`): mean IoU over all samples (missing boxes count 0).
    no_box_rate (`float`): fraction of samples without a predicted box.
    num_samples (`int`).
Examples:
    >>> rec = hf_regionmm.evaluation.load_metric("rec_accuracy")
    >>> rec.compute(predictions=[[0, 0, 10, 10], None], references=[[0, 0, 10, 10], [0, 0, 4, 4]])
    {'accuracy': 0.5, 'miou': 0.5, 'no_box_rate': 0.5, 'num_samples': 2}
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


def _single_box_ious(predictions: list, references: list) -> tuple[np.ndarray, np.ndarray]:
    """IoU of each sample's predicted box with its reference; ``(n,)`` float64 IoU and ``(n,)`` bool "no box"."""
    if len(predictions) == 0:
        raise ValueError("`predictions` is empty: pass one box (or None) per referring expression.")
    ious = np.zeros(len(predictions), dtype=np.float64)
    missing = np.zeros(len(predictions), dtype=bool)
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        reference_box = check_boxes([reference] if reference else [], f"references[{index}]")
        if len(reference_box) != 1:
            raise ValueError(f"`references[{index}]` must be one [x1, y1, x2, y2] box; got {reference!r}.")
        if prediction is None or len(prediction) == 0:
            missing[index] = True
            continue
        prediction_box = check_boxes([prediction], f"predictions[{index}]")
        ious[index] = box_iou_matrix(prediction_box, reference_box)[0, 0]
    return ious, missing


class RecAccuracy(evaluate.Metric):
    """Groma-style REC accuracy@IoU + mIoU + no-box rate (see the module docstring)."""

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
            codebase_urls=["https://github.com/FoundationVision/Groma"],
        )

    def _compute(
        self, predictions: list, references: list, iou_threshold: float = 0.5, inclusive: bool = False
    ) -> dict:
        if not 0.0 <= iou_threshold <= 1.0:
            raise ValueError(f"`iou_threshold` must be in [0, 1]; got {iou_threshold}.")
        ious, missing = _single_box_ious(predictions, references)
        correct = (ious >= iou_threshold) if inclusive else (ious > iou_threshold)
        correct &= ~missing
        return {
            "accuracy": float(correct.mean()),
            "miou": float(ious.mean()),
            "no_box_rate": float(missing.mean()),
            "num_samples": len(ious),
        }
