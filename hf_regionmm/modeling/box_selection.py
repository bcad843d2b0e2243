"""Score filter + non-maximum suppression + top-k: how region proposals become region tokens.

Groma (section 3.1, "Region Proposer") turns the scored boxes of its class-agnostic proposer into region tokens. The
released code calls mmcv ``nms(iou_threshold=0.6, score_threshold=0.15, max_num=100)`` on xyxy boxes and, when nothing
survives, keeps the single best box so the language model always sees at least one region. This module reproduces
that selection with ``torchvision.ops.nms``, which needs no compiled mmcv.
"""

from __future__ import annotations

import numbers

import torch
from torchvision.ops import nms

from .box_ops import validate_boxes

__all__ = ["select_boxes", "batched_select_boxes"]


def _check_selection_arguments(score_threshold: float, iou_threshold: float, max_num: int) -> None:
    for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"`{name}` must be a number in [0, 1]; got {value!r}.")
    if not isinstance(max_num, numbers.Integral) or isinstance(max_num, bool) or max_num < 1:
        raise ValueError(f"`max_num` must be an integer >= 1 (the number of region slots to fill); got {max_num!r}.")


def _is_float_tensor(value: object, ndim: int) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == ndim


def _check_scores(scores: torch.Tensor, expected_shape: tuple[int, ...], boxes_name: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"`scores` must be a torch.Tensor; got {type(scores).__name__}.")
    if not scores.is_floating_point():
        raise TypeError(f"`scores` must be a floating point tensor; got {scores.dtype}. Use `scores.float()`.")
    if tuple(scores.shape) != expected_shape:
        raise ValueError(
            f"`scores` must have shape {expected_shape} (one score per box in `{boxes_name}`); "
            f"got {tuple(scores.shape)}."
        )
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("`scores` contains NaN or inf; pass finite scores (e.g. sigmoid probabilities).")


def _inputs_look_valid(boxes: torch.Tensor, scores: torch.Tensor) -> bool:
    """One fused check (a single host sync) that the boxes are finite, not inverted, and the scores finite.

    A NaN fails the ordering test and an inf makes the sum non-finite; a False (also from a sum overflowing on huge
    but finite values) only sends the caller to the detailed validators, which raise with the offending box.
    """
    if boxes.shape[-1] != 4 or boxes.numel() == 0 or scores.shape != boxes.shape[:-1]:
        return False
    ordered = (boxes[..., 2:] >= boxes[..., :2]).all()
    return bool(ordered & torch.isfinite(boxes.sum() + scores.sum()))


def _select(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_num: int,
    keep_best_if_empty: bool,
) -> torch.LongTensor:
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    candidates = (scores > score_threshold).nonzero().squeeze(1)
    # nms kernels are not implemented for every reduced-precision dtype on every device; float32 always works.
    kept = nms(boxes[candidates].float(), scores[candidates].float(), iou_threshold)
    keep = candidates[kept][:max_num]
    if keep.numel() == 0 and keep_best_if_empty:
        keep = scores.argmax().reshape(1)
    return keep


def select_boxes(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    score_threshold: float = 0.0,
    iou_threshold: float = 0.5,
    max_num: int = 100,
    keep_best_if_empty: bool = True,
) -> torch.LongTensor:
    """Pick which boxes to keep: drop low scores, suppress overlaps, cap the count.

    Args:
        boxes: ``(N, 4)`` float xyxy boxes, any frame (pixel or normalized), ``x2 >= x1`` and ``y2 >= y1``.
        scores: ``(N,)`` float confidence per box; boxes with ``score <= score_threshold`` are dropped.
        score_threshold: in ``[0, 1]``; Groma uses 0.15.
        iou_threshold: in ``[0, 1]``; a box is suppressed when its IoU with a higher-scoring kept box is larger.
            Groma uses 0.6.
        max_num: keep at most this many boxes (the number of region slots); Groma uses 100.
        keep_best_if_empty: when no box survives the score filter, return the single best-scoring box instead of
            nothing (Groma's behaviour, so every image yields at least one region).

    Returns:
        ``(K,)`` int64 indices into ``boxes``, on ``boxes.device``, ordered by descending score, ``K <= max_num``.
        Empty input gives an empty result.
    """
    _check_selection_arguments(score_threshold, iou_threshold, max_num)
    if not _is_float_tensor(boxes, 2) or not _is_float_tensor(scores, 1) or not _inputs_look_valid(boxes, scores):
        validate_boxes(boxes, "boxes")
        if boxes.ndim != 2:
            raise ValueError(
                f"`boxes` must have shape (N, 4) for one image; got {tuple(boxes.shape)}. "
                f"Use batched_select_boxes for (B, N, 4)."
            )
        _check_scores(scores, (boxes.shape[0],), "boxes")
    return _select(boxes, scores, score_threshold, iou_threshold, max_num, keep_best_if_empty)


def batched_select_boxes(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    *,
    score_threshold: float = 0.0,
    iou_threshold: float = 0.5,
    max_num: int = 100,
    keep_best_if_empty: bool = True,
) -> list[torch.LongTensor]:
    """:func:`select_boxes` for each image of a batch.

    Args:
        boxes: ``(B, N, 4)`` float xyxy boxes, one set of ``N`` proposals per image.
        scores: ``(B, N)`` float scores.
        score_threshold, iou_threshold, max_num, keep_best_if_empty: as in :func:`select_boxes`.

    Returns:
        ``B`` int64 index tensors ``(K_b,)`` into ``boxes[b]``, each ordered by descending score.
    """
    _check_selection_arguments(score_threshold, iou_threshold, max_num)
    if not _is_float_tensor(boxes, 3) or not _is_float_tensor(scores, 2) or not _inputs_look_valid(boxes, scores):
        validate_boxes(boxes, "boxes")
        if boxes.ndim != 3:
            raise ValueError(
                f"`boxes` must have shape (B, N, 4); got {tuple(boxes.shape)}. Use select_boxes for a single image."
            )
        _check_scores(scores, tuple(boxes.shape[:2]), "boxes")
    return [
        _select(image_boxes, image_scores, score_threshold, iou_threshold, max_num, keep_best_if_empty)
        for image_boxes, image_scores in zip(boxes, scores)
    ]
