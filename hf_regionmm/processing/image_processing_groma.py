"""Image processor for Groma: images -> `pixel_values` for the DINOv2-L/14 tower at 448x448.

Groma (groma.txt, Sec. 3.1 and Sec. 4.1 "Implementation details") encodes every image at 448x448 with DINOv2-L/14.
The released pipeline (`groma/eval/run_groma.py`, checked by running it, see reference/original_repos.md Sec. 1d)
resizes with PIL bicubic to exactly 448x448 -- the aspect ratio is NOT kept, so boxes stay valid after dividing by the
original width and height -- then applies `BitImageProcessor` with resizing and cropping off: rescale by 1/255 and
ImageNet mean/std. This module reproduces that on the transformers torchvision backend and also returns the original
`(height, width)` of every image, which the processor needs to normalize user boxes and to map predicted boxes back
to pixels of the original image.

Image modes: every image is converted to RGB independently, so a batch may mix PIL images of any mode ("L", "P",
"RGBA", "CMYK", ...) with numpy arrays / torch tensors laid out as (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}.
Grey images are replicated to three channels and a 4th (alpha) channel is dropped, as PIL's `convert("RGB")` in the
released code does (no compositing onto white, unlike transformers' generic RGB conversion). Inputs whose channel
layout cannot be determined, or that are not images at all, raise a `ValueError`/`TypeError` naming `images`.
Arrays and tensors are expected to hold 0..255 values (any dtype); floats in [0, 1] must be passed with
`do_rescale=False`.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
)

__all__ = ["GromaImageProcessor"]

GROMA_IMAGE_SIZE = 448


def _describe(image: object) -> str:
    if isinstance(image, PIL.Image.Image):
        return f"PIL image (mode {image.mode!r}, size {image.size})"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"{type(image).__name__} of shape {tuple(image.shape)} and dtype {image.dtype}"
    return f"object of type {type(image).__name__}"


def _is_single_image(image: object) -> bool:
    if isinstance(image, PIL.Image.Image):
        return True
    return isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3)


def _is_channels_last_view(tensor: torch.Tensor) -> bool:
    """True for a (C, H, W) permuted view of a contiguous (H, W, C) array (what PIL and HWC arrays give)."""
    channels, height, width = tensor.shape
    return tensor.stride() == (1, width * channels, channels)


def _check_square_size(size: SizeDict | None, do_resize: bool | None) -> None:
    if do_resize and (size is None or not size.height or not size.width or size.height != size.width):
        given = None if size is None else {key: value for key, value in dict(size).items() if value is not None}
        raise ValueError(
            f"`size` must be a square {{'height': S, 'width': S}} (or an int S); the released model uses S=448, got "
            f"{given}."
        )


class GromaImageProcessor(TorchvisionBackend):
    r"""Resize to a fixed square (448x448 for the released checkpoints), rescale 1/255, ImageNet-normalize.

    Args (all optional, defaults reproduce the released Groma preprocessing):
        size (`dict`, defaults to `{"height": 448, "width": 448}`): output size; must be square (the model's 2x2
            token merge and `num_image_tokens` assume a square patch grid). Tiny test models use e.g. 112.
        resample (defaults to bicubic): interpolation of the resize, as PIL's default in `run_groma.py`.
        do_convert_rgb (defaults to True): convert every input to 3-channel RGB (see the module docstring).
        image_mean / image_std (default ImageNet (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)).

    Returns a `BatchFeature` with
        pixel_values: (batch, 3, S, S) float32, normalized, S = `size["height"]`.
        image_sizes: (batch, 2) int64, `(height, width)` of each ORIGINAL image in pixels, in input order.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": GROMA_IMAGE_SIZE, "width": GROMA_IMAGE_SIZE}
    default_to_square = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        _check_square_size(self.size, self.do_resize)

    def fetch_images(self, image_url_or_urls: object) -> object:
        """Load URLs / paths; leave everything else for `_prepare_images_structure` to check (clear errors there)."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return super().fetch_images(image_url_or_urls)
        return image_url_or_urls

    def _prepare_images_structure(self, images: object, expected_ndims: int = 3) -> list:
        """Flatten `images` into a list with one image per sample.

        Accepts one image, a list of images, a batched (B, C, H, W) / (B, H, W, C) array or tensor, or a list of
        one-image lists (the layout `apply_chat_template` produces). A 2-D array is one grey image. The base class
        rejects 2-D arrays unless a PIL image happens to come first in the list, so the rule is spelled out here.
        """
        images = self.fetch_images(images)
        if _is_single_image(images):
            return [images]
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            return list(images)
        if isinstance(images, (list, tuple)) and len(images) > 0:
            flat = []
            for item in images:
                if isinstance(item, (list, tuple)):
                    flat.extend(item)
                elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
                    flat.extend(list(item))
                else:
                    flat.append(item)
            for index, item in enumerate(flat):
                if not _is_single_image(item):
                    raise ValueError(
                        f"`images` entry {index} is a {_describe(item)}; every image must be a PIL image or a numpy "
                        "array / torch tensor shaped (H, W), (H, W, C) or (C, H, W)."
                    )
            return flat
        raise ValueError(
            f"`images` must be an image, a list of images or a 4-D batch; got a {_describe(images)}"
            + (" (an empty list)." if isinstance(images, (list, tuple)) else ".")
        )

    def process_image(
        self,
        image: PIL.Image.Image | np.ndarray | torch.Tensor,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Convert one image to a (3, H, W) tensor in its original resolution and dtype (RGB if `do_convert_rgb`)."""
        if isinstance(image, PIL.Image.Image):
            # PIL's own conversion, as `Image.open(...).convert("RGB")` in the released code: alpha is dropped.
            # (An RGB image is not converted: `convert` would only copy it.)
            tensor = torch.from_numpy(
                np.array(image.convert("RGB") if do_convert_rgb and image.mode != "RGB" else image)
            )
            input_data_format = ChannelDimension.LAST if tensor.ndim == 3 else None
        elif isinstance(image, np.ndarray):
            if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number):
                raise TypeError(f"`images` must hold numeric pixel values; got a {_describe(image)}.")
            tensor = torch.from_numpy(np.ascontiguousarray(image))
        elif isinstance(image, torch.Tensor):
            if image.dtype == torch.bool or image.is_complex():
                raise TypeError(f"`images` must hold real numeric pixel values; got a {_describe(image)}.")
            tensor = image
        else:
            raise TypeError(f"`images` must be PIL images, numpy arrays or torch tensors; got a {_describe(image)}.")

        if tensor.ndim == 2:
            tensor = tensor[None]
            input_data_format = ChannelDimension.FIRST
        if tensor.ndim != 3:
            raise ValueError(f"`images`: an image must be 2-D or 3-D; got a {_describe(image)}.")
        if input_data_format is None:
            try:
                input_data_format = infer_channel_dimension_format(tensor, num_channels=(1, 3, 4))
            except ValueError:
                raise ValueError(
                    f"`images`: cannot find a channel axis of size 1, 3 or 4 in a {_describe(image)}. Pass (H, W), "
                    "(H, W, C) or (C, H, W) images with C in {1, 3, 4}."
                ) from None
        if ChannelDimension(input_data_format) == ChannelDimension.LAST:
            tensor = tensor.permute(2, 0, 1)

        if do_convert_rgb:
            if tensor.shape[0] == 1:
                tensor = tensor.expand(3, -1, -1)
            elif tensor.shape[0] == 4:
                tensor = tensor[:3]
        if tensor.shape[0] != 3:
            raise ValueError(
                f"`images`: expected 3 colour channels after conversion, got {tensor.shape[0]} for a "
                f"{_describe(image)}. Pass do_convert_rgb=True to convert grey and RGBA images."
            )
        if tensor.shape[1] == 0 or tensor.shape[2] == 0:
            raise ValueError(f"`images`: got an empty image ({_describe(image)}).")

        # An (H, W, C) input stays a channels-last view: torchvision's uint8 antialiased resize runs about twice as
        # fast on that layout, and `resize` returns a contiguous image, so no transposing copy is needed here.
        if not _is_channels_last_view(tensor):
            tensor = tensor.contiguous()
        if device is not None:
            tensor = tensor.to(device)
        return tensor

    def resize(self, image: torch.Tensor, size: SizeDict, **kwargs) -> torch.Tensor:
        """Resize `(..., 3, H, W)` images (any memory layout) to `(..., 3, S, S)`; the result is contiguous."""
        return super().resize(image, size, **kwargs).contiguous()

    def _validate_preprocess_kwargs(self, size: SizeDict | None = None, do_resize: bool | None = None, **kwargs):
        _check_square_size(size, do_resize)
        super()._validate_preprocess_kwargs(size=size, do_resize=do_resize, **kwargs)

    def _preprocess(self, images: list[torch.Tensor], do_resize: bool, size: SizeDict, **kwargs) -> BatchFeature:
        """Resize, rescale and normalize a list of (3, H, W) images.

        Returns `pixel_values` (batch, 3, S, S) float32 and `image_sizes` (batch, 2) int64 original (height, width).
        """
        image_sizes = [[int(image.shape[-2]), int(image.shape[-1])] for image in images]
        if not do_resize:
            for index, (height, width) in enumerate(image_sizes):
                if (height, width) != (size.height, size.width):
                    raise ValueError(
                        f"`images` entry {index} is {height}x{width} but do_resize=False; Groma needs "
                        f"{size.height}x{size.width} inputs. Keep do_resize=True."
                    )
            images = [image.contiguous() for image in images]  # `resize` is what makes channels-last views contiguous
        return_tensors = kwargs.get("return_tensors")
        outputs = super()._preprocess(images, do_resize=do_resize, size=size, **kwargs)
        if return_tensors == "pt":
            outputs["image_sizes"] = torch.tensor(image_sizes, dtype=torch.int64).reshape(-1, 2)
        elif return_tensors == "np":
            outputs["image_sizes"] = np.asarray(image_sizes, dtype=np.int64).reshape(-1, 2)
        else:
            outputs["image_sizes"] = image_sizes
        return outputs
