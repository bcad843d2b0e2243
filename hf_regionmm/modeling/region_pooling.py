"""Multi-scale RoIAlign: one fixed-size feature grid per box per feature level.

This is the pooling half of Groma's region encoder (section 3.1, "Region Encoder"): the released
``MlvlRoIExtractor`` runs mmcv ``RoIAlign(output_size=14, sampling_ratio=2, aligned=True)`` on three feature maps
with ``spatial_scale = 1 / stride``. ``torchvision.ops.roi_align`` with the same arguments matches the mmcv kernel,
so the learned per-level convolutions, the level fusion and the projection stay in the model file and this module
only gathers features.

Implementation: with a fixed ``sampling_ratio`` every output bin is a weighted sum of exactly
``4 * sampling_ratio^2`` feature pixels (four bilinear corners per sample point), so all levels are pooled by ONE
``torch.nn.functional.embedding_bag`` call over a channels-last table of every level's pixels, with the bilinear
weights (divided by the sample count) as ``per_sample_weights``. This reproduces torchvision's CPU/CUDA kernel rule for
rule (samples beyond one pixel outside the map contribute 0, samples in ``[-1, 0]`` clamp to the border) and writes
straight into the output, instead of one ``roi_align`` per level followed by a stacking copy. Adaptive sampling
(``sampling_ratio <= 0``) and reduced-precision features keep using ``torchvision.ops.roi_align`` per level.

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
from torch.nn import functional as F
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
        if self.sampling_ratio > 0 and reference.dtype in (torch.float32, torch.float64):
            return self._pool_with_embedding_bag(features, boxes)
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

    def _axis_samples(
        self, start: torch.Tensor, end: torch.Tensor, scale: float, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bilinear taps along one axis, as torchvision's ``roi_align`` kernel computes them.

        Args:
            start, end: ``(K,)`` box start / end coordinates in the box frame.
            scale: the level's spatial scale; size: the level's extent (pixels) along this axis.

        Returns:
            ``low, high`` int64 and ``low_weight, high_weight`` float, each ``(K, s, g)`` (``s`` bins, ``g`` samples
            per bin); the weights are 0 for samples more than one pixel outside the map.
        """
        offset = 0.5 if self.aligned else 0.0
        roi_start = start * scale - offset
        roi_length = end * scale - offset - roi_start
        if not self.aligned:
            roi_length = roi_length.clamp(min=1.0)
        bin_size = (roi_length / self.output_size)[:, None, None]
        bins = torch.arange(self.output_size, device=start.device, dtype=start.dtype)[None, :, None]
        grid = torch.arange(self.sampling_ratio, device=start.device, dtype=start.dtype)[None, None, :] + 0.5
        coordinate = roi_start[:, None, None] + bins * bin_size + grid * bin_size / self.sampling_ratio
        inside = (coordinate >= -1.0) & (coordinate <= size)
        coordinate = coordinate.clamp(min=0.0)
        low = coordinate.long()
        at_edge = low >= size - 1
        low = low.clamp(max=size - 1)
        high = torch.where(at_edge, low, low + 1)
        coordinate = torch.where(at_edge, low.to(coordinate.dtype), coordinate)
        high_weight = (coordinate - low) * inside
        low_weight = (1.0 - (coordinate - low)) * inside
        return low, high, low_weight, high_weight

    def _pool_with_embedding_bag(self, features: Sequence[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        reference = features[0]
        batch_size, channels = reference.shape[:2]
        size, grid = self.output_size, self.sampling_ratio
        all_boxes = torch.cat([image_boxes.detach() for image_boxes in boxes]).to(reference.device, reference.dtype)
        image_index = torch.cat(
            [
                torch.full((image_boxes.shape[0],), index, dtype=torch.long, device=reference.device)
                for index, image_boxes in enumerate(boxes)
            ]
        )
        # One table row per feature pixel of every level, channels last (a free view for channels-last maps).
        table = reference.new_empty(sum(batch_size * f.shape[2] * f.shape[3] for f in features), channels)
        level_indices, level_weights, row_offset = [], [], 0
        for feature, scale in zip(features, self.spatial_scales):
            height, width = feature.shape[2], feature.shape[3]
            rows = batch_size * height * width
            table[row_offset : row_offset + rows].view(batch_size, height, width, channels).copy_(
                feature.permute(0, 2, 3, 1)
            )
            y_low, y_high, y_low_weight, y_high_weight = self._axis_samples(
                all_boxes[:, 1], all_boxes[:, 3], scale, height
            )
            x_low, x_high, x_low_weight, x_high_weight = self._axis_samples(
                all_boxes[:, 0], all_boxes[:, 2], scale, width
            )
            # (K, s, g, 2) row offsets / weights of the two taps per axis, then every (y tap, x tap) pair:
            # (K, s_y, s_x, g_y, g_x, 2, 2) -> one bag of 4 g^2 taps per output bin.
            y_rows = torch.stack([y_low, y_high], dim=-1) * width
            y_weights = torch.stack([y_low_weight, y_high_weight], dim=-1)
            x_cols = torch.stack([x_low, x_high], dim=-1)
            x_weights = torch.stack([x_low_weight, x_high_weight], dim=-1)
            base = (row_offset + image_index * height * width)[:, None, None, None, None, None, None]
            indices = base + y_rows[:, :, None, :, None, :, None] + x_cols[:, None, :, None, :, None, :]
            weights = y_weights[:, :, None, :, None, :, None] * x_weights[:, None, :, None, :, None, :]
            level_indices.append(indices.reshape(-1, size, size, 4 * grid * grid))
            level_weights.append(weights.reshape(-1, size, size, 4 * grid * grid) / (grid * grid))
            row_offset += rows
        # Bags ordered (box, row, col, level): the result is one channels-last block per box, so a (K, L * C, s, s)
        # view for a fused per-level convolution is free.
        indices = torch.stack(level_indices, dim=3).reshape(-1, 4 * grid * grid)
        weights = torch.stack(level_weights, dim=3).reshape(-1, 4 * grid * grid)
        pooled = F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum")
        return pooled.view(-1, size, size, self.num_levels, channels).permute(0, 3, 4, 1, 2)
