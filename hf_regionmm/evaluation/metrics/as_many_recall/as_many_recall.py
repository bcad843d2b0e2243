"""Average recall under Groma's AS-MANY protocol (the LVIS-Ground benchmark).

Groma (paper Sec. 4.2, Table 3, and Appendix B) turns LVIS detection into grounding queries, one per (image,
category): "Locate all {category} in this image". A model answers with any number of boxes, and scores mean nothing
(the original evaluation gives every box score 1.0 and runs lvis-api). The AS-MANY protocol keeps the first ``k``
predicted boxes, ``k`` being the number of ground-truth boxes of the query, and measures recall over all ground-truth
boxes; recall is averaged over the IoU thresholds 0.50:0.05:0.95 (AR), and reported at 0.5 and 0.75 and for small /
medium / large objects (ground-truth area ``<= 32**2``, in ``[32**2, 96**2]``, ``>= 96**2``, bounds inclusive as in
LVIS/COCO).

Matching, per query and threshold, is the greedy one of LVIS/COCO evaluation: predictions in the order the model gave
them (all scores are equal and lvis-api sorts with a stable sort, so the order is the tie rule) each take the still
unmatched ground-truth box of highest IoU at or above the threshold; IoU ties go to the later ground-truth box, as in
COCOeval. Not Hungarian: it reproduces the published numbers' protocol, and differs from an optimal assignment only
when an early prediction takes a box a later one needed more.

Averaging follows lvis-api: recall is pooled per category (matched / ground truth over all queries of the category)
and then averaged over categories that have ground truth in the area range. Without category ids every query is its
own category, i.e. plain mean recall over queries. A range with no ground truth at all reports -1.0 (COCO/LVIS
convention for "undefined"). ``max_detections=N`` replaces the AS-MANY ``k`` by a fixed cap (LVIS-style AR@N).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
AS-MANY average recall (Groma's LVIS-Ground protocol): per query keep the first k predicted boxes (k = number of
ground-truth boxes), greedily match them one-to-one to the ground truth at each IoU threshold 0.50:0.05:0.95, pool
recall per category, average over categories and thresholds. Reports AR, AR@0.5, AR@0.75 and AR for small, medium and
large ground-truth boxes (COCO area bounds 32^2 and 96^2). Boxes are absolute pixel xyxy.
"""

_CITATION = """\
@article{ma2024groma,
  title={Groma: Localized Visual Tokenization for Grounding Multimodal Large Language Models},
  author={Ma, Chuofan and Jiang, Yi and Wu, Jiannan and Yuan, Zehuan and Qi, Xiaojuan},
  journal={arXiv preprint arXiv:2404.13013},
  year={2024}
}
@inproceedings{gupta2019lvis,
  title={LVIS: A Dataset for Large Vocabulary Instance Segmentation},
  author={Gupta, Agrim and Dollar, Piotr and Girshick, Ross},
  booktitle={CVPR},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list[list[float]]`): per query, the predicted boxes [x1, y1, x2, y2] in the order the
        model produced them (absolute pixels); `[]` when it produced none.
    references: per query either the ground-truth boxes (`list[list[float]]`), or a dict
        {"boxes": [[x1, y1, x2, y2], ...], "category_id": int, "areas": [float, ...] (optional)} to pool recall per
        category as lvis-api does and/or to give the object areas (e.g. LVIS mask areas) used for small/medium/large;
        without "areas" the box area is used.
    max_detections (`int`, optional): a fixed number of predictions kept per query instead of the AS-MANY k.
    iou_thresholds (sequence of `float`, optional): default 0.50:0.05:0.95.
Returns:
    ar, ar_50, ar_75, ar_small, ar_medium, ar_large (`float` in [0, 1], or -1.0 when there is no ground truth in the
    range), num_queries (`int`), num_ground_truth (`int`).
Examples:
    >>> recall = hf_regionmm.evaluation.load_metric("as_many_recall")
    >>> recall.compute(predictions=[[[0, 0, 10, 10]]], references=[[[0, 0, 10, 10], [20, 20, 30, 30]]])["ar"]
    0.5
"""

_AREA_RANGES = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}


# ---- Helpers copied verbatim from hf_regionmm/evaluation/functional.py (tests/test_metrics.py checks that they
# stay identical; edit both together).
# names: check_boxes, box_iou_matrix, greedy_match
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


# ---- End of copied helpers.


def _parse_query(index: int, prediction, reference) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """Boxes of one query: predicted ``(p, 4)``, ground-truth ``(g, 4)``, ground-truth areas ``(g,)``, category."""
    predicted = check_boxes(prediction, f"predictions[{index}]")
    if isinstance(reference, dict):
        ground_truth = check_boxes(reference.get("boxes"), f"references[{index}]['boxes']")
        category = reference.get("category_id")
        if category is None:
            raise ValueError(f"`references[{index}]` is a dict without 'category_id'; add it or pass plain boxes.")
        areas = reference.get("areas")
    else:
        ground_truth = check_boxes(reference, f"references[{index}]")
        category, areas = ("query", index), None
    if areas is None:
        areas = (ground_truth[:, 2] - ground_truth[:, 0]) * (ground_truth[:, 3] - ground_truth[:, 1])
    areas = np.asarray(areas, dtype=np.float64)
    if areas.shape != (len(ground_truth),):
        raise ValueError(
            f"`references[{index}]['areas']` must have one area per ground-truth box ({len(ground_truth)}); "
            f"got shape {areas.shape}."
        )
    return predicted, ground_truth, areas, category


def as_many_matches(
    predicted: np.ndarray,
    ground_truth: np.ndarray,
    areas: np.ndarray,
    iou_thresholds: np.ndarray,
    max_detections: int | None = None,
) -> dict[str, np.ndarray]:
    """Matched and counted ground truth of one query, per IoU threshold and area range.

    Args:
        predicted: ``(p, 4)`` float64 xyxy predictions in model order.
        ground_truth: ``(g, 4)`` float64 xyxy ground truth.
        areas: ``(g,)`` float64 ground-truth areas (pixels^2) deciding the area range.
        iou_thresholds: ``(t,)`` float64.
        max_detections: fixed number of kept predictions; ``None`` keeps ``g`` (AS-MANY).

    Returns:
        For each area range name, a ``(t + 1,)`` int64 array: matched non-ignored ground truth at each threshold,
        followed by the number of non-ignored ground-truth boxes.
    """
    keep = len(ground_truth) if max_detections is None else max_detections
    kept = predicted[:keep]
    ious = box_iou_matrix(kept, ground_truth)
    crowd = np.zeros(len(ground_truth), dtype=bool)
    results = {}
    for name, (low, high) in _AREA_RANGES.items():
        ignore = (areas < low) | (areas > high)
        order = np.argsort(ignore, kind="mergesort")
        counts = np.zeros(len(iou_thresholds) + 1, dtype=np.int64)
        for threshold_index, threshold in enumerate(iou_thresholds):
            matched = greedy_match(ious[:, order], ignore[order], crowd, float(threshold))
            matched = matched[matched >= 0]
            counts[threshold_index] = int((~ignore[order][matched]).sum())
        counts[-1] = int((~ignore).sum())
        results[name] = counts
    return results


class AsManyRecall(evaluate.Metric):
    """Groma's AS-MANY average recall for multi-box grounding (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": boxes, "references": boxes}),
                datasets.Features(
                    {
                        "predictions": boxes,
                        "references": {
                            "boxes": boxes,
                            "category_id": datasets.Value("int64"),
                            "areas": datasets.Sequence(datasets.Value("float64")),
                        },
                    }
                ),
            ],
            codebase_urls=["https://github.com/FoundationVision/Groma", "https://github.com/lvis-dataset/lvis-api"],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Add a batch of queries (see ``inputs_description``); dict references may leave out "areas"."""
        if references is not None:
            references = [{"areas": None, **ref} if isinstance(ref, dict) else ref for ref in references]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Add one query."""
        if isinstance(reference, dict):
            reference = {"areas": None, **reference}
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(
        self, predictions: list, references: list, max_detections: int | None = None, iou_thresholds=None
    ) -> dict:
        if max_detections is not None and (not isinstance(max_detections, int) or max_detections < 1):
            raise ValueError(f"`max_detections` must be a positive int or None (AS-MANY); got {max_detections!r}.")
        thresholds = np.linspace(0.5, 0.95, 10) if iou_thresholds is None else np.asarray(iou_thresholds, float)
        if thresholds.ndim != 1 or len(thresholds) == 0 or ((thresholds < 0) | (thresholds > 1)).any():
            raise ValueError(
                f"`iou_thresholds` must be a non-empty sequence of values in [0, 1]; got {iou_thresholds}."
            )
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: pass the predicted boxes (possibly []) of each query.")
        pooled: dict[object, dict[str, np.ndarray]] = {}
        num_ground_truth = 0
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            predicted, ground_truth, areas, category = _parse_query(index, prediction, reference)
            num_ground_truth += len(ground_truth)
            counts = as_many_matches(predicted, ground_truth, areas, thresholds, max_detections)
            totals = pooled.setdefault(category, {name: np.zeros(len(thresholds) + 1, np.int64) for name in counts})
            for name, value in counts.items():
                totals[name] += value

        def average_recall(area: str, threshold_index: int | None = None) -> float:
            per_category = []
            for totals in pooled.values():
                matched, total = totals[area][:-1], totals[area][-1]
                if total == 0:
                    continue
                recall = matched / total
                per_category.append(recall.mean() if threshold_index is None else recall[threshold_index])
            return float(np.mean(per_category)) if per_category else -1.0

        def threshold_index(value: float) -> int | None:
            hits = np.flatnonzero(np.isclose(thresholds, value))
            return int(hits[0]) if len(hits) else None

        results = {"ar": average_recall("all")}
        for value, key in ((0.5, "ar_50"), (0.75, "ar_75")):
            index = threshold_index(value)
            results[key] = average_recall("all", index) if index is not None else -1.0
        for area in ("small", "medium", "large"):
            results[f"ar_{area}"] = average_recall(area)
        results["num_queries"] = len(predictions)
        results["num_ground_truth"] = num_ground_truth
        return results
