"""COCO-style detection / instance segmentation AP and AR, in pure numpy (pycocotools optional).

TAP-v2 reports COCO and LVIS instance segmentation (mask AP, prompted with detector boxes) and box AP for its
concept head (paper Sec. 4; original ``scripts/eval_seg.py`` / ``eval_cls.py`` run pycocotools' ``COCOeval``); Groma's
proposer is a detector too. This metric re-implements ``COCOeval`` (``evaluateImg`` + ``accumulate`` +
``summarize``) so it runs without pycocotools, and ``backend="pycocotools"`` runs the real ``COCOeval`` on the same
inputs when that package is installed (``pip install pycocotools``), as a cross-check.

What is reproduced, per category and image: detections sorted by score with a stable sort and cut at the largest
``max_detections``; greedy matching of each detection to the highest-IoU unmatched ground truth with IoU >= t (ties
to the later ground truth; crowd ground truth matchable many times, IoU against a crowd region divides by the
detection's area only); ground truth outside the area range or crowd is ignored, and so are detections matched to
it or unmatched and outside the area range. Then, pooled over images: precision interpolated to be non-increasing,
read at the 101 recall points 0:0.01:1, averaged (AP); recall at the last detection (AR). Area ranges are COCO's:
all, small (<= 32^2), medium (32^2..96^2), large (>= 96^2), inclusive bounds, on the ground-truth ``areas`` (default:
box area for ``bbox``, mask area for ``segm``; COCO's own annotations carry the mask area, pass it as ``areas`` to
match published box AP exactly). Categories are those present in the ground truth. Undefined entries (no ground
truth in a range) report -1.0, as COCOeval does.

Two configurations: ``load_metric("detection_ap")`` (``config_name="bbox"``, the default) scores boxes and
``load_metric("detection_ap", config_name="segm")`` scores masks given as binary arrays or COCO RLE.
"""

import contextlib
import io

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
COCO-style average precision and recall for boxes (config "bbox") or instance masks (config "segm"): AP averaged over
IoU thresholds 0.50:0.05:0.95 and 101 recall points, AP50, AP75, AP for small/medium/large objects, AR at 1/10/100
detections per image and AR by object size. Pure numpy re-implementation of pycocotools' COCOeval;
backend="pycocotools" runs the real thing when it is installed.
"""

_CITATION = """\
@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and Ramanan, Deva and Dollar, Piotr and Zitnick, C Lawrence},
  booktitle={ECCV},
  year={2014}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `dict`), one per image:
        "boxes": [[x1, y1, x2, y2], ...] absolute pixels (required for "bbox", ignored for "segm"),
        "scores": [float, ...], "labels": [int, ...],
        "masks" ("segm" only): (n, height, width) binary array / tensor, a list of 2-D masks, or COCO RLE dicts.
    references (`list` of `dict`), one per image:
        "boxes", "labels" as above; optional "iscrowd" ([0/1, ...], default 0), "areas" ([float, ...], default box
        or mask area), and "masks" for "segm".
    iou_thresholds (sequence of `float`, optional): default 0.50:0.05:0.95.
    max_detections (sequence of `int`, default (1, 10, 100)): per-image detection caps; AP uses the largest.
    backend (`str`, default "numpy"): "numpy" or "pycocotools" (needs `pip install pycocotools`).
Returns:
    map, map_50, map_75, map_small, map_medium, map_large, mar_<m> for each m in max_detections, mar_small,
    mar_medium, mar_large (`float` in [0, 1], -1.0 when undefined), num_images (`int`).
Examples:
    >>> ap = hf_regionmm.evaluation.load_metric("detection_ap")
    >>> result = ap.compute(
    ...     predictions=[{"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [1]}],
    ...     references=[{"boxes": [[0, 0, 10, 10]], "labels": [1]}],
    ... )
    >>> round(result["map"], 4)
    1.0
"""

_AREA_RANGES = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))  # all, small, medium, large
_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
_CONFIGS = ("bbox", "segm")


# ---- Helpers copied verbatim from hf_regionmm/evaluation/functional.py (tests/test_metrics.py checks that they
# stay identical; edit both together).
# names: check_boxes, box_iou_matrix, greedy_match, mask_to_rle, rle_to_mask, rle_from_string
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


def greedy_match(ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray, iou_threshold: float) -> np.ndarray:
    """One-to-one matching of score-sorted detections to ground truth, exactly as ``COCOeval.evaluateImg``.

    Each detection, in order, takes the still-unmatched ground truth with the highest IoU ``>= iou_threshold``
    (crowd ground truth can be matched many times). Ground truth must be sorted with the non-ignored boxes first; once
    a detection has a non-ignored candidate it never switches to an ignored one. IoU ties go to the *later* ground
    truth, because COCOeval replaces the running best on ``>=``.

    Args:
        ious: ``(num_detections, num_ground_truth)`` float64, detections sorted by descending score.
        gt_ignore: ``(num_ground_truth,)`` bool, the ignored ground truth last.
        gt_crowd: ``(num_ground_truth,)`` bool.
        iou_threshold: IoU a match needs (inclusive; capped at ``1 - 1e-10`` like COCOeval).

    Returns:
        ``(num_detections,)`` int64: the matched ground-truth index, or -1.
    """
    num_detections, num_ground_truth = ious.shape
    matched_gt = np.full(num_detections, -1, dtype=np.int64)
    gt_taken = np.zeros(num_ground_truth, dtype=bool)
    for detection in range(num_detections):
        best_iou = min(iou_threshold, 1 - 1e-10)
        best = -1
        for gt in range(num_ground_truth):
            if gt_taken[gt] and not gt_crowd[gt]:
                continue
            if best > -1 and not gt_ignore[best] and gt_ignore[gt]:
                break
            if ious[detection, gt] < best_iou:
                continue
            best_iou = ious[detection, gt]
            best = gt
        if best > -1:
            matched_gt[detection] = best
            gt_taken[best] = True
    return matched_gt


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


def _masks_to_rles(masks, name: str) -> list[dict]:
    """An image's masks -- ``(n, height, width)`` array/tensor, list of 2-D masks or RLE dicts -- as RLE dicts."""
    if masks is None:
        return []
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        masks = list(masks)
    rles = []
    for index, mask in enumerate(masks):
        if isinstance(mask, dict):
            counts = rle_from_string(mask["counts"]) if isinstance(mask["counts"], str) else list(mask["counts"])
            rles.append({"size": [int(v) for v in mask["size"]], "counts": [int(c) for c in counts]})
        else:
            rles.append(mask_to_rle(mask, f"{name}[{index}]"))
    return rles


def _parse_image(index: int, prediction: dict, reference: dict, use_masks: bool) -> dict:
    """Validate one image's detections and ground truth into numpy arrays (see ``evaluate_images`` for the keys)."""

    def vector(values, dtype, name: str, length: int) -> np.ndarray:
        array = np.asarray(values if values is not None else [], dtype=dtype).reshape(-1)
        if len(array) != length:
            raise ValueError(f"`{name}` must have one entry per object ({length}); got {len(array)}.")
        return array

    image = {}
    for prefix, source, required in (("detection", prediction, ("scores", "labels")), ("gt", reference, ("labels",))):
        name = f"{'predictions' if prefix == 'detection' else 'references'}[{index}]"
        if not isinstance(source, dict):
            raise TypeError(f"`{name}` must be a dict with {required + ('boxes',)}; got {type(source).__name__}.")
        if use_masks:
            rles = source.get("masks") or []
            count = len(rles)
            masks = [rle_to_mask(rle, f"{name}['masks'][{i}]") for i, rle in enumerate(rles)]
            shapes = {mask.shape for mask in masks}
            if len(shapes) > 1:
                raise ValueError(
                    f"`{name}['masks']` mix sizes {sorted(shapes)}; all masks of an image share its size."
                )
            image[f"{prefix}_masks"] = (
                np.stack([mask.ravel() for mask in masks]) if masks else np.zeros((0, 0), dtype=bool)
            )
            image[f"{prefix}_mask_size"] = shapes.pop() if shapes else None
            own_areas = np.array([mask.sum() for mask in masks], dtype=np.float64)
        else:
            boxes = check_boxes(source.get("boxes"), f"{name}['boxes']")
            count = len(boxes)
            image[f"{prefix}_boxes"] = boxes
            own_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        image[f"{prefix}_labels"] = vector(source.get("labels"), np.int64, f"{name}['labels']", count)
        if prefix == "detection":
            image["detection_scores"] = vector(source.get("scores"), np.float64, f"{name}['scores']", count)
            if not np.isfinite(image["detection_scores"]).all():
                raise ValueError(f"`{name}['scores']` contains NaN or inf.")
            image["detection_areas"] = own_areas
        else:
            given = source.get("areas")
            image["gt_areas"] = own_areas if given is None else vector(given, np.float64, f"{name}['areas']", count)
            crowd = source.get("iscrowd")
            image["gt_crowd"] = (
                np.zeros(count, bool) if crowd is None else vector(crowd, bool, f"{name}['iscrowd']", count)
            )
    if use_masks and None not in (image["detection_mask_size"], image["gt_mask_size"]):
        if image["detection_mask_size"] != image["gt_mask_size"]:
            raise ValueError(
                f"`predictions[{index}]['masks']` are {image['detection_mask_size']} but `references[{index}]['masks']` "
                f"are {image['gt_mask_size']}; resize the predicted masks to the image size first."
            )
    return image


def _mask_iou_matrix(detection_masks: np.ndarray, gt_masks: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """``(d, g)`` IoU of flattened bool masks ``(d, hw)`` / ``(g, hw)``; crowd unions are the detection area."""
    ious = np.zeros((len(detection_masks), len(gt_masks)), dtype=np.float64)
    if len(detection_masks) == 0 or len(gt_masks) == 0:
        return ious
    detection_areas = detection_masks.sum(axis=1).astype(np.float64)
    for column, gt_mask in enumerate(gt_masks):
        intersection = np.count_nonzero(detection_masks & gt_mask[None, :], axis=1).astype(np.float64)
        union = detection_areas if crowd[column] else detection_areas + gt_mask.sum() - intersection
        ious[:, column] = np.where(union > 0, intersection / np.maximum(union, 1e-12), 0.0)
    return ious


def evaluate_images(
    images: list[dict], iou_thresholds: np.ndarray, max_detections: list[int], use_masks: bool
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval ``evaluate()`` + ``accumulate()`` in numpy.

    Args:
        images: per image, from ``_parse_image``: ``detection_boxes`` ``(d, 4)`` xyxy (or ``detection_masks``
            ``(d, hw)`` bool), ``detection_scores`` ``(d,)``, ``detection_labels`` ``(d,)``, ``detection_areas``;
            ``gt_boxes``/``gt_masks``, ``gt_labels``, ``gt_areas``, ``gt_crowd`` ``(g,)``.
        iou_thresholds: ``(t,)`` float64.
        max_detections: ascending per-image caps ``(m,)``.
        use_masks: score masks instead of boxes.

    Returns:
        precision ``(t, 101, k, 4, m)`` and recall ``(t, k, 4, m)``, -1 where undefined; ``k`` runs over the sorted
        ground-truth categories, the 4 area ranges are all/small/medium/large.
    """
    categories = sorted({int(label) for image in images for label in image["gt_labels"]})
    num_thresholds, num_areas, num_caps = len(iou_thresholds), len(_AREA_RANGES), len(max_detections)
    precision = -np.ones((num_thresholds, len(_RECALL_THRESHOLDS), len(categories), num_areas, num_caps))
    recall = -np.ones((num_thresholds, len(categories), num_areas, num_caps))
    for category_index, category in enumerate(categories):
        per_area: list[list[tuple]] = [[] for _ in _AREA_RANGES]
        for image in images:
            detections = np.flatnonzero(image["detection_labels"] == category)
            gts = np.flatnonzero(image["gt_labels"] == category)
            if len(detections) == 0 and len(gts) == 0:
                continue
            order = np.argsort(-image["detection_scores"][detections], kind="mergesort")
            detections = detections[order][: max_detections[-1]]
            crowd = image["gt_crowd"][gts]
            if use_masks:
                ious = _mask_iou_matrix(image["detection_masks"][detections], image["gt_masks"][gts], crowd)
            else:
                ious = box_iou_matrix(image["detection_boxes"][detections], image["gt_boxes"][gts], crowd)
            scores = image["detection_scores"][detections]
            detection_areas = image["detection_areas"][detections]
            for area_index, (low, high) in enumerate(_AREA_RANGES):
                gt_areas = image["gt_areas"][gts]
                ignore = crowd | (gt_areas < low) | (gt_areas > high)
                gt_order = np.argsort(ignore, kind="mergesort")
                sorted_ignore = ignore[gt_order]
                matched = np.zeros((num_thresholds, len(detections)), dtype=bool)
                ignored = np.zeros((num_thresholds, len(detections)), dtype=bool)
                for threshold_index, threshold in enumerate(iou_thresholds):
                    match = greedy_match(ious[:, gt_order], sorted_ignore, crowd[gt_order], float(threshold))
                    matched[threshold_index] = match >= 0
                    # A detection matched to ignored ground truth is neither a true nor a false positive.
                    ignored[threshold_index, match >= 0] = sorted_ignore[match[match >= 0]]
                outside = (detection_areas < low) | (detection_areas > high)
                ignored |= ~matched & outside[None, :]
                per_area[area_index].append((scores, matched, ignored, int((~ignore).sum())))
        for area_index, entries in enumerate(per_area):
            num_gt = sum(entry[3] for entry in entries)
            if not entries or num_gt == 0:
                continue
            for cap_index, cap in enumerate(max_detections):
                scores = np.concatenate([entry[0][:cap] for entry in entries])
                order = np.argsort(-scores, kind="mergesort")
                matched = np.concatenate([entry[1][:, :cap] for entry in entries], axis=1)[:, order]
                ignored = np.concatenate([entry[2][:, :cap] for entry in entries], axis=1)[:, order]
                true_positives = np.cumsum(matched & ~ignored, axis=1).astype(np.float64)
                false_positives = np.cumsum(~matched & ~ignored, axis=1).astype(np.float64)
                for threshold_index in range(num_thresholds):
                    tp, fp = true_positives[threshold_index], false_positives[threshold_index]
                    recalls = tp / num_gt
                    precisions = tp / (fp + tp + np.spacing(1))
                    recall[threshold_index, category_index, area_index, cap_index] = recalls[-1] if len(tp) else 0
                    # COCO's interpolation: precision made non-increasing from the right.
                    precisions = np.maximum.accumulate(precisions[::-1])[::-1]
                    positions = np.searchsorted(recalls, _RECALL_THRESHOLDS, side="left")
                    sampled = np.zeros(len(_RECALL_THRESHOLDS))
                    inside = positions < len(tp)
                    sampled[inside] = precisions[positions[inside]]
                    precision[threshold_index, :, category_index, area_index, cap_index] = sampled
    return precision, recall


def evaluate_with_pycocotools(
    images: list[dict], raw_predictions: list, iou_thresholds: np.ndarray, max_detections: list[int], use_masks: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The same precision/recall arrays from pycocotools' ``COCOeval`` (imported lazily)."""
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError(
            "`backend='pycocotools'` needs pycocotools: `pip install pycocotools` (or use the default "
            "backend='numpy', which needs nothing)."
        ) from error

    def xywh(box: np.ndarray) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    def compressed(rle: dict) -> dict:
        height, width = rle["size"]
        return mask_utils.frPyObjects({"size": [height, width], "counts": list(rle["counts"])}, height, width)

    annotations, results, image_entries = [], [], []
    for image_id, (image, prediction) in enumerate(zip(images, raw_predictions)):
        # COCO.annToRLE reads the image size even for RLE segmentations.
        sizes = [rle["size"] for rle in (image.get("gt_rles") or []) + (prediction.get("masks") or [])]
        height, width = sizes[0] if sizes else (0, 0)
        image_entries.append({"id": image_id, "height": int(height), "width": int(width)})
        for gt in range(len(image["gt_labels"])):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(image["gt_labels"][gt]),
                "area": float(image["gt_areas"][gt]),
                "iscrowd": int(image["gt_crowd"][gt]),
            }
            if use_masks:
                annotation["segmentation"] = compressed(image["gt_rles"][gt])
            else:
                annotation["bbox"] = xywh(image["gt_boxes"][gt])
            annotations.append(annotation)
        for detection in range(len(image["detection_labels"])):
            result = {
                "image_id": image_id,
                "category_id": int(image["detection_labels"][detection]),
                "score": float(image["detection_scores"][detection]),
            }
            if use_masks:
                result["segmentation"] = compressed(prediction["masks"][detection])
            else:
                result["bbox"] = xywh(image["detection_boxes"][detection])
            results.append(result)
    categories = sorted({int(label) for image in images for label in image["gt_labels"]})
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": image_entries,
            "annotations": annotations,
            "categories": [{"id": category} for category in categories],
        }
        ground_truth.createIndex()
        if results:
            detections = ground_truth.loadRes(results)
        else:
            # loadRes indexes results[0]; an empty result set is built directly.
            detections = COCO()
            detections.dataset = {"images": ground_truth.dataset["images"], "annotations": [], "categories": []}
            detections.createIndex()
        evaluator = COCOeval(ground_truth, detections, "segm" if use_masks else "bbox")
        evaluator.params.imgIds = list(range(len(images)))
        evaluator.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        evaluator.params.maxDets = list(max_detections)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"], evaluator.eval["recall"]


def summarize(
    precision: np.ndarray, recall: np.ndarray, iou_thresholds: np.ndarray, max_detections: list[int]
) -> dict[str, float]:
    """COCOeval ``summarize()`` as a dict (AP/AR over the valid, non -1 entries; -1.0 when none)."""

    def mean_valid(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else -1.0

    def threshold_slice(value: float) -> np.ndarray | None:
        hits = np.flatnonzero(np.isclose(iou_thresholds, value))
        return hits[:1] if len(hits) else None

    last = len(max_detections) - 1
    results = {"map": mean_valid(precision[:, :, :, 0, last])}
    for value, key in ((0.5, "map_50"), (0.75, "map_75")):
        selection = threshold_slice(value)
        results[key] = mean_valid(precision[selection][:, :, :, 0, last]) if selection is not None else -1.0
    for area_index, area in enumerate(("small", "medium", "large"), start=1):
        results[f"map_{area}"] = mean_valid(precision[:, :, :, area_index, last])
    for cap_index, cap in enumerate(max_detections):
        results[f"mar_{cap}"] = mean_valid(recall[:, :, 0, cap_index])
    for area_index, area in enumerate(("small", "medium", "large"), start=1):
        results[f"mar_{area}"] = mean_valid(recall[:, :, area_index, last])
    return results


class DetectionAp(evaluate.Metric):
    """COCO box / mask AP and AR (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        iou_type = self._iou_type()
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        rle = {
            "size": datasets.Sequence(datasets.Value("int64")),
            "counts": datasets.Sequence(datasets.Value("int64")),
        }
        prediction = {
            "boxes": boxes,
            "scores": datasets.Sequence(datasets.Value("float64")),
            "labels": datasets.Sequence(datasets.Value("int64")),
        }
        reference = {
            "boxes": boxes,
            "labels": datasets.Sequence(datasets.Value("int64")),
            "iscrowd": datasets.Sequence(datasets.Value("int64")),
            "areas": datasets.Sequence(datasets.Value("float64")),
        }
        if iou_type == "segm":
            prediction["masks"] = [rle]
            reference["masks"] = [rle]
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": prediction, "references": reference}),
            codebase_urls=["https://github.com/cocodataset/cocoapi"],
        )

    def _iou_type(self) -> str:
        iou_type = "bbox" if self.config_name in (None, "default") else self.config_name
        if iou_type not in _CONFIGS:
            raise ValueError(f"`config_name` must be one of {_CONFIGS} (default 'bbox'); got {self.config_name!r}.")
        return iou_type

    def _prepare(self, items: list | None, name: str) -> list | None:
        """Fill the optional keys evaluate's schema check insists on, and RLE-encode ``segm`` mask arrays."""
        if items is None:
            return None
        segm = self._iou_type() == "segm"
        prepared = []
        for index, item in enumerate(items):
            if isinstance(item, dict):
                optional = ("boxes",) if name == "predictions" else ("boxes", "iscrowd", "areas")
                item = {**{key: None for key in optional}, **item}
                if segm:
                    item["masks"] = _masks_to_rles(item.get("masks"), f"{name}[{index}]['masks']")
            prepared.append(item)
        return prepared

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add a batch of images; for ``segm``, mask arrays are RLE-encoded first. See ``inputs_description``."""
        predictions = self._prepare(predictions, "predictions")
        references = self._prepare(references, "references")
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Add one image's detections and ground truth."""
        prediction = self._prepare([prediction], "predictions")[0] if prediction is not None else None
        reference = self._prepare([reference], "references")[0] if reference is not None else None
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(
        self,
        predictions: list,
        references: list,
        iou_thresholds=None,
        max_detections=(1, 10, 100),
        backend: str = "numpy",
    ) -> dict:
        use_masks = self._iou_type() == "segm"
        thresholds = np.linspace(0.5, 0.95, 10) if iou_thresholds is None else np.asarray(iou_thresholds, float)
        if thresholds.ndim != 1 or len(thresholds) == 0 or ((thresholds < 0) | (thresholds > 1)).any():
            raise ValueError(
                f"`iou_thresholds` must be a non-empty sequence of values in [0, 1]; got {iou_thresholds}."
            )
        caps = sorted(int(cap) for cap in max_detections)
        if not caps or caps[0] < 1:
            raise ValueError(f"`max_detections` must be positive ints, e.g. (1, 10, 100); got {max_detections!r}.")
        if backend not in ("numpy", "pycocotools"):
            raise ValueError(f"`backend` must be 'numpy' or 'pycocotools'; got {backend!r}.")
        if len(predictions) == 0:
            raise ValueError(
                "`predictions` is empty: pass one dict per image (with empty lists if nothing was found)."
            )
        images = [_parse_image(i, p, r, use_masks) for i, (p, r) in enumerate(zip(predictions, references))]
        if backend == "numpy":
            precision, recall = evaluate_images(images, thresholds, caps, use_masks)
        else:
            if use_masks:
                for image, reference in zip(images, references):
                    image["gt_rles"] = reference.get("masks") or []
            precision, recall = evaluate_with_pycocotools(images, predictions, thresholds, caps, use_masks)
        results = summarize(precision, recall, thresholds, caps)
        results["num_images"] = len(images)
        return results
