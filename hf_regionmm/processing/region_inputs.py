"""Checking and converting the region prompts users hand to a processor: boxes and points.

Every processor in this package follows one convention (DESIGN.md, principle 3): boxes go in as absolute pixel
``xyxy`` of the *original* image, points as absolute pixel ``(x, y)``, nested per image. Groma (section 3.2) and
RegionBLIP take boxes, TAP-v2 (section 3.1) takes point and box prompts, u-LLaVA returns boxes. This module turns
lists, numpy arrays or tensors into float tensors and rejects bad input with a message that names the argument,
the image and the box or point, and says the fix -- before anything reaches the model.

It is the processor-side counterpart of ``modeling/box_ops.py`` and, like every file in ``processing/``, imports
nothing from ``modeling/`` so it can be copied to the Hub as remote code on its own.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["PointPrompts", "validate_image_sizes", "validate_pixel_boxes", "rescale_boxes", "validate_points"]

# Boxes and points may overshoot the image by this many pixels (rounding in annotation tools) before being rejected.
_PIXEL_TOLERANCE = 1.0


def _format_values(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{value:.6g}" for value in values.tolist()) + "]"


def _as_float_tensor(value: Any, where: str, expected: str) -> torch.Tensor:
    """Convert a list / numpy array / tensor of numbers to a CPU float32 tensor, or raise naming ``where``."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"`{where}` must hold real numbers; got a {value.dtype} tensor. Pass {expected}.")
        # Copy: the returned boxes must never alias the caller's tensor.
        return value.detach().to(device="cpu", dtype=torch.float32).clone()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise TypeError(
                f"`{where}` must hold real numbers; got a numpy array of dtype {value.dtype}. Pass {expected}."
            )
        return torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    if isinstance(value, (list, tuple)):
        try:
            return torch.as_tensor(value, dtype=torch.float32)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ValueError(
                f"`{where}` could not be read as numbers ({error}); pass {expected}, with the same count of numbers "
                f"in every entry."
            ) from None
    raise TypeError(f"`{where}` must be a list, numpy array or tensor; got {type(value).__name__}. Pass {expected}.")


def validate_image_sizes(image_sizes: Any, name: str = "image_sizes") -> list[tuple[int, int]]:
    """Check ``image_sizes[i] = (height, width)`` (positive integers) and return them as a list of int tuples."""
    if isinstance(image_sizes, (torch.Tensor, np.ndarray)):
        image_sizes = image_sizes.tolist()
    if not isinstance(image_sizes, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of (height, width) pairs, one per image; got {type(image_sizes)}.")
    sizes = []
    for index, size in enumerate(image_sizes):
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(side, numbers.Integral) and not isinstance(side, bool) and side > 0 for side in size)
        ):
            raise ValueError(f"`{name}[{index}]` must be (height, width) with two positive integers; got {size!r}.")
        sizes.append((int(size[0]), int(size[1])))
    return sizes


def _split_per_image(values: Any, name: str, num_images: int, array_rank: int, layout: str) -> list[Any]:
    """Split a nested list or a stacked array into one entry per image, checking the batch length."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != array_rank:
            raise ValueError(
                f"`{name}` given as an array must have shape {layout}; got shape {tuple(values.shape)}. "
                f"For a single image add the batch dimension (e.g. `{name}[None]`)."
            )
        values = list(values)
    elif not isinstance(values, (list, tuple)):
        raise TypeError(f"`{name}` must be a list with one entry per image, or an array {layout}; got {type(values)}.")
    if len(values) != num_images:
        raise ValueError(
            f"`{name}` has {len(values)} entries but there are {num_images} images; nest it per image as "
            f"`{name}[image][...]` (use None or [] for an image without prompts). For one image, wrap it in a list."
        )
    return list(values)


def validate_pixel_boxes(
    boxes: Any,
    image_sizes: list[tuple[int, int]],
    name: str = "boxes",
    *,
    max_boxes: int | None = None,
) -> list[torch.Tensor]:
    """Check user boxes against their images and return them as float tensors.

    Args:
        boxes: ``None`` (no boxes anywhere), or one entry per image: ``None`` / ``[]`` or a nested list
            ``boxes[image][box] = [x1, y1, x2, y2]`` / numpy array / tensor ``(n_i, 4)``; or a stacked
            ``(B, n, 4)`` array. Absolute pixel xyxy of the *original* image.
        image_sizes: ``(height, width)`` of each original image.
        name: argument name used in error messages.
        max_boxes: the number of region slots the model has; more boxes per image raise.

    Returns:
        ``B`` float32 CPU tensors ``(n_i, 4)``, absolute pixel xyxy, clipped to the image (boxes may overshoot it by
        up to 1 pixel before they are rejected).

    Raises:
        TypeError / ValueError: wrong nesting or batch length, not 4 numbers per box, NaN or inf, ``x2 <= x1`` or
        ``y2 <= y1``, a box outside its image, boxes that all look normalized to ``[0, 1]``, or more than
        ``max_boxes`` boxes in an image.
    """
    sizes = validate_image_sizes(image_sizes)
    if max_boxes is not None and (
        not isinstance(max_boxes, numbers.Integral) or isinstance(max_boxes, bool) or max_boxes < 0
    ):
        raise ValueError(f"`max_boxes` must be a non-negative integer or None; got {max_boxes!r}.")
    if boxes is None:
        return [torch.zeros((0, 4), dtype=torch.float32) for _ in sizes]
    per_image = _split_per_image(boxes, name, len(sizes), 3, "(batch, num_boxes, 4)")

    validated = []
    for image_index, (image_boxes, (height, width)) in enumerate(zip(per_image, sizes)):
        where = f"{name}[{image_index}]"
        if image_boxes is None:
            validated.append(torch.zeros((0, 4), dtype=torch.float32))
            continue
        tensor = _as_float_tensor(image_boxes, where, "a list of [x1, y1, x2, y2] boxes")
        if tensor.numel() == 0:
            validated.append(torch.zeros((0, 4), dtype=torch.float32))
            continue
        if tensor.ndim == 1 and tensor.shape[0] == 4:
            raise ValueError(
                f"`{where}` is a single box {_format_values(tensor)}, but each image needs a list of boxes; "
                f"wrap it: `{name}=[[[x1, y1, x2, y2]]]` for one box in one image."
            )
        if tensor.ndim != 2 or tensor.shape[1] != 4:
            raise ValueError(
                f"`{where}` must be a list of boxes with 4 numbers [x1, y1, x2, y2] each (shape (n, 4)); "
                f"got shape {tuple(tensor.shape)}."
            )
        if max_boxes is not None and tensor.shape[0] > max_boxes:
            raise ValueError(
                f"`{where}` has {tensor.shape[0]} boxes but the model has only {max_boxes} region slots; "
                f"pass at most {max_boxes} boxes per image."
            )
        # A few boxes per image: the checks run on Python floats (a tensor op per check costs more than the loop).
        rows = tensor.tolist()
        for box_index, (x1, y1, x2, y2) in enumerate(rows):
            problem = None
            if not all(math.isfinite(value) for value in (x1, y1, x2, y2)):
                problem = "contains NaN or inf; every coordinate must be a finite number."
            elif x2 <= x1 or y2 <= y1:
                problem = (
                    "must have x2 > x1 and y2 > y1. Pass absolute pixel xyxy boxes (x1, y1, x2, y2); convert "
                    "(x, y, w, h) boxes with x2 = x + w, y2 = y + h."
                )
            elif (
                x1 < -_PIXEL_TOLERANCE
                or y1 < -_PIXEL_TOLERANCE
                or x2 > width + _PIXEL_TOLERANCE
                or y2 > height + _PIXEL_TOLERANCE
            ):
                problem = (
                    f"lies outside image {image_index} of size (height={height}, width={width}). Pass absolute "
                    "pixel xyxy coordinates of the original image."
                )
            if problem is not None:
                raise ValueError(f"`{where}[{box_index}]` = {_format_values(tensor[box_index])} {problem}")
        if max(height, width) > 2 and all(value <= 1.0 for row in rows for value in row):
            raise ValueError(
                f"`{where}` = {rows} looks normalized to [0, 1], but boxes must be absolute pixel xyxy of "
                f"the {width}x{height} image; multiply x by the width and y by the height."
            )
        tensor = torch.tensor(
            [
                [
                    min(max(x1, 0.0), width),
                    min(max(y1, 0.0), height),
                    min(max(x2, 0.0), width),
                    min(max(y2, 0.0), height),
                ]
                for x1, y1, x2, y2 in rows
            ],
            dtype=torch.float32,
        )
        validated.append(tensor)
    return validated


def rescale_boxes(boxes: Any, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Map xyxy pixel boxes from an image of ``from_size`` to one of ``to_size`` (both ``(height, width)``).

    Args:
        boxes: ``(n, 4)`` (or ``(..., 4)``) absolute pixel xyxy in the ``from_size`` frame; tensor, array or list.
        from_size, to_size: ``(height, width)`` of the source and destination frames, e.g. the original image and
            the resized model input.

    Returns:
        ``(..., 4)`` boxes in the ``to_size`` frame; float dtype of ``boxes`` if it is a float tensor, else float32.
    """
    for size_name, size in (("from_size", from_size), ("to_size", to_size)):
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(
                isinstance(side, numbers.Real) and not isinstance(side, bool) and math.isfinite(side) and side > 0
                for side in size
            )
        ):
            raise ValueError(f"`{size_name}` must be (height, width) with two positive numbers; got {size!r}.")
    if isinstance(boxes, torch.Tensor) and boxes.is_floating_point():
        tensor = boxes
    else:
        tensor = _as_float_tensor(boxes, "boxes", "(n, 4) xyxy boxes")
    if tensor.ndim == 0 or tensor.shape[-1] != 4:
        raise ValueError(f"`boxes` must have shape (n, 4); got {tuple(tensor.shape)}.")
    scale_y = to_size[0] / from_size[0]
    scale_x = to_size[1] / from_size[1]
    scale = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=tensor.dtype, device=tensor.device)
    return tensor * scale


class PointPrompts(NamedTuple):
    """Point prompts padded to one tensor.

    Attributes:
        points: ``(B, max_objects, max_points, 2)`` float32 absolute pixel ``(x, y)`` of the original image;
            padding holds the pad value.
        labels: ``(B, max_objects, max_points)`` int64 point labels; padding holds the pad value (-10).
        mask: ``(B, max_objects, max_points)`` bool, True for a real point. An object exists where
            ``mask.any(-1)``.
    """

    points: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor


def validate_points(
    points: Any,
    labels: Any,
    image_sizes: list[tuple[int, int]],
    name: str = "points",
    *,
    labels_name: str = "labels",
    allowed_labels: tuple[int, ...] | None = None,
    max_objects: int | None = None,
    pad_value: int = -10,
) -> PointPrompts:
    """Check point prompts and pad them into tensors.

    Args:
        points: ``None`` (no prompts) or one entry per image: ``None`` / ``[]`` or ``points[image][object][point] =
            [x, y]`` (lists, arrays or tensors; an image entry may be an ``(objects, points, 2)`` array), or a stacked
            ``(B, objects, points, 2)`` array. Absolute pixel coordinates of the original image.
        labels: same nesting, one integer per point (e.g. SAM / TAP: 1 foreground, 0 background, 2 / 3 box
            corners), or ``None`` to label every point 1 (foreground).
        image_sizes: ``(height, width)`` of each original image.
        name, labels_name: argument names used in error messages.
        allowed_labels: if given, every label must be one of these.
        max_objects: the most objects (prompts) per image the model accepts.
        pad_value: fill value of padded points and labels (-10, as in transformers' SAM processor); a real label may
            not use it.

    Returns:
        :class:`PointPrompts` ``(points, labels, mask)``, padded to the most objects per image and the most points
        per object in the batch. With no prompts at all the shapes are ``(B, 0, 0, 2)`` and ``(B, 0, 0)``.

    Raises:
        TypeError / ValueError: wrong nesting or batch length, a point that is not 2 numbers, an object with no
        points, labels that do not match the points or are not integers, NaN or inf, points outside the image
        (tolerance 1 pixel), or too many objects.
    """
    sizes = validate_image_sizes(image_sizes)
    if max_objects is not None and (
        not isinstance(max_objects, numbers.Integral) or isinstance(max_objects, bool) or max_objects < 0
    ):
        raise ValueError(f"`max_objects` must be a non-negative integer or None; got {max_objects!r}.")
    if points is None:
        if labels is not None:
            raise ValueError(f"`{labels_name}` was given without `{name}`; pass the points the labels belong to.")
        per_image_points: list[Any] = [None] * len(sizes)
    else:
        per_image_points = _split_per_image(points, name, len(sizes), 4, "(batch, objects, points, 2)")
    per_image_labels = (
        [None] * len(sizes)
        if labels is None
        else _split_per_image(labels, labels_name, len(sizes), 3, "(batch, objects, points)")
    )

    images: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for image_index, (image_points, (height, width)) in enumerate(zip(per_image_points, sizes)):
        where = f"{name}[{image_index}]"
        label_where = f"{labels_name}[{image_index}]"
        image_labels = per_image_labels[image_index]
        if image_points is not None and not isinstance(image_points, (list, tuple, np.ndarray, torch.Tensor)):
            raise TypeError(
                f"`{where}` must be a list of objects, each a list of [x, y] points; got {type(image_points).__name__}."
            )
        if image_points is None or len(image_points) == 0:
            if labels is not None and image_labels is not None and len(image_labels) != 0:
                raise ValueError(f"`{label_where}` has labels but `{where}` has no points; they must match.")
            images.append([])
            continue
        if labels is not None and (image_labels is None or len(image_labels) != len(image_points)):
            count = 0 if image_labels is None else len(image_labels)
            raise ValueError(
                f"`{where}` has {len(image_points)} objects but `{label_where}` has {count}; give one list of labels "
                f"per object."
            )
        if max_objects is not None and len(image_points) > max_objects:
            raise ValueError(
                f"`{where}` has {len(image_points)} objects but the model takes at most {max_objects} prompts per "
                f"image; split them over several calls."
            )
        objects = []
        for object_index in range(len(image_points)):
            object_where = f"{where}[{object_index}]"
            object_points = _as_float_tensor(image_points[object_index], object_where, "a list of [x, y] points")
            if object_points.numel() == 0:
                raise ValueError(f"`{object_where}` has no points; every object needs at least one point.")
            if object_points.ndim == 1 and object_points.shape[0] == 2:
                raise ValueError(
                    f"`{object_where}` is a single point {_format_values(object_points)}, but each object needs a list "
                    f"of points; wrap it: [[x, y]]."
                )
            if object_points.ndim != 2 or object_points.shape[1] != 2:
                raise ValueError(
                    f"`{object_where}` must be a list of points with 2 numbers [x, y] each (shape (p, 2)); got shape "
                    f"{tuple(object_points.shape)}."
                )
            # Python floats: a tensor op per point costs more than the check; only a failing point is formatted.
            for point_index, (x, y) in enumerate(object_points.tolist()):
                problem = None
                if not (math.isfinite(x) and math.isfinite(y)):
                    problem = "contains NaN or inf; every coordinate must be a finite number."
                elif not (
                    -_PIXEL_TOLERANCE <= x <= width + _PIXEL_TOLERANCE
                    and -_PIXEL_TOLERANCE <= y <= height + _PIXEL_TOLERANCE
                ):
                    problem = (
                        f"lies outside image {image_index} of size (height={height}, width={width}). Pass absolute "
                        "pixel (x, y) coordinates of the original image."
                    )
                if problem is not None:
                    raise ValueError(
                        f"`{object_where}[{point_index}]` = {_format_values(object_points[point_index])} {problem}"
                    )
            object_labels = _object_labels(
                None if labels is None else image_labels[object_index],
                f"{label_where}[{object_index}]",
                object_points.shape[0],
                allowed_labels,
                pad_value,
            )
            objects.append((object_points, object_labels))
        images.append(objects)

    max_num_objects = max((len(objects) for objects in images), default=0)
    max_num_points = max((points.shape[0] for objects in images for points, _ in objects), default=0)
    batch_size = len(sizes)
    padded_points = torch.full((batch_size, max_num_objects, max_num_points, 2), float(pad_value))
    padded_labels = torch.full((batch_size, max_num_objects, max_num_points), pad_value, dtype=torch.long)
    mask = torch.zeros((batch_size, max_num_objects, max_num_points), dtype=torch.bool)
    for image_index, objects in enumerate(images):
        for object_index, (object_points, object_labels) in enumerate(objects):
            num_points = object_points.shape[0]
            padded_points[image_index, object_index, :num_points] = object_points
            padded_labels[image_index, object_index, :num_points] = object_labels
            mask[image_index, object_index, :num_points] = True
    return PointPrompts(padded_points, padded_labels, mask)


def _object_labels(
    object_labels: Any,
    where: str,
    num_points: int,
    allowed_labels: tuple[int, ...] | None,
    pad_value: int,
) -> torch.Tensor:
    """Check one object's labels (or default them to foreground) and return an int64 ``(num_points,)`` tensor."""
    if object_labels is None:
        return torch.ones(num_points, dtype=torch.long)
    tensor = _as_float_tensor(object_labels, where, "one integer label per point")
    if tensor.ndim == 0:
        tensor = tensor.reshape(1)
    if tuple(tensor.shape) != (num_points,):
        raise ValueError(f"`{where}` must hold one label per point ({num_points}); got shape {tuple(tensor.shape)}.")
    if not bool(torch.isfinite(tensor).all()) or not bool((tensor == tensor.round()).all()):
        raise ValueError(f"`{where}` = {_format_values(tensor)} must be integers (e.g. 1 foreground, 0 background).")
    integer_labels = tensor.long()
    if bool((integer_labels == pad_value).any()):
        raise ValueError(f"`{where}` uses {pad_value}, which is reserved for padding; use a different label.")
    if allowed_labels is not None:
        unknown = sorted({int(label) for label in integer_labels.tolist()} - {int(label) for label in allowed_labels})
        if unknown:
            raise ValueError(f"`{where}` has labels {unknown}; allowed labels are {sorted(allowed_labels)}.")
    return integer_labels
