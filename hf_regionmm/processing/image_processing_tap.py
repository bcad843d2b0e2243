"""Image processor for TAP-v2: images -> padded `pixel_values`; ground-truth masks -> the model's mask frame.

TAP (tapv2.txt section 3.1; the v1.1 release, reference/original_repos.md section 3d) resizes the longest image side
to 1024 with bilinear interpolation, keeps the aspect ratio, pads bottom/right to 1024 x 1024 and normalizes with the
ImageNet mean/std (the release's BGR constants (103.53, 116.28, 123.675) / (57.375, 57.12, 58.395) are these in the
other channel order). That is `SamImageProcessor`, so this class subclasses it and inherits `post_process_masks`,
`generate_crop_boxes`, `filter_masks` and `post_process_for_mask_generation` (what transformers' mask-generation
pipeline calls). Difference from the release: padded pixels are exactly 0 after normalization; the release pads a
uint8 canvas with the truncated mean (103, 116, 123), which leaves them slightly non-zero.

Added here: `preprocess_instance_masks`, which maps per-prompt ground-truth masks of the original image to the
model's low-resolution mask frame (`mask_size`: 4x the feature grid, 256 for 1024-pixel inputs, padded likewise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.sam.image_processing_sam import SamImageProcessor

__all__ = ["TapImageProcessor"]


class TapImageProcessor(SamImageProcessor):
    r"""`SamImageProcessor` with TAP's defaults, plus ground-truth mask preparation.

    Args (all optional):
        size (`{"longest_edge": 1024}`): longest side after resizing; tiny test models use 64.
        pad_size (`{"height": 1024, "width": 1024}`): padded model input; must equal the model's `image_size`.
        mask_size (`{"longest_edge": 256}`), mask_pad_size (`{"height": 256, "width": 256}`): the mask frame, 4x the
            feature grid (`image_size * 4 / patch_size`).

    `__call__(images)` returns `pixel_values` `(B, 3, S, S)` float32, `original_sizes` `(B, 2)` and
    `reshaped_input_sizes` `(B, 2)` int64 `(height, width)`.
    """

    model_input_names = ["pixel_values"]

    def preprocess_instance_masks(
        self, masks: Any, original_size: tuple[int, int], name: str = "masks"
    ) -> torch.Tensor:
        """Resize an image's instance masks to the mask frame and pad them.

        Args:
            masks: `(n, H, W)` bool / {0, 1} masks (numpy, tensor or list of 2-D masks) in pixels of the original
                image of size `original_size = (H, W)`.
            name: argument name for error messages.

        Returns:
            `(n, mask_pad_h, mask_pad_w)` float32 in {0, 1}: antialiased bilinear resize of the longest side to
            `mask_size["longest_edge"]` (a cell is set when about half of it is covered), zero-padded bottom/right
            like the image.
        """
        if isinstance(masks, (list, tuple)):
            masks = [torch.as_tensor(np.asarray(mask)) for mask in masks]
            tensor = torch.stack(masks) if masks else torch.zeros((0, *original_size))
        elif isinstance(masks, np.ndarray):
            tensor = torch.from_numpy(np.ascontiguousarray(masks))
        elif isinstance(masks, torch.Tensor):
            tensor = masks.detach().cpu()
        else:
            raise TypeError(f"`{name}` must be an (n, H, W) array / tensor or a list of 2-D masks; got {type(masks)}.")
        height, width = int(original_size[0]), int(original_size[1])
        if tensor.ndim != 3 or tuple(tensor.shape[1:]) != (height, width):
            raise ValueError(
                f"`{name}` must have shape (n, {height}, {width}) (one mask per prompt, the size of its image); got "
                f"{tuple(tensor.shape)}."
            )
        tensor = tensor.to(torch.float32)
        if tensor.numel() and not bool(((tensor == 0) | (tensor == 1)).all()):
            raise ValueError(f"`{name}` must be binary (bool or 0/1 values).")
        mask_size = self.mask_size["longest_edge"]
        pad_height, pad_width = self.mask_pad_size["height"], self.mask_pad_size["width"]
        new_height, new_width = self._get_preprocess_shape((height, width), mask_size)
        padded = torch.zeros((tensor.shape[0], pad_height, pad_width), dtype=torch.float32)
        if tensor.shape[0]:
            resized = F.interpolate(
                tensor[None], (new_height, new_width), mode="bilinear", align_corners=False, antialias=True
            )[0]
            padded[:, :new_height, :new_width] = (resized > 0.5).to(torch.float32)
        return padded
