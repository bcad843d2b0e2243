"""Referring segmentation metrics: cumulative IoU (cIoU) and generalised/mean IoU (gIoU).

u-LLaVA (paper Sec. 4, Tables 4, 5 and 8; original ``evaluation/eval_ullava.py``) and LISA report referring
expression segmentation with these two numbers:

* cIoU = total intersection / total union, summed over every pixel of the data set (large objects weigh more);
* gIoU = the mean of the per-sample IoU. A sample whose prediction and ground truth are both empty counts IoU 1 (the
  LISA/u-LLaVA convention: nothing to segment and nothing predicted is right); an empty prediction against a
  non-empty ground truth counts 0.

Both are exact ratios (LISA adds 1e-10 to the denominators). The one place that shows: a data set whose masks are
all empty has no union at all, and its cIoU is reported as 1.0 here, consistent with gIoU, where LISA's epsilon
gives 0.

Masks may be given as ``(height, width)`` binary arrays (numpy, torch, nested lists) or as COCO RLE dicts. Arrays
are run-length encoded as they are added, so the data evaluate stores (and, in distributed runs, writes to disk) is
a few run lengths per mask instead of one Python object per pixel.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
cIoU (cumulative intersection over cumulative union across the data set) and gIoU (mean per-sample IoU; an empty
prediction with an empty ground truth counts 1) for binary segmentation masks, as reported by LISA and u-LLaVA for
referring segmentation. Masks: (height, width) bool/0-1 arrays or COCO uncompressed RLE dicts.
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
    predictions: per sample a (height, width) binary mask (bool or 0/1; numpy array, torch tensor or nested list),
        or a COCO RLE dict {"size": [height, width], "counts": [...] or "compressed string"}.
    references: the ground-truth masks, same forms; each must have the size of its prediction.
Returns:
    ciou (`float`): sum of intersections / sum of unions over the data set (1.0 if every mask is empty).
    giou (`float`): mean per-sample IoU (empty prediction + empty ground truth = 1).
    num_samples (`int`).
Examples:
    >>> miou = hf_regionmm.evaluation.load_metric("mask_iou")
    >>> miou.compute(predictions=[[[1, 1], [0, 0]]], references=[[[1, 0], [0, 0]]])
    {'ciou': 0.5, 'giou': 0.5, 'num_samples': 1}
"""


# ---- Helpers copied verbatim from hf_regionmm/evaluation/functional.py (tests/test_metrics.py checks that they
# stay identical; edit both together).
# names: mask_to_rle, rle_to_mask, rle_from_string
def mask_to_rle(mask: np.typing.ArrayLike, name: str = "mask") -> dict:
    """Encode a binary mask as COCO uncompressed RLE.

    Args:
        mask: ``(height, width)`` bool or 0/1 integer array (numpy, tensor or nested list).
        name: the argument name used in error messages.

    Returns:
        ``{"size": [height, width], "counts": [run lengths]}``, column-major, first run counts zeros.

    Raises:
        ValueError: not 2-D, or values other than 0/1 (threshold logits or probabilities first).
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D (height, width) binary mask; got shape {array.shape}.")
    if array.dtype != bool:
        if (
            not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating))
            or not np.isin(array, (0, 1)).all()
        ):
            raise ValueError(
                f"`{name}` must be binary (bool or 0/1); got dtype {array.dtype} with other values. Threshold logits "
                "or probabilities first, e.g. `mask > 0`."
            )
    flat = array.astype(bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    boundaries = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(boundaries).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(array.shape[0]), int(array.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict, name: str = "rle") -> np.ndarray:
    """Decode COCO uncompressed RLE (``counts`` a list of ints) to a ``(height, width)`` bool mask.

    Raises:
        ValueError: negative run lengths, or runs that do not add up to ``height * width``.
    """
    height, width = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if (counts < 0).any() or counts.sum() != height * width:
        raise ValueError(
            f"`{name}` is not a valid RLE for size {[height, width]}: counts must be non-negative and sum to "
            f"{height * width}, got sum {int(counts.sum())}. Encode masks with `mask_to_rle`."
        )
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((height, width), order="F")


def rle_from_string(counts: str) -> list[int]:
    """Decode pycocotools' compressed RLE string (``maskApi.c: rleFrString``) to uncompressed run lengths."""
    result: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            char = ord(counts[position]) - 48
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            position += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        # Counts from the fourth on are stored as deltas to the count two places back.
        if len(result) > 2:
            value += result[-2]
        result.append(value)
    return result


# ---- End of copied helpers.


def _as_rle(mask, name: str) -> dict:
    """One mask in any accepted form -> COCO uncompressed RLE dict."""
    if isinstance(mask, dict):
        if "size" not in mask or "counts" not in mask:
            raise ValueError(
                f"`{name}` is a dict but not an RLE: it needs 'size' and 'counts'; got keys {list(mask)}."
            )
        counts = rle_from_string(mask["counts"]) if isinstance(mask["counts"], str) else list(mask["counts"])
        return {"size": [int(v) for v in mask["size"]], "counts": [int(c) for c in counts]}
    return mask_to_rle(mask, name)


class MaskIou(evaluate.Metric):
    """cIoU and gIoU for referring segmentation (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        rle = {
            "size": datasets.Sequence(datasets.Value("int64")),
            "counts": datasets.Sequence(datasets.Value("int64")),
        }
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": rle, "references": rle}),
            codebase_urls=["https://github.com/OPPOMKLab/u-LLaVA", "https://github.com/dvlab-research/LISA"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add a batch of masks (arrays or RLE dicts); arrays are RLE-encoded first. See ``inputs_description``."""
        if predictions is not None:
            predictions = [_as_rle(mask, f"predictions[{i}]") for i, mask in enumerate(predictions)]
        if references is not None:
            references = [_as_rle(mask, f"references[{i}]") for i, mask in enumerate(references)]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Add one mask pair (arrays or RLE dicts)."""
        prediction = _as_rle(prediction, "prediction") if prediction is not None else None
        reference = _as_rle(reference, "reference") if reference is not None else None
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions: list, references: list) -> dict:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass one mask per sample.")
        intersections = np.zeros(len(predictions), dtype=np.int64)
        unions = np.zeros(len(predictions), dtype=np.int64)
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            if list(prediction["size"]) != list(reference["size"]):
                raise ValueError(
                    f"`predictions[{index}]` has size {list(prediction['size'])} but `references[{index}]` has "
                    f"{list(reference['size'])}; resize the predicted mask to the ground-truth image size first."
                )
            predicted = rle_to_mask(prediction, f"predictions[{index}]")
            target = rle_to_mask(reference, f"references[{index}]")
            intersections[index] = np.count_nonzero(predicted & target)
            unions[index] = np.count_nonzero(predicted | target)
        per_sample = np.where(unions > 0, intersections / np.maximum(unions, 1), 1.0)
        total_union = unions.sum()
        return {
            "ciou": float(intersections.sum() / total_union) if total_union > 0 else 1.0,
            "giou": float(per_sample.mean()),
            "num_samples": len(predictions),
        }
