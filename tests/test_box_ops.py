"""Box formats, validation, IoU / GIoU (box_ops) and NMS-based selection (box_selection)."""

import math

import pytest
import torch

from hf_regionmm.modeling.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    clip_boxes,
    denormalize_boxes,
    generalized_box_iou,
    normalize_boxes,
    validate_boxes,
)
from hf_regionmm.modeling.box_selection import batched_select_boxes, select_boxes

# ---------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4), (0, 4), (2, 0, 4)])
def test_validate_boxes_accepts_supported_ranks_and_returns_input(shape):
    boxes = torch.zeros(shape)
    if boxes.numel():
        boxes[..., 2:] = 1.0
    assert validate_boxes(boxes) is boxes


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "match"),
    [
        ([[0.0, 0.0, 1.0, 1.0]], {}, TypeError, r"`my_boxes` must be a torch.Tensor"),
        (
            torch.tensor([[0, 0, 1, 1]]),
            {},
            TypeError,
            r"`my_boxes` must be a floating point tensor; got dtype torch.int64",
        ),
        (torch.zeros(2, 5), {}, ValueError, r"`my_boxes` must have shape \(4,\), \(N, 4\) or \(B, N, 4\).*\(2, 5\)"),
        (torch.zeros(1, 1, 1, 4), {}, ValueError, r"`my_boxes` must have shape .*\(1, 1, 1, 4\)"),
        (torch.zeros(()), {}, ValueError, r"`my_boxes` must have shape"),
        (torch.zeros(0, 4), {"allow_empty": False}, ValueError, r"`my_boxes` is empty"),
        (torch.tensor([[0.0, 0, 1, 1], [0, float("nan"), 1, 1]]), {}, ValueError, r"`my_boxes` contains NaN.*box 1"),
        (torch.tensor([[0.0, 0, float("inf"), 1]]), {}, ValueError, r"`my_boxes` contains NaN or inf: box 0"),
        (
            torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [5.0, 0, 2, 1]]),
            {},
            ValueError,
            r"`my_boxes` must have x2 >= x1 and y2 >= y1; got box 3 = \[5, 0, 2, 1\].*box_cxcywh_to_xyxy",
        ),
        (
            torch.tensor([[[0.0, 0, 1, 1]], [[0, 3, 1, 2]]]),
            {},
            ValueError,
            r"`my_boxes` must have x2 >= x1.*box \(1, 0\)",
        ),
        (
            torch.tensor([0.5, 0.5, -0.1, 0.2]),
            {"fmt": "cxcywh"},
            ValueError,
            r"`my_boxes` must have w >= 0 and h >= 0",
        ),
        (
            torch.tensor([[0.0, 0, 1, 1], [2, 2, 2, 3]]),
            {"require_positive_area": True},
            ValueError,
            r"`my_boxes` must have positive width and height; got box 1",
        ),
        (torch.zeros(1, 4), {"fmt": "xywh"}, ValueError, r"`fmt` must be one of"),
    ],
)
def test_validate_boxes_rejects_bad_input(value, kwargs, error, match):
    with pytest.raises(error, match=match):
        validate_boxes(value, "my_boxes", **kwargs)


def test_validate_boxes_allows_zero_area_unless_required():
    point_box = torch.tensor([[2.0, 2.0, 2.0, 3.0]])
    assert validate_boxes(point_box) is point_box


# ---------------------------------------------------------------------------------------------------- conversions


def test_cxcywh_xyxy_hand_values_and_round_trip_with_leading_dims():
    cxcywh = torch.tensor([2.0, 3.0, 4.0, 2.0])
    assert torch.equal(box_cxcywh_to_xyxy(cxcywh), torch.tensor([0.0, 2.0, 4.0, 4.0]))
    assert torch.equal(box_xyxy_to_cxcywh(torch.tensor([0.0, 2.0, 4.0, 4.0])), cxcywh)

    batch = torch.rand(2, 5, 4)
    round_trip = box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batch))
    assert round_trip.shape == (2, 5, 4)
    torch.testing.assert_close(round_trip, batch)


def test_conversion_keeps_inverted_boxes_for_checkpoint_compatibility():
    assert torch.equal(box_xyxy_to_cxcywh(torch.tensor([4.0, 0.0, 2.0, 2.0])), torch.tensor([3.0, 1.0, -2.0, 2.0]))


def test_conversion_gradients_flow():
    boxes = torch.rand(3, 4, requires_grad=True)
    box_cxcywh_to_xyxy(boxes).sum().backward()
    # x1 + x2 = 2 cx, y1 + y2 = 2 cy, and the w/h terms cancel.
    assert torch.equal(boxes.grad, torch.tensor([[2.0, 2.0, 0.0, 0.0]] * 3))


def test_normalize_denormalize_clip_area():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    normalized = normalize_boxes(boxes, (100, 50))  # height 100, width 50
    assert torch.allclose(normalized, torch.tensor([[0.2, 0.2, 0.6, 0.4]]))
    assert torch.allclose(denormalize_boxes(normalized, (100, 50)), boxes)

    clipped = clip_boxes(torch.tensor([[-5.0, 10.0, 70.0, 120.0]]), (100, 50))
    assert torch.equal(clipped, torch.tensor([[0.0, 10.0, 50.0, 100.0]]))

    assert torch.equal(
        box_area(torch.tensor([[[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 2.0, 2.0]]])), torch.tensor([[6.0, 1.0]])
    )


@pytest.mark.parametrize(
    ("function", "args", "error", "match"),
    [
        (normalize_boxes, (torch.zeros(2, 3), (10, 10)), ValueError, r"`boxes_xyxy` must have shape \(\.\.\., 4\)"),
        (normalize_boxes, (torch.zeros(2, 4), (10, 0)), ValueError, r"`image_size` must be \(height, width\)"),
        (denormalize_boxes, (torch.zeros(2, 4, dtype=torch.long), (10, 10)), TypeError, r"`boxes` must be a floating"),
        (clip_boxes, ([[0, 0, 1, 1]], (10, 10)), TypeError, r"`boxes_xyxy` must be a torch.Tensor"),
        (box_cxcywh_to_xyxy, (torch.zeros(3),), ValueError, r"`boxes` must have shape \(\.\.\., 4\)"),
        (box_iou, (torch.zeros(2, 2, 4), torch.zeros(1, 4)), ValueError, r"`boxes_a` must have shape \(N, 4\)"),
        (
            generalized_box_iou,
            (torch.zeros(1, 4), torch.tensor([[1.0, 0, 0, 1]])),
            ValueError,
            r"`boxes_b` must have x2",
        ),
    ],
)
def test_box_helpers_reject_bad_input(function, args, error, match):
    with pytest.raises(error, match=match):
        function(*args)


# ---------------------------------------------------------------------------------------------------- IoU / GIoU


def test_iou_and_giou_hand_computed():
    boxes_a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    boxes_b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou = box_iou(boxes_a, boxes_b)
    # a0/b0 overlap 1 of union 4 + 4 - 1 = 7; a0/b1 and a1/b0 only touch; a1 covers a quarter of b2.
    expected_iou = torch.tensor([[1 / 7, 0.0, 1.0], [0.0, 0.0, 1 / 4]])
    torch.testing.assert_close(iou, expected_iou)

    giou = generalized_box_iou(boxes_a, boxes_b)
    # GIoU = IoU - (enclosing area - union) / enclosing area:
    # a0/b0: enclosing [0,0,3,3] = 9, union 7 -> 1/7 - 2/9 = -5/63
    # a0/b1: enclosing [0,0,3,2] = 6, union 5 -> -1/6
    # a1/b0: enclosing [0,0,3,3] = 9, union 5 -> -4/9
    # a1/b1: enclosing [0,0,3,1] = 3, union 2 -> -1/3
    expected_giou = torch.tensor([[-5 / 63, -1 / 6, 1.0], [-4 / 9, -1 / 3, 1 / 4]])
    torch.testing.assert_close(giou, expected_giou)


def test_giou_is_differentiable():
    predicted = torch.tensor([[0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    (1 - generalized_box_iou(predicted, target)).sum().backward()
    # Moving x2/y2 towards the target raises GIoU, so the loss gradient there is negative.
    assert predicted.grad[0, 2] < 0 and predicted.grad[0, 3] < 0


# ---------------------------------------------------------------------------------------------------- selection


def _proposals():
    # Given out of score order on purpose: the result must be sorted by score, not by position.
    boxes = torch.tensor(
        [
            [20.0, 20.0, 30.0, 30.0],  # 0: score 0.7, far from the others
            [0.0, 0.0, 10.0, 10.0],  # 1: score 0.9
            [1.0, 1.0, 11.0, 11.0],  # 2: score 0.8, IoU with box 1 = 81 / 119 = 0.68
            [50.0, 50.0, 60.0, 60.0],  # 3: score 0.1, under the score threshold
        ]
    )
    scores = torch.tensor([0.7, 0.9, 0.8, 0.1])
    return boxes, scores


def test_select_boxes_keeps_expected_indices_in_score_order():
    boxes, scores = _proposals()
    keep = select_boxes(boxes, scores, score_threshold=0.15, iou_threshold=0.6)
    assert keep.dtype == torch.long
    assert keep.tolist() == [1, 0]
    # A looser IoU threshold keeps the overlapping box; no score filter keeps the low-score box.
    assert select_boxes(boxes, scores, score_threshold=0.15, iou_threshold=0.7).tolist() == [1, 2, 0]
    assert select_boxes(boxes, scores, iou_threshold=0.7).tolist() == [1, 2, 0, 3]
    assert select_boxes(boxes, scores, iou_threshold=0.7, max_num=2).tolist() == [1, 2]


def test_select_boxes_score_threshold_is_strict():
    boxes, scores = _proposals()
    # score == threshold is dropped (mmcv keeps score > threshold)
    assert select_boxes(boxes, scores, score_threshold=0.7, iou_threshold=0.6).tolist() == [1]


def test_select_boxes_keeps_best_when_nothing_survives():
    boxes, scores = _proposals()
    assert select_boxes(boxes, scores, score_threshold=0.95).tolist() == [1]
    assert select_boxes(boxes, scores, score_threshold=0.95, keep_best_if_empty=False).tolist() == []
    empty = select_boxes(torch.zeros(0, 4), torch.zeros(0))
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_select_boxes_handles_half_precision():
    boxes, scores = _proposals()
    keep = select_boxes(boxes.to(torch.bfloat16), scores.to(torch.bfloat16), score_threshold=0.15, iou_threshold=0.6)
    assert keep.tolist() == [1, 0]


def test_batched_select_boxes_per_image():
    boxes, scores = _proposals()
    batch_boxes = torch.stack([boxes, boxes])
    batch_scores = torch.stack([scores, torch.tensor([0.0, 0.0, 0.0, 0.5])])
    keep = batched_select_boxes(batch_boxes, batch_scores, score_threshold=0.15, iou_threshold=0.6)
    assert [indices.tolist() for indices in keep] == [[1, 0], [3]]


@pytest.mark.parametrize(
    ("boxes", "scores", "kwargs", "error", "match"),
    [
        (torch.zeros(3, 4), torch.zeros(2), {}, ValueError, r"`scores` must have shape \(3,\)"),
        (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), {}, TypeError, r"`scores` must be a floating point"),
        (torch.zeros(3, 4), torch.tensor([0.1, float("nan"), 0.2]), {}, ValueError, r"`scores` contains NaN"),
        (torch.tensor([[0.0, 0, 1, float("nan")]]), torch.zeros(1), {}, ValueError, r"`boxes` contains NaN"),
        (torch.tensor([[2.0, 0, 1, 1]]), torch.zeros(1), {}, ValueError, r"`boxes` must have x2 >= x1"),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), {}, ValueError, r"`boxes` must have shape \(N, 4\).*batched_select"),
        (
            torch.zeros(3, 4),
            torch.zeros(3),
            {"iou_threshold": 1.5},
            ValueError,
            r"`iou_threshold` must be a number in",
        ),
        (torch.zeros(3, 4), torch.zeros(3), {"score_threshold": -0.1}, ValueError, r"`score_threshold` must be"),
        (torch.zeros(3, 4), torch.zeros(3), {"max_num": 0}, ValueError, r"`max_num` must be an integer >= 1"),
        (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3), {}, TypeError, r"`boxes` must be a floating point"),
    ],
)
def test_select_boxes_rejects_bad_input(boxes, scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        select_boxes(boxes, scores, **kwargs)


def test_batched_select_boxes_rejects_mismatched_scores():
    with pytest.raises(ValueError, match=r"`scores` must have shape \(2, 3\)"):
        batched_select_boxes(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"`boxes` must have shape \(B, N, 4\)"):
        batched_select_boxes(torch.zeros(3, 4), torch.zeros(3))


def test_iou_of_selected_boxes_is_below_threshold():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, generator=generator) * 50
    sizes = torch.rand(40, 2, generator=generator) * 20 + 1
    boxes = torch.cat([corners, corners + sizes], dim=1)
    scores = torch.rand(40, generator=generator)
    keep = select_boxes(boxes, scores, iou_threshold=0.3, max_num=100)
    overlaps = box_iou(boxes[keep], boxes[keep]).fill_diagonal_(0)
    assert overlaps.max() <= 0.3
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])
    assert not math.isnan(float(overlaps.sum()))
