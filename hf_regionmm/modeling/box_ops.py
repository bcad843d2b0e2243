"""Box formats, validation and overlap measures shared by every region model in this package.

Groma (proposer boxes, region encoder, grounding output), RegionBLIP (PaFE on normalized xyxy image boxes),
TAP-v2 (box prompts) and u-LLaVA ([LOC] decoder) all move boxes between three frames:

* absolute pixel ``xyxy`` of some image (the original image, or the resized model input),
* normalized ``xyxy`` in ``[0, 1]`` (divided by width / height),
* normalized ``cxcywh`` (what Deformable-DETR heads predict, Groma section 3.1).

The arithmetic is thin over ``torchvision.ops``; what this module adds is one place that checks boxes and says
what is wrong with them (which box, which value, and how to fix it) before they reach a kernel that would fail
with a shape error or silently produce NaN.
"""

from __future__ import annotations

import math
import numbers

import torch
from torchvision.ops import box_convert
from torchvision.ops import box_iou as _tv_box_iou
from torchvision.ops import clip_boxes_to_image as _tv_clip_boxes_to_image
from torchvision.ops import generalized_box_iou as _tv_generalized_box_iou

__all__ = [
    "validate_boxes",
    "validate_image_size",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "normalize_boxes",
    "denormalize_boxes",
    "clip_boxes",
    "box_area",
    "box_iou",
    "generalized_box_iou",
]

_BOX_FORMATS = ("xyxy", "cxcywh")


def _box_position(flat_index: int, leading_shape: torch.Size) -> str:
    """Human-readable position of box ``flat_index`` in a tensor with leading dims ``leading_shape``."""
    if len(leading_shape) == 0:
        return "the box"
    if len(leading_shape) == 1:
        return f"box {flat_index}"
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), leading_shape))
    return f"box {position}"


def _format_box(box: torch.Tensor) -> str:
    return "[" + ", ".join(f"{value:.6g}" for value in box.tolist()) + "]"


def validate_boxes(
    boxes: torch.Tensor,
    name: str = "boxes",
    *,
    allow_empty: bool = True,
    require_positive_area: bool = False,
    fmt: str = "xyxy",
) -> torch.Tensor:
    """Check that ``boxes`` is a well-formed box tensor and return it unchanged.

    Args:
        boxes: ``(4,)``, ``(N, 4)`` or ``(B, N, 4)`` floating tensor in any frame (pixel or normalized).
        name: argument name used in error messages.
        allow_empty: whether a tensor with zero boxes (e.g. ``(0, 4)``) is accepted.
        require_positive_area: also reject boxes with zero width or height.
        fmt: ``"xyxy"`` (checks ``x2 >= x1`` and ``y2 >= y1``) or ``"cxcywh"`` (checks ``w >= 0`` and ``h >= 0``).

    Returns:
        ``boxes`` itself, so calls can be chained.

    Raises:
        TypeError: ``boxes`` is not a tensor or not floating point.
        ValueError: wrong rank / last dim, NaN or inf, inverted or (with ``require_positive_area``) degenerate
            boxes, or no boxes when ``allow_empty=False``. The message names ``name``, the offending box and the fix.
    """
    if fmt not in _BOX_FORMATS:
        raise ValueError(f"`fmt` must be one of {_BOX_FORMATS}; got {fmt!r}.")
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape (N, 4) or (B, N, 4); got {type(boxes).__name__}. "
            f"Convert it with torch.as_tensor({name}, dtype=torch.float32)."
        )
    if not boxes.is_floating_point():
        raise TypeError(
            f"`{name}` must be a floating point tensor; got dtype {boxes.dtype}. Convert it with `{name}.float()`."
        )
    if boxes.ndim not in (1, 2, 3) or boxes.shape[-1] != 4:
        raise ValueError(
            f"`{name}` must have shape (4,), (N, 4) or (B, N, 4) with 4 coordinates ({fmt}) in the last dim; "
            f"got shape {tuple(boxes.shape)}."
        )
    leading_shape = boxes.shape[:-1]
    if boxes.numel() == 0:
        if not allow_empty:
            raise ValueError(f"`{name}` is empty (shape {tuple(boxes.shape)}); pass at least one box.")
        return boxes

    flat = boxes.detach().reshape(-1, 4)
    finite = torch.isfinite(flat).all(dim=-1)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"`{name}` contains NaN or inf: {_box_position(index, leading_shape)} = {_format_box(flat[index])}. "
            f"Remove or fix non-finite boxes before passing them."
        )

    if fmt == "xyxy":
        widths, heights = flat[:, 2] - flat[:, 0], flat[:, 3] - flat[:, 1]
        fix = (
            "Pass xyxy boxes (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; if they are (cx, cy, w, h), convert them "
            "with box_cxcywh_to_xyxy first."
        )
        rule = "x2 >= x1 and y2 >= y1"
    else:
        widths, heights = flat[:, 2], flat[:, 3]
        fix = "Pass cxcywh boxes (cx, cy, w, h) with non-negative width and height."
        rule = "w >= 0 and h >= 0"
    inverted = (widths < 0) | (heights < 0)
    if bool(inverted.any()):
        index = int(inverted.nonzero()[0, 0])
        raise ValueError(
            f"`{name}` must have {rule}; got {_box_position(index, leading_shape)} = {_format_box(flat[index])}. {fix}"
        )
    if require_positive_area:
        degenerate = (widths <= 0) | (heights <= 0)
        if bool(degenerate.any()):
            index = int(degenerate.nonzero()[0, 0])
            raise ValueError(
                f"`{name}` must have positive width and height; got {_box_position(index, leading_shape)} = "
                f"{_format_box(flat[index])} with zero area. Drop degenerate boxes or enlarge them."
            )
    return boxes


def validate_image_size(image_size: tuple[int, int], name: str = "image_size") -> tuple[int, int]:
    """Check an image size given as ``(height, width)`` of positive numbers and return it as a tuple."""
    if isinstance(image_size, torch.Tensor):
        image_size = tuple(image_size.tolist())
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(side, numbers.Real) and not isinstance(side, bool) for side in image_size)
        or not all(math.isfinite(side) and side > 0 for side in image_size)
    ):
        raise ValueError(f"`{name}` must be (height, width) with two positive numbers; got {image_size!r}.")
    return (image_size[0], image_size[1])


def _apply_to_last_dim(boxes: torch.Tensor, function, *args) -> torch.Tensor:
    """Run a torchvision (N, 4) box function on a tensor with any leading dims."""
    return function(boxes.reshape(-1, 4), *args).reshape(boxes.shape)


def _check_last_dim_4(boxes: torch.Tensor, name: str) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (..., 4); got {type(boxes).__name__}.")
    if not boxes.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor; got {boxes.dtype}. Use `{name}.float()`.")
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"`{name}` must have shape (..., 4); got {tuple(boxes.shape)}.")


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` boxes ``(cx, cy, w, h)`` -> ``(..., 4)`` boxes ``(x1, y1, x2, y2)`` in the same frame and dtype.

    Only the shape is checked: converters sit in loss and decoding hot paths, where a value check would force a
    host synchronisation. Call :func:`validate_boxes` on user input.
    """
    _check_last_dim_4(boxes, "boxes")
    return _apply_to_last_dim(boxes, box_convert, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` boxes ``(x1, y1, x2, y2)`` -> ``(..., 4)`` boxes ``(cx, cy, w, h)`` in the same frame and dtype.

    Inverted boxes (``x2 < x1``) convert to a negative width rather than raising (see :func:`box_cxcywh_to_xyxy`).
    """
    _check_last_dim_4(boxes, "boxes")
    return _apply_to_last_dim(boxes, box_convert, "xyxy", "cxcywh")


def _scale_vector(image_size: tuple[int, int], boxes: torch.Tensor) -> torch.Tensor:
    height, width = validate_image_size(image_size)
    return torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)


def normalize_boxes(boxes_xyxy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Absolute pixel ``(..., 4)`` xyxy boxes -> xyxy normalized by ``image_size = (height, width)`` to ``[0, 1]``.

    Boxes outside the image map outside ``[0, 1]``; clip first with :func:`clip_boxes` if that is not wanted.
    """
    _check_last_dim_4(boxes_xyxy, "boxes_xyxy")
    return boxes_xyxy / _scale_vector(image_size, boxes_xyxy)


def denormalize_boxes(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Normalized ``(..., 4)`` xyxy boxes -> absolute pixel xyxy of an image of ``image_size = (height, width)``."""
    _check_last_dim_4(boxes, "boxes")
    return boxes * _scale_vector(image_size, boxes)


def clip_boxes(boxes_xyxy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Clamp ``(..., 4)`` absolute pixel xyxy boxes into ``[0, width] x [0, height]``; ``image_size = (h, w)``."""
    _check_last_dim_4(boxes_xyxy, "boxes_xyxy")
    return _tv_clip_boxes_to_image(boxes_xyxy, validate_image_size(image_size))


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of ``(..., 4)`` xyxy boxes, shape ``(...)``, in squared units of the frame."""
    _check_last_dim_4(boxes_xyxy, "boxes_xyxy")
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def _check_pair(boxes_a: torch.Tensor, boxes_b: torch.Tensor, validate: bool) -> None:
    for name, boxes in (("boxes_a", boxes_a), ("boxes_b", boxes_b)):
        _check_last_dim_4(boxes, name)
        if boxes.ndim != 2:
            raise ValueError(f"`{name}` must have shape (N, 4); got {tuple(boxes.shape)}. Flatten batch dims first.")
        if validate:
            validate_boxes(boxes, name)


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes ``boxes_a (N, 4)`` and ``boxes_b (M, 4)`` in the same frame -> ``(N, M)``.

    ``validate=False`` skips the (host-synchronising) box checks in hot loops where boxes are valid by construction.
    """
    _check_pair(boxes_a, boxes_b, validate)
    return _tv_box_iou(boxes_a, boxes_b)


def generalized_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of xyxy ``(N, 4)`` and ``(M, 4)`` boxes -> ``(N, M)``.

    Values lie in ``[-1, 1]``; differentiable w.r.t. both inputs. Two zero-area boxes give NaN, as in torchvision.
    """
    _check_pair(boxes_a, boxes_b, validate)
    return _tv_generalized_box_iou(boxes_a, boxes_b)
