"""Multi-scale RoIAlign: one fixed-size feature grid per box per feature level.

This is the pooling half of Groma's region encoder (section 3.1, "Region Encoder"): the released
``MlvlRoIExtractor`` runs mmcv ``RoIAlign(output_size=14, sampling_ratio=2, aligned=True)`` on three feature maps
with ``spatial_scale = 1 / stride``. ``torchvision.ops.roi_align`` with the same arguments matches the mmcv kernel,
so the learned per-level convolutions, the level fusion and the projection stay in the model file and this module
only gathers features.

Box validity is deliberately *not* enforced. The released Groma checkpoint feeds normalized ``cxcywh * 448`` boxes
where RoIAlign expects ``x1, y1, x2, y2`` (Groma issues #11 and #21), so most "boxes" it sees have x2 < x1 or
y2 < y1 and the kernel samples backwards from the start corner. The checkpoint was trained that way and retraining
with proper xyxy boxes scored lower, so a weight-compatible port must pass such boxes through unchanged.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align

__all__ = ["MultiScaleRoIAlign"]


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign every box on every feature level and stack the results.

    Args:
        output_size: side ``s`` of the square output grid per box and level (Groma: 14).
        spatial_scales: one scale per level; a box coordinate ``v`` lands at feature coordinate ``v * scale`` on that
            level (Groma: ``(8 / 14, 4 / 14, 2 / 14)`` for boxes in the 448-pixel frame).
        sampling_ratio: bilinear samples per bin side (Groma: 2); ``<= 0`` lets the kernel choose adaptively.
        aligned: shift boxes by -0.5 feature pixel so that pixel centres line up (Detectron2 / mmcv ``aligned=True``).
    """

    def __init__(
        self,
        output_size: int = 14,
        spatial_scales: Sequence[float] = (1.0,),
        sampling_ratio: int = 2,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(output_size, numbers.Integral) or isinstance(output_size, bool) or output_size < 1:
            raise ValueError(f"`output_size` must be an integer >= 1; got {output_size!r}.")
        if isinstance(spatial_scales, (int, float)) or not isinstance(spatial_scales, Sequence):
            raise TypeError(
                f"`spatial_scales` must be a sequence with one float per feature level, e.g. (0.25,); "
                f"got {spatial_scales!r}."
            )
        if len(spatial_scales) == 0 or not all(
            isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0 for scale in spatial_scales
        ):
            raise ValueError(
                f"`spatial_scales` must hold at least one positive finite number per level; got {spatial_scales!r}."
            )
        if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
            raise ValueError(f"`sampling_ratio` must be an integer (<= 0 means adaptive); got {sampling_ratio!r}.")
        self.output_size = int(output_size)
        self.spatial_scales = tuple(float(scale) for scale in spatial_scales)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    @property
    def num_levels(self) -> int:
        return len(self.spatial_scales)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scales={self.spatial_scales}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )

    def _check_inputs(self, features: Sequence[torch.Tensor], boxes: list[torch.Tensor]) -> None:
        if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
            raise TypeError(
                "`features` must be a list with one (B, C, H_l, W_l) tensor per level; "
                f"got {type(features).__name__}. Wrap a single map as [features]."
            )
        if len(features) != self.num_levels:
            raise ValueError(
                f"`features` has {len(features)} levels but `spatial_scales` has {self.num_levels}; "
                f"pass one feature map per scale."
            )
        for level, feature in enumerate(features):
            if not isinstance(feature, torch.Tensor) or feature.ndim != 4:
                raise ValueError(
                    f"`features[{level}]` must be a (B, C, H, W) tensor; got "
                    f"{tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__}."
                )
            if not feature.is_floating_point():
                raise TypeError(f"`features[{level}]` must be floating point; got {feature.dtype}.")
            if feature.shape[:2] != features[0].shape[:2]:
                raise ValueError(
                    f"`features[{level}]` has batch and channels {tuple(feature.shape[:2])} but `features[0]` has "
                    f"{tuple(features[0].shape[:2])}; every level needs the same B and C."
                )
        batch_size = features[0].shape[0]
        if isinstance(boxes, torch.Tensor) or not isinstance(boxes, Sequence):
            raise TypeError(
                f"`boxes` must be a list with one (n_i, 4) tensor per image; got {type(boxes).__name__}. "
                f"Split a (B, N, 4) tensor with list(boxes)."
            )
        if len(boxes) != batch_size:
            raise ValueError(f"`boxes` has {len(boxes)} entries but the features have batch size {batch_size}.")
        for index, image_boxes in enumerate(boxes):
            if not isinstance(image_boxes, torch.Tensor):
                raise TypeError(
                    f"`boxes[{index}]` must be a tensor of shape (n, 4); got {type(image_boxes).__name__}."
                )
            if not image_boxes.is_floating_point():
                raise TypeError(f"`boxes[{index}]` must be floating point; got {image_boxes.dtype}. Use `.float()`.")
            if image_boxes.ndim != 2 or image_boxes.shape[-1] != 4:
                raise ValueError(f"`boxes[{index}]` must have shape (n, 4); got {tuple(image_boxes.shape)}.")
            if not bool(torch.isfinite(image_boxes).all()):
                raise ValueError(f"`boxes[{index}]` contains NaN or inf; RoIAlign needs finite coordinates.")

    def forward(self, features: Sequence[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """Pool ``output_size x output_size`` features for every box on every level.

        Args:
            features: ``L`` float tensors ``(B, C, H_l, W_l)``, one per level, same ``B`` and ``C``.
            boxes: ``B`` float tensors ``(n_i, 4)``, ``(x1, y1, x2, y2)`` in the frame that ``spatial_scales[l]``
                maps onto level ``l`` (feature coordinate = box coordinate * scale). Inverted boxes are allowed
                (see the module docstring).

        Returns:
            ``(sum_i n_i, L, C, output_size, output_size)`` in the dtype of ``features``, boxes in image order.
            Gradients flow to ``features`` (not to ``boxes``).
        """
        self._check_inputs(features, boxes)
        reference = features[0]
        num_boxes = sum(image_boxes.shape[0] for image_boxes in boxes)
        if num_boxes == 0:
            return reference.new_zeros((0, self.num_levels, reference.shape[1], self.output_size, self.output_size))
        pooled_levels = []
        for feature, scale in zip(features, self.spatial_scales):
            # roi_align requires the boxes in the feature's dtype and device.
            level_boxes = [image_boxes.to(device=feature.device, dtype=feature.dtype) for image_boxes in boxes]
            pooled_levels.append(
                roi_align(
                    feature,
                    level_boxes,
                    output_size=self.output_size,
                    spatial_scale=scale,
                    sampling_ratio=self.sampling_ratio,
                    aligned=self.aligned,
                )
            )
        return torch.stack(pooled_levels, dim=1)
