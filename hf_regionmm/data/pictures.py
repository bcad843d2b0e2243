"""Pictures of region data and predictions: boxes, masks, grounded phrases and point clouds (data issue, item 4).

Used by the model cards, the README and the demo to show what a model saw and answered. Every function returns a new
``PIL.Image`` and leaves its input untouched. Colours are fixed per index (:func:`index_color`), so the same region
gets the same colour in every picture, and drawing is deterministic.

Coordinate frames: image boxes are absolute pixel xyxy of the image they are drawn on (``x2``/``y2`` are the right and
bottom pixel edges, as in :mod:`hf_regionmm.data.synthetic`); masks are ``(n, height, width)`` bool in that image's
pixel grid; point clouds and ``boxes_3d`` (``center_xyz + size_xyz``) share one 3D frame with z up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
    (255, 225, 25),
)


def index_color(index: int) -> tuple[int, int, int]:
    """The RGB colour of region ``index`` in every picture (a fixed 20-colour cycle)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"`index` must be a non-negative int; got {index!r}.")
    return _PALETTE[int(index) % len(_PALETTE)]


def _check_image(image: object) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` must be a PIL.Image.Image; got {type(image).__name__}. Use PIL.Image.open(...).")
    return image.convert("RGB")


def _to_numpy(value: object, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`{name}` must be a numeric array (list, numpy or torch); got {type(value).__name__}."
        ) from error


def _check_boxes(boxes: object, name: str = "boxes") -> np.ndarray:
    array = _to_numpy(boxes, name)
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"`{name}` must have shape (n, 4) absolute pixel xyxy; got shape {array.shape}.")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"`{name}` must be finite; box {bad} = {array[bad].tolist()}. Remove NaN/inf boxes.")
    inverted = (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1])
    if inverted.any():
        bad = int(np.flatnonzero(inverted)[0])
        raise ValueError(
            f"`{name}` must have x2 >= x1 and y2 >= y1; got box {bad} = {array[bad].tolist()}. "
            "Pass absolute pixel xyxy boxes (convert cxcywh or xywh first)."
        )
    return array


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _label_patch(text: str, color: tuple[int, int, int]) -> Image.Image:
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    patch = Image.new("RGB", (right - left + 4, bottom - top + 2), color)
    # Dark text on light colours and light text on dark ones keeps every label readable.
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    ImageDraw.Draw(patch).text((2 - left, 1 - top), text, fill=ink, font=font)
    return patch


def _draw_labelled_boxes(
    image: Image.Image,
    boxes: np.ndarray,
    colors: list[tuple[int, int, int]],
    texts: list[str | None],
    line_width: int,
) -> Image.Image:
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for box, color, text in zip(boxes, colors, texts):
        x1, y1 = max(int(round(box[0])), 0), max(int(round(box[1])), 0)
        x2, y2 = min(int(round(box[2])), width), min(int(round(box[3])), height)
        if x2 <= x1 or y2 <= y1:
            continue
        # PIL outlines grow inwards from the given corners, so the frame stays on the box's own pixels.
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=color, width=line_width)
        if text:
            # Labels are cropped to the box so a picture never marks pixels outside the regions it shows.
            patch = _label_patch(text, color)
            patch = patch.crop((0, 0, min(patch.width, x2 - x1), min(patch.height, y2 - y1)))
            canvas.paste(patch, (x1, y1))
    return canvas


def draw_boxes(
    image: Image.Image,
    boxes: object,
    labels: Sequence[str] | None = None,
    scores: object | None = None,
    *,
    line_width: int = 2,
) -> Image.Image:
    """Draw boxes (and their labels / scores) on a copy of ``image``.

    Args:
        image: the ``PIL.Image`` the boxes belong to (converted to RGB).
        boxes: ``(n, 4)`` absolute pixel xyxy of ``image`` (list, numpy or torch). Parts outside the image are
            clipped.
        labels: ``n`` strings drawn in the top-left corner inside each box, or ``None``.
        scores: ``(n,)`` floats appended to the labels as ``"label 0.87"``, or ``None``.
        line_width: outline width in pixels (>= 1), drawn inside the box.

    Returns:
        A new RGB image; box ``k`` is drawn in :func:`index_color` ``(k)``. Only pixels inside the boxes change.
    """
    image = _check_image(image)
    boxes = _check_boxes(boxes)
    count = boxes.shape[0]
    if labels is not None:
        if isinstance(labels, str) or len(labels) != count:
            raise ValueError(f"`labels` must be a list of {count} strings, one per box; got {labels!r}.")
    if scores is not None:
        scores = _to_numpy(scores, "scores").reshape(-1)
        if scores.shape[0] != count:
            raise ValueError(f"`scores` must have one value per box ({count}); got {scores.shape[0]}.")
    if isinstance(line_width, bool) or not isinstance(line_width, int) or line_width < 1:
        raise ValueError(f"`line_width` must be an int >= 1; got {line_width!r}.")
    texts: list[str | None] = []
    for k in range(count):
        parts = []
        if labels is not None:
            parts.append(str(labels[k]))
        if scores is not None:
            parts.append(f"{scores[k]:.2f}")
        texts.append(" ".join(parts) or None)
    return _draw_labelled_boxes(image, boxes, [index_color(k) for k in range(count)], texts, line_width)


def draw_masks(image: Image.Image, masks: object, alpha: float = 0.5) -> Image.Image:
    """Blend instance masks over a copy of ``image``.

    Args:
        image: ``PIL.Image`` of size ``(width, height)``.
        masks: ``(n, height, width)`` bool (or 0/1) masks in ``image``'s pixel grid (numpy or torch).
        alpha: opacity in ``[0, 1]`` of each mask colour; mask ``k`` is :func:`index_color` ``(k)``, later masks
            are blended over earlier ones.

    Returns:
        A new RGB image; a pixel covered by mask ``k`` alone becomes ``round((1 - alpha) * pixel + alpha * colour)``,
        pixels outside every mask are unchanged.
    """
    image = _check_image(image)
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    masks = np.asarray(masks)
    width, height = image.size
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != (height, width):
        raise ValueError(
            f"`masks` must have shape (n, {height}, {width}) to match the image (height, width); got {masks.shape}. "
            "Resize the masks to the image first."
        )
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise ValueError("`masks` must be bool or hold only 0 and 1; threshold soft masks first (masks > 0.5).")
        masks = masks.astype(bool)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be a float in [0, 1]; got {alpha!r}.")
    pixels = np.asarray(image, dtype=np.float64).copy()
    for k, mask in enumerate(masks):
        pixels[mask] = (1.0 - alpha) * pixels[mask] + alpha * np.asarray(index_color(k), dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def draw_grounding(image: Image.Image, grounding: Sequence[Mapping], *, line_width: int = 2) -> Image.Image:
    """Draw grounded phrases: every box of phrase ``k`` in :func:`index_color` ``(k)``, labelled with the phrase.

    Args:
        image: the ``PIL.Image`` the boxes belong to.
        grounding: a list of ``{"phrase": str, "boxes": (m, 4) absolute pixel xyxy}`` (what
            ``post_process_grounding`` returns for ``<p>phrase</p><roi><rA><rB></roi>``); ``m`` may be 0.
        line_width: outline width in pixels (>= 1).

    Returns:
        A new RGB image; only pixels inside the boxes change.
    """
    image = _check_image(image)
    if isinstance(grounding, (str, Mapping)) or not isinstance(grounding, Sequence):
        raise TypeError("`grounding` must be a list of {'phrase': str, 'boxes': (m, 4)} dicts.")
    all_boxes, colors, texts = [], [], []
    for k, item in enumerate(grounding):
        if not isinstance(item, Mapping) or "phrase" not in item or "boxes" not in item:
            raise ValueError(f"`grounding[{k}]` must be a dict with keys 'phrase' and 'boxes'; got {item!r}.")
        if not isinstance(item["phrase"], str):
            raise TypeError(f"`grounding[{k}]['phrase']` must be a str; got {type(item['phrase']).__name__}.")
        boxes = _check_boxes(item["boxes"], f"grounding[{k}]['boxes']")
        all_boxes.append(boxes)
        colors.extend([index_color(k)] * boxes.shape[0])
        texts.extend([item["phrase"]] * boxes.shape[0])
    if isinstance(line_width, bool) or not isinstance(line_width, int) or line_width < 1:
        raise ValueError(f"`line_width` must be an int >= 1; got {line_width!r}.")
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
    return _draw_labelled_boxes(image, boxes, colors, texts, line_width)


def _view_matrix(azimuth: float, elevation: float) -> np.ndarray:
    """Rows: screen right, screen up, depth away from the viewer, for a camera orbiting the z-up scene."""
    yaw, pitch = math.radians(azimuth), math.radians(elevation)
    right = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    forward = np.array([-math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), -math.sin(pitch)])
    up = np.cross(right, forward)
    return np.stack([right, up, forward])


_BOX_EDGES = ((0, 1), (1, 3), (3, 2), (2, 0), (4, 5), (5, 7), (7, 6), (6, 4), (0, 4), (1, 5), (2, 6), (3, 7))


def render_point_cloud(
    points: object,
    boxes_3d: object | None = None,
    size: int = 256,
    *,
    azimuth: float = 30.0,
    elevation: float = 25.0,
    point_radius: int = 1,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Render a point cloud (and axis-aligned 3D boxes) as a ``size`` x ``size`` picture.

    Orthographic view from a camera orbiting the z-up scene (``azimuth`` about z, ``elevation`` above the xy plane,
    in degrees); the view is fitted to the points and boxes. Each pixel shows its nearest point (a z-buffer, i.e.
    depth-sorted dots of ``point_radius``), so near surfaces hide far ones.

    Args:
        points: ``(N, 3)`` xyz or ``(N, 6)`` xyz + RGB in ``[0, 1]`` (numpy or torch). Without colours points are
            shaded by depth (near dark, far light).
        boxes_3d: ``(m, 6)`` ``center_xyz + size_xyz`` boxes in the frame of ``points``, drawn as wireframes in
            :func:`index_color` ``(k)``, or ``None``.
        size: picture side in pixels (>= 16).
        point_radius: dot half-width in pixels (0 draws single pixels).
        background: RGB of empty pixels.

    Returns:
        A new RGB ``PIL.Image`` of ``size`` x ``size``.
    """
    points = _to_numpy(points, "points")
    if points.ndim != 2 or points.shape[1] not in (3, 6) or points.shape[0] == 0:
        raise ValueError(f"`points` must have shape (N, 3) or (N, 6) with N >= 1; got {points.shape}.")
    if not np.isfinite(points).all():
        raise ValueError("`points` must be finite; drop NaN/inf points first.")
    if points.shape[1] == 6 and (points[:, 3:].min() < 0 or points[:, 3:].max() > 1):
        raise ValueError("`points` colours (columns 3-5) must be RGB in [0, 1]; divide 0-255 colours by 255.")
    boxes = np.zeros((0, 6)) if boxes_3d is None else _to_numpy(boxes_3d, "boxes_3d")
    if boxes.size == 0:
        boxes = np.zeros((0, 6))
    if boxes.ndim != 2 or boxes.shape[1] != 6 or not np.isfinite(boxes).all() or (boxes[:, 3:] < 0).any():
        raise ValueError(
            f"`boxes_3d` must be finite (m, 6) center_xyz + size_xyz with sizes >= 0; got shape {boxes.shape}."
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"`size` must be an int >= 16; got {size!r}.")
    if isinstance(point_radius, bool) or not isinstance(point_radius, int) or not 0 <= point_radius <= 8:
        raise ValueError(f"`point_radius` must be an int in [0, 8]; got {point_radius!r}.")

    view = _view_matrix(azimuth, elevation)
    signs = np.array([[sx, sy, sz] for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    corners = (boxes[:, None, :3] + signs[None] * boxes[:, None, 3:]).reshape(-1, 3)
    camera_points = points[:, :3] @ view.T
    camera_corners = corners @ view.T
    extent_points = np.concatenate([camera_points[:, :2], camera_corners[:, :2]])
    low, high = extent_points.min(axis=0), extent_points.max(axis=0)
    margin = 0.06 * size + point_radius
    scale = (size - 1 - 2 * margin) / max(float((high - low).max()), 1e-9)
    offset = (size - 1) / 2 - scale * (low + high) / 2 * np.array([1.0, -1.0])

    def to_pixels(camera: np.ndarray) -> np.ndarray:
        return camera[:, :2] * np.array([scale, -scale]) + offset

    pixel_xy = np.rint(to_pixels(camera_points)).astype(np.int64)
    depth = camera_points[:, 2]
    if points.shape[1] == 6:
        colors = np.rint(points[:, 3:] * 255)
    else:
        span = max(float(depth.max() - depth.min()), 1e-9)
        shade = (depth - depth.min()) / span
        colors = np.rint(np.stack([30 + 150 * shade, 60 + 140 * shade, 120 + 110 * shade], axis=1))

    offsets = np.array(
        [(dx, dy) for dx in range(-point_radius, point_radius + 1) for dy in range(-point_radius, point_radius + 1)]
    )
    splat_xy = (pixel_xy[:, None, :] + offsets[None]).reshape(-1, 2)
    splat_depth = np.repeat(depth, len(offsets))
    splat_source = np.repeat(np.arange(points.shape[0]), len(offsets))
    inside = (splat_xy >= 0).all(axis=1) & (splat_xy < size).all(axis=1)
    splat_xy, splat_depth, splat_source = splat_xy[inside], splat_depth[inside], splat_source[inside]
    flat = splat_xy[:, 1] * size + splat_xy[:, 0]
    # Sort by pixel, then by depth: the first entry of each pixel is its nearest point, whatever the input order.
    order = np.lexsort((splat_source, splat_depth, flat))
    flat, splat_source = flat[order], splat_source[order]
    first = np.concatenate(([True], flat[1:] != flat[:-1]))
    canvas = np.empty((size * size, 3), dtype=np.uint8)
    canvas[:] = np.asarray(background, dtype=np.uint8)
    canvas[flat[first]] = colors[splat_source[first]].astype(np.uint8)
    picture = Image.fromarray(canvas.reshape(size, size, 3))

    if boxes.shape[0]:
        draw = ImageDraw.Draw(picture)
        corner_pixels = to_pixels(camera_corners).reshape(-1, 8, 2)
        for k, box_corners in enumerate(corner_pixels):
            for a, b in _BOX_EDGES:
                draw.line([tuple(box_corners[a]), tuple(box_corners[b])], fill=index_color(k), width=1)
    return picture
