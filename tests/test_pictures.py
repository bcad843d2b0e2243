"""Tests of the picture helpers: what changes (and what must not), fixed colours, depth order and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_regionmm.data import pictures as P


def gray_image(width: int = 100, height: int = 80) -> Image.Image:
    return Image.new("RGB", (width, height), (100, 100, 100))


def changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return (np.asarray(before) != np.asarray(after)).any(axis=2)


def inside(boxes: list[list[int]], width: int, height: int) -> np.ndarray:
    region = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        region[max(y1, 0) : y2, max(x1, 0) : x2] = True
    return region


def test_draw_boxes_changes_only_pixels_inside_the_boxes():
    image = gray_image()
    original = np.asarray(image).copy()
    boxes = [[10, 10, 40, 30], [50, 20, 90, 70]]
    drawn = P.draw_boxes(image, boxes, line_width=2)
    assert np.array_equal(np.asarray(image), original), "the input image must not change"
    mask = changed(image, drawn)
    assert mask.any() and not (mask & ~inside(boxes, 100, 80)).any()
    pixels = np.asarray(drawn)
    # The outline lies on the box's own edge pixels: x1..x2-1, y1..y2-1, in the colour of its index.
    assert tuple(pixels[10, 10]) == P.index_color(0) and tuple(pixels[29, 39]) == P.index_color(0)
    assert tuple(pixels[69, 89]) == P.index_color(1) and tuple(pixels[45, 70]) == (100, 100, 100)
    assert np.array_equal(np.asarray(P.draw_boxes(image, boxes, line_width=2)), pixels), "drawing is deterministic"


def test_labels_and_scores_stay_inside_their_boxes():
    image = gray_image(120, 90)
    boxes = np.array([[5.0, 5.0, 25.0, 15.0], [40.0, 30.0, 115.0, 85.0]])
    plain = P.draw_boxes(image, boxes)
    labelled = P.draw_boxes(image, boxes, labels=["a very long label that cannot fit", "circle"], scores=[0.5, 0.93])
    label_pixels = changed(plain, labelled)
    assert label_pixels[31:40, 41:80].any(), "the label of box 1 is drawn in its top-left corner"
    assert not (changed(image, labelled) & ~inside(boxes.astype(int).tolist(), 120, 90)).any()
    scores_only = P.draw_boxes(image, torch.tensor(boxes), scores=torch.tensor([0.5, 0.25]))
    assert changed(plain, scores_only)[31:40, 41:80].any()


def test_boxes_partly_outside_the_image_are_clipped():
    image = gray_image(40, 30)
    drawn = P.draw_boxes(image, [[-10, -10, 20, 20], [50, 50, 60, 60]])
    mask = changed(image, drawn)
    assert mask[0, 5] and mask[19, 5] and not (mask & ~inside([[0, 0, 20, 20]], 40, 30)).any()


def test_draw_masks_blends_exactly_inside_and_nowhere_else():
    image = Image.new("RGB", (6, 4), (255, 255, 255))
    masks = np.zeros((2, 4, 6), dtype=bool)
    masks[0, 1, 1] = True
    masks[1, 2, 3:5] = True
    blended = np.asarray(P.draw_masks(image, masks, alpha=0.5))
    red, green, blue = P.index_color(0)
    # round(0.5 * 255 + 0.5 * c), with numpy's round-half-to-even.
    assert tuple(blended[1, 1]) == tuple(int(np.rint(0.5 * 255 + 0.5 * c)) for c in (red, green, blue))
    assert tuple(blended[2, 4]) == tuple(int(np.rint(0.5 * 255 + 0.5 * c)) for c in P.index_color(1))
    untouched = ~masks.any(axis=0)
    assert (blended[untouched] == 255).all()
    assert np.array_equal(np.asarray(P.draw_masks(image, torch.from_numpy(masks), alpha=0.0)), np.asarray(image))
    opaque = np.asarray(P.draw_masks(image, masks.astype(np.uint8), alpha=1.0))
    assert tuple(opaque[1, 1]) == P.index_color(0)


def test_draw_grounding_colours_all_boxes_of_a_phrase_alike():
    image = gray_image()
    grounding = [
        {"phrase": "two circles", "boxes": [[5, 5, 30, 30], [60, 5, 95, 30]]},
        {"phrase": "a square", "boxes": np.array([[10, 40, 50, 75]])},
        {"phrase": "nothing", "boxes": []},
    ]
    pixels = np.asarray(P.draw_grounding(image, grounding))
    assert tuple(pixels[29, 29]) == P.index_color(0) and tuple(pixels[29, 94]) == P.index_color(0)
    assert tuple(pixels[74, 49]) == P.index_color(1)
    assert not (
        changed(image, Image.fromarray(pixels)) & ~inside([[5, 5, 30, 30], [60, 5, 95, 30], [10, 40, 50, 75]], 100, 80)
    ).any()


def test_render_point_cloud_keeps_the_nearest_point_and_the_orientation():
    # Looking straight down (elevation 90): higher z is nearer, +x is to the right and +y is up in the picture.
    frame = [
        [-1, -1, 0, 0.5, 0.5, 0.5],
        [1, 1, 0, 0.5, 0.5, 0.5],
        [-1, 1, 0, 0.5, 0.5, 0.5],
        [1, -1, 0, 0.5, 0.5, 0.5],
    ]
    near, far = [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]
    marker = [0.9, 0.0, 0, 0, 1, 0]
    for points in (frame + [near, far, marker], frame + [far, near, marker]):
        picture = P.render_point_cloud(np.array(points), size=64, elevation=90.0, azimuth=0.0, point_radius=0)
        pixels = np.asarray(picture)
        assert picture.size == (64, 64)
        assert tuple(pixels[32, 32]) == (255, 0, 0)  # (0, 0) maps to the centre 31.5, rounded to 32
        green = np.argwhere((pixels == (0, 255, 0)).all(axis=2))
        assert len(green) == 1 and green[0][1] > 50 and abs(green[0][0] - 31.5) <= 1
    without_color = P.render_point_cloud(torch.randn(500, 3, generator=torch.Generator().manual_seed(0)), size=48)
    assert (np.asarray(without_color) != 255).any()


def test_render_point_cloud_draws_box_wireframes():
    points = np.random.default_rng(0).uniform(-1, 1, (300, 3))
    plain = np.asarray(P.render_point_cloud(points, size=96))
    boxed = np.asarray(P.render_point_cloud(points, boxes_3d=[[0, 0, 0, 2, 2, 2]], size=96))
    assert (boxed == P.index_color(0)).all(axis=2).sum() > (plain == P.index_color(0)).all(axis=2).sum() + 50


def test_index_color_is_fixed_and_cycles():
    assert P.index_color(0) == P.index_color(20) != P.index_color(1)
    assert len({P.index_color(i) for i in range(20)}) == 20
    with pytest.raises(ValueError, match="index"):
        P.index_color(-1)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: P.draw_boxes(np.zeros((4, 4, 3)), [[0, 0, 1, 1]]), TypeError, "PIL"),
        (lambda: P.draw_boxes(gray_image(), [[0, 0, 1]]), ValueError, r"shape \(n, 4\)"),
        (lambda: P.draw_boxes(gray_image(), [[0, 0, float("nan"), 1]]), ValueError, "finite"),
        (lambda: P.draw_boxes(gray_image(), [[0, 0, 5, 5], [9, 0, 3, 5]]), ValueError, "box 1"),
        (lambda: P.draw_boxes(gray_image(), [[0, 0, 5, 5]], labels=["a", "b"]), ValueError, "labels"),
        (lambda: P.draw_boxes(gray_image(), [[0, 0, 5, 5]], scores=[0.1, 0.2]), ValueError, "scores"),
        (lambda: P.draw_boxes(gray_image(), [[0, 0, 5, 5]], line_width=0), ValueError, "line_width"),
        (lambda: P.draw_masks(gray_image(), np.zeros((1, 5, 5), bool)), ValueError, r"\(n, 80, 100\)"),
        (lambda: P.draw_masks(gray_image(), np.full((1, 80, 100), 0.3)), ValueError, "threshold"),
        (lambda: P.draw_masks(gray_image(), np.zeros((1, 80, 100), bool), alpha=1.5), ValueError, "alpha"),
        (lambda: P.draw_grounding(gray_image(), [{"phrase": "x"}]), ValueError, "'boxes'"),
        (lambda: P.draw_grounding(gray_image(), {"phrase": "x", "boxes": []}), TypeError, "grounding"),
        (lambda: P.render_point_cloud(np.zeros((5, 2))), ValueError, r"\(N, 3\)"),
        (lambda: P.render_point_cloud(np.full((5, 3), np.nan)), ValueError, "finite"),
        (lambda: P.render_point_cloud(np.full((5, 6), 2.0)), ValueError, r"\[0, 1\]"),
        (lambda: P.render_point_cloud(np.zeros((5, 3)), boxes_3d=[[0, 0, 0, 1, 1]]), ValueError, "boxes_3d"),
        (lambda: P.render_point_cloud(np.zeros((5, 3)), size=8), ValueError, "size"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()
