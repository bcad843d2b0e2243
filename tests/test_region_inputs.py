"""Processor-side region prompts: pixel boxes, rescaling, point prompts (processing/region_inputs)."""

import numpy as np
import pytest
import torch

from hf_regionmm.processing.region_inputs import (
    PointPrompts,
    rescale_boxes,
    validate_image_sizes,
    validate_pixel_boxes,
    validate_points,
)

SIZES = [(100, 200), (50, 60)]  # (height, width)

# ---------------------------------------------------------------------------------------------------- boxes


def test_boxes_from_lists_arrays_and_tensors_become_float32_tensors():
    boxes = [[[10, 20, 110, 80], [0, 0, 200, 100]], np.array([[5.5, 5.0, 30.0, 45.0]])]
    result = validate_pixel_boxes(boxes, SIZES)
    assert len(result) == 2
    assert all(tensor.dtype == torch.float32 for tensor in result)
    assert result[0].tolist() == [[10, 20, 110, 80], [0, 0, 200, 100]]
    assert result[1].tolist() == [[5.5, 5.0, 30.0, 45.0]]

    stacked = validate_pixel_boxes(torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[4.0, 3.0, 9.0, 9.0]]]), SIZES)
    assert [tensor.shape for tensor in stacked] == [(1, 4), (1, 4)]


def test_boxes_none_and_empty_images():
    assert [tensor.shape for tensor in validate_pixel_boxes(None, SIZES)] == [(0, 4), (0, 4)]
    result = validate_pixel_boxes([None, []], SIZES)
    assert [tensor.shape for tensor in result] == [(0, 4), (0, 4)]


def test_boxes_within_one_pixel_are_clipped_and_caller_data_is_untouched():
    user_boxes = torch.tensor([[[-0.5, 0.0, 200.8, 100.0]]])
    result = validate_pixel_boxes(user_boxes, SIZES[:1])
    assert result[0].tolist() == [[0.0, 0.0, 200.0, 100.0]]
    assert user_boxes[0, 0, 0] == -0.5

    array = np.array([[[-0.5, 0.0, 200.8, 100.0]]], dtype=np.float32)
    validate_pixel_boxes(array, SIZES[:1])
    assert array[0, 0, 0] == -0.5


@pytest.mark.parametrize(
    ("boxes", "kwargs", "error", "match"),
    [
        ([[[0, 0, 10, 10]]], {}, ValueError, r"`region_boxes` has 1 entries but there are 2 images"),
        ("box", {}, TypeError, r"`region_boxes` must be a list with one entry per image"),
        (
            np.zeros((2, 4)),
            {},
            ValueError,
            r"`region_boxes` given as an array must have shape \(batch, num_boxes, 4\)",
        ),
        ([[0, 0, 10, 10], None], {}, ValueError, r"`region_boxes\[0\]` is a single box.*wrap it"),
        ([[[0, 0, 10]], None], {}, ValueError, r"`region_boxes\[0\]` must be a list of boxes with 4 numbers"),
        ([[[0, 0, 10, 10], [0, 0, 10]], None], {}, ValueError, r"`region_boxes\[0\]` could not be read as numbers"),
        ([[["a", 0, 10, 10]], None], {}, ValueError, r"`region_boxes\[0\]` could not be read as numbers"),
        (
            [[[0, 0, float("nan"), 10]], None],
            {},
            ValueError,
            r"`region_boxes\[0\]\[0\]` = \[0, 0, nan, 10\] contains NaN",
        ),
        ([None, [[0, 0, 10, 10], [30, 5, 20, 40]]], {}, ValueError, r"`region_boxes\[1\]\[1\]`.*must have x2 > x1"),
        ([[[10, 10, 10, 20]], None], {}, ValueError, r"`region_boxes\[0\]\[0\]`.*x2 > x1 and y2 > y1"),
        (
            [None, [[0, 0, 61.5, 10]]],
            {},
            ValueError,
            r"`region_boxes\[1\]\[0\]`.*outside image 1.*height=50, width=60",
        ),
        ([[[-2, 0, 10, 10]], None], {}, ValueError, r"`region_boxes\[0\]\[0\]`.*outside image 0"),
        ([[[0.1, 0.2, 0.5, 0.6]], None], {}, ValueError, r"`region_boxes\[0\]`.*looks normalized to \[0, 1\]"),
        (
            [[[0, 0, 10, 10]] * 3, None],
            {"max_boxes": 2},
            ValueError,
            r"`region_boxes\[0\]` has 3 boxes but the model has only 2 region slots",
        ),
        ([torch.ones(1, 4, dtype=torch.bool), None], {}, TypeError, r"`region_boxes\[0\]` must hold real numbers"),
        ([{"box": 1}, None], {}, TypeError, r"`region_boxes\[0\]` must be a list, numpy array or tensor"),
        (None, {"max_boxes": -1}, ValueError, r"`max_boxes` must be a non-negative integer"),
    ],
)
def test_boxes_reject_bad_input(boxes, kwargs, error, match):
    with pytest.raises(error, match=match):
        validate_pixel_boxes(boxes, SIZES, "region_boxes", **kwargs)


@pytest.mark.parametrize(
    ("sizes", "match"), [([(100, 0)], r"`image_sizes\[0\]`"), ([(10.5, 3)], r"two positive integers"), ("x", r"list")]
)
def test_image_sizes_are_checked(sizes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        validate_image_sizes(sizes)


def test_image_sizes_accept_arrays():
    assert validate_image_sizes(np.array([[10, 20]])) == [(10, 20)]


# ---------------------------------------------------------------------------------------------------- rescale


def test_rescale_boxes_hand_computed_and_round_trip():
    boxes = torch.tensor([[10.0, 20.0, 110.0, 80.0]])
    # (h, w) 100x200 -> 448x448: x * 2.24, y * 4.48
    rescaled = rescale_boxes(boxes, (100, 200), (448, 448))
    torch.testing.assert_close(rescaled, torch.tensor([[22.4, 89.6, 246.4, 358.4]]))
    torch.testing.assert_close(rescale_boxes(rescaled, (448, 448), (100, 200)), boxes)
    assert rescale_boxes([[0, 0, 2, 2]], (2, 2), (4, 4)).tolist() == [[0.0, 0.0, 4.0, 4.0]]
    assert rescale_boxes(boxes.double(), (1, 1), (2, 2)).dtype == torch.float64


@pytest.mark.parametrize(
    ("boxes", "from_size", "to_size", "match"),
    [
        (torch.zeros(2, 3), (1, 1), (2, 2), r"`boxes` must have shape \(n, 4\)"),
        (torch.zeros(2, 4), (0, 1), (2, 2), r"`from_size` must be \(height, width\)"),
        (torch.zeros(2, 4), (1, 1), (2,), r"`to_size` must be \(height, width\)"),
    ],
)
def test_rescale_boxes_rejects_bad_input(boxes, from_size, to_size, match):
    with pytest.raises(ValueError, match=match):
        rescale_boxes(boxes, from_size, to_size)


# ---------------------------------------------------------------------------------------------------- points


def test_points_are_padded_with_labels_and_mask():
    points = [[[[10, 20], [30, 40]], [[50, 60]]], [np.array([[5.0, 6.0]])]]
    labels = [[[1, 0], [1]], [[2]]]
    prompts = validate_points(points, labels, SIZES)
    assert isinstance(prompts, PointPrompts)
    assert prompts.points.shape == (2, 2, 2, 2) and prompts.points.dtype == torch.float32
    assert prompts.labels.shape == (2, 2, 2) and prompts.labels.dtype == torch.long
    assert prompts.points[0, 0].tolist() == [[10, 20], [30, 40]]
    assert prompts.points[0, 1].tolist() == [[50, 60], [-10, -10]]
    assert prompts.labels.tolist() == [[[1, 0], [1, -10]], [[2, -10], [-10, -10]]]
    assert prompts.mask.tolist() == [[[True, True], [True, False]], [[True, False], [False, False]]]


def test_points_default_labels_and_missing_images():
    prompts = validate_points([None, [[[1, 1]]]], None, SIZES)
    assert prompts.points.shape == (2, 1, 1, 2)
    assert prompts.labels.tolist() == [[[-10]], [[1]]]
    assert prompts.mask.tolist() == [[[False]], [[True]]]
    empty = validate_points(None, None, SIZES)
    assert empty.points.shape == (2, 0, 0, 2) and empty.labels.shape == (2, 0, 0) and empty.mask.shape == (2, 0, 0)


def test_points_from_stacked_arrays():
    points = np.array([[[[1.0, 2.0]]], [[[3.0, 4.0]]]])
    labels = np.array([[[1]], [[0]]])
    prompts = validate_points(points, labels, SIZES)
    assert prompts.points.tolist() == [[[[1.0, 2.0]]], [[[3.0, 4.0]]]]
    assert prompts.labels.tolist() == [[[1]], [[0]]]


@pytest.mark.parametrize(
    ("points", "labels", "kwargs", "error", "match"),
    [
        ([[[[1, 1]]]], None, {}, ValueError, r"`clicks` has 1 entries but there are 2 images"),
        ([[[1, 1]], None], None, {}, ValueError, r"`clicks\[0\]\[0\]` is a single point.*wrap it"),
        ([[[[1, 1, 1]]], None], None, {}, ValueError, r"`clicks\[0\]\[0\]` must be a list of points with 2 numbers"),
        ([[[]], None], None, {}, ValueError, r"`clicks\[0\]\[0\]` has no points"),
        (
            [[[[1, float("inf")]]], None],
            None,
            {},
            ValueError,
            r"`clicks\[0\]\[0\]\[0\]` = \[1, inf\] contains NaN or inf",
        ),
        ([None, [[[61.5, 1]]]], None, {}, ValueError, r"`clicks\[1\]\[0\]\[0\]`.*outside image 1"),
        (
            [[[[1, 1]]], None],
            [[[1, 0]], None],
            {},
            ValueError,
            r"`click_labels\[0\]\[0\]` must hold one label per point",
        ),
        ([[[[1, 1]]], None], [[], None], {}, ValueError, r"`clicks\[0\]` has 1 objects but `click_labels\[0\]` has 0"),
        ([[[[1, 1]]], None], [[[0.5]], None], {}, ValueError, r"`click_labels\[0\]\[0\]` = \[0.5\] must be integers"),
        ([[[[1, 1]]], None], [[[-10]], None], {}, ValueError, r"`click_labels\[0\]\[0\]` uses -10, which is reserved"),
        ([[[[1, 1]]], None], [[[7]], None], {"allowed_labels": (0, 1)}, ValueError, r"has labels \[7\]; allowed"),
        (
            [[[[1, 1]], [[2, 2]]], None],
            None,
            {"max_objects": 1},
            ValueError,
            r"`clicks\[0\]` has 2 objects.*at most 1",
        ),
        (None, [[[1]], None], {}, ValueError, r"`click_labels` was given without `clicks`"),
        ([5, None], None, {}, TypeError, r"`clicks\[0\]` must be a list of objects"),
        (np.zeros((2, 1, 2)), None, {}, ValueError, r"`clicks` given as an array must have shape"),
    ],
)
def test_points_reject_bad_input(points, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        validate_points(points, labels, SIZES, "clicks", labels_name="click_labels", **kwargs)
