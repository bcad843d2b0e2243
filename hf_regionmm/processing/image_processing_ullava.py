"""CLIP image processor of u-LLaVA: pad to a white square, resize to 224, CLIP-normalize (section 3.1).

The released data pipeline (`aspect_ratio='pad'`, reference/original_repos.md section 4d) pads every image to a square
with white (255, 255, 255), centred, before `CLIPImageProcessor` (clip-vit-large-patch14, 224). Padding first keeps
the whole image (no centre crop) and makes box coordinates simple: the released box frame is the padded square,
`(x + pad_x) / max(height, width)`. This subclass of transformers' `CLIPImageProcessor` does the padding on the
torchvision backend and also returns each image's original `(height, width)`.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvF
from transformers import CLIPImageProcessor
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import SizeDict

__all__ = ["ULlavaImageProcessor", "pad_to_square_offsets"]

ULLAVA_IMAGE_SIZE = 224
WHITE = 255


def pad_to_square_offsets(height: int, width: int) -> tuple[int, int]:
    """`(pad_left, pad_top)` in pixels when an image of `height x width` is centred in a `max(h, w)` square (the
    extra pixel of an odd difference goes to the right / bottom, as PIL's `expand2square` pastes at `(d // 2)`)."""
    side = max(height, width)
    return (side - width) // 2, (side - height) // 2


class ULlavaImageProcessor(CLIPImageProcessor):
    r"""`CLIPImageProcessor` that first pads each image to a centred white square, then resizes it to a fixed square.

    Args (all optional; defaults reproduce the released preprocessing):
        size (`dict`, defaults to `{"height": 224, "width": 224}`): output size after padding (tiny models: e.g. 56).
        pad_to_square (`bool`, defaults to True): pad with white to a square before resizing (released
            `aspect_ratio='pad'`); False resizes the image as is (aspect ratio not kept).
        other `CLIPImageProcessor` options (resample bicubic, CLIP mean/std, `do_convert_rgb`).

    Returns a `BatchFeature` with `pixel_values` `(batch, 3, S, S)` float32 and `image_sizes` `(batch, 2)` int64
    original `(height, width)`.
    """

    size = {"height": ULLAVA_IMAGE_SIZE, "width": ULLAVA_IMAGE_SIZE}
    crop_size = {"height": ULLAVA_IMAGE_SIZE, "width": ULLAVA_IMAGE_SIZE}
    default_to_square = True
    do_center_crop = False
    pad_to_square = True
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, pad_to_square: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pad_to_square = pad_to_square
        if not self.size.height or self.size.height != self.size.width:
            raise ValueError(f"`size` must be a square {{'height': S, 'width': S}}; got {dict(self.size)}.")

    def _preprocess(self, images: list[torch.Tensor], size: SizeDict, **kwargs) -> BatchFeature:
        """Pad (white, centred) to squares, then CLIP's resize/rescale/normalize; adds `image_sizes`."""
        image_sizes = [[int(image.shape[-2]), int(image.shape[-1])] for image in images]
        if self.pad_to_square:
            padded = []
            for image in images:
                height, width = image.shape[-2:]
                side = max(height, width)
                left, top = pad_to_square_offsets(height, width)
                padding = [left, top, side - width - left, side - height - top]
                padded.append(tvF.pad(image, padding, fill=WHITE) if side != height or side != width else image)
            images = padded
        return_tensors = kwargs.get("return_tensors")
        outputs = super()._preprocess(images, size=size, **kwargs)
        if return_tensors == "pt":
            outputs["image_sizes"] = torch.tensor(image_sizes, dtype=torch.int64).reshape(-1, 2)
        elif return_tensors == "np":
            outputs["image_sizes"] = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
        else:
            outputs["image_sizes"] = image_sizes
        return outputs
