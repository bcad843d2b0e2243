"""Processor for RegionBLIP: images / image boxes / point clouds / 3D boxes + text -> model inputs.

RegionBLIP (regionblip.txt, section 3) captions four modalities; one batch holds one of them (semi-hybrid training):

| inputs | modality | model inputs |
|---|---|---|
| `images` | image | `pixel_values` |
| `images` + `boxes` (one per image) | image region | `pixel_values`, `region_boxes` |
| `point_clouds` | point cloud | `point_clouds` |
| `point_clouds` + `boxes_3d` (one per cloud) | point-cloud region | `point_clouds`, `region_boxes_3d` |

What it reproduces from the released code (reference/original_repos.md 2c-2d):
  * images: bicubic resize to a square (224 for training, 364 for the released image-region evaluation), no crop,
    rescale 1/255, CLIP mean/std (transformers' `BlipImageProcessor`, as HF BLIP-2);
  * image boxes: absolute pixel xyxy of the original image (the library convention), truncated to whole pixels and
    divided by (width, height) -> normalized xyxy for PaFE;
  * point clouds: xyz only, sampled to `num_points` (FPS for objects, random for scenes), objects centred and scaled
    into the unit sphere (scenes kept in scene units), seeded training augmentation;
  * 3D boxes: centre + size (6 numbers) or 8 corners, turned into 8 corners x xyz in the released corner order (with
    the released y/z extent swap by default), transformed together with their cloud;
  * text: `num_query_tokens` `<image>` placeholders, then the tokenized prompt (OPT: empty; Flan-T5: "a photo of" /
    "a point cloud of") and, for training, the caption closed by the tokenizer's eos, supervised in `labels`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers import BatchFeature
from transformers.image_utils import get_image_size, infer_channel_dimension_format
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack

from .point_cloud_processing import augment_point_cloud, box_3d_corners, normalize_to_unit_sphere, sample_points
from .region_inputs import validate_pixel_boxes

__all__ = ["IMAGE_TOKEN", "T5_PROMPTS", "RegionBlipProcessor"]

IMAGE_TOKEN = "<image>"
# Fixed prefixes of the released Flan-T5 variant (`RegionBLIP_t5.py`); the OPT variant uses an empty prompt.
T5_PROMPTS = {
    "image": "a photo of",
    "image_region": "a photo of",
    "point_cloud": "a point cloud of",
    "point_cloud_region": "a point cloud of",
}
_SAMPLING = ("fps", "random")


def _image_size(image: Any, index: int) -> tuple[int, int]:
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3):
        array = np.asarray(image) if isinstance(image, np.ndarray) else image.numpy()
        if array.ndim == 2:
            return tuple(array.shape)
        return get_image_size(array, infer_channel_dimension_format(array, num_channels=(1, 3, 4)))
    raise TypeError(
        f"`images[{index}]` must be a PIL image or an (H, W[, C]) / (C, H, W) array or tensor; got "
        f"{type(image).__name__}."
    )


class RegionBlipProcessor(ProcessorMixin):
    r"""RegionBLIP processor: a `BlipImageProcessor` (bicubic, CLIP mean/std) and the LLM tokenizer with `<image>`.

    Args:
        image_processor: `BlipImageProcessor` with a square `size`: the vision tower's `image_size` (224) for training,
            364 for the released image-region evaluation (the model then interpolates its ViT position table).
        tokenizer: the LLM tokenizer (OPT / T5) holding the `<image>` token whose id is the model's
            `image_token_index`.
        num_query_tokens: `<image>` placeholders per prompt (32), the model's `num_query_tokens`.
        num_points: points per cloud after sampling (8192 objects; the released scenes use 40000).
        point_sampling: `"fps"` (objects, released) or `"random"` (scenes, released).
        box_3d_convention: `"released"` (y/z extents swapped as in the released ScanRefer loader) or `"exact"`.
        chat_template: unused by RegionBLIP (captioning has no chat format); kept for the ProcessorMixin API.

    Outputs of `__call__` (B = batch): `input_ids`, `attention_mask` (B, L) int64; `labels` (B, L) when `captions`
    are given (-100 on placeholders, prompt and padding); `pixel_values` (B, 3, S, S) float32 and `image_sizes`
    (B, 2) original (height, width); `region_boxes` (B, 4) float32 normalized xyxy; `point_clouds`
    (B, num_points, 3) float32; `region_boxes_3d` (B, 24) float32 corners.
    """

    text_kwargs = {"padding": True}

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_query_tokens: int = 32,
        num_points: int = 8192,
        point_sampling: str = "fps",
        box_3d_convention: str = "released",
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        for name, value in (("num_query_tokens", num_query_tokens), ("num_points", num_points)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if point_sampling not in _SAMPLING:
            raise ValueError(f"`point_sampling` must be one of {_SAMPLING}; got {point_sampling!r}.")
        box_3d_corners([0, 0, 0, 1, 1, 1], box_3d_convention)
        if tokenizer is None or image_processor is None:
            raise ValueError("`image_processor` (a BlipImageProcessor) and `tokenizer` (with `<image>`) are required.")
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"`tokenizer` lacks the {IMAGE_TOKEN!r} token; add it with "
                f"tokenizer.add_tokens([{IMAGE_TOKEN!r}], special_tokens=True) and use its id as image_token_index."
            )
        self.num_query_tokens = int(num_query_tokens)
        self.num_points = int(num_points)
        self.point_sampling = point_sampling
        self.box_3d_convention = box_3d_convention
        self.image_token = IMAGE_TOKEN
        self.image_token_id = image_token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_sizes",
            "region_boxes",
            "point_clouds",
            "region_boxes_3d",
        ]

    # -----------------------------------------------------------------------------------------------------------
    # __call__

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        boxes: Any = None,
        point_clouds: Any = None,
        boxes_3d: Any = None,
        captions: str | list[str] | None = None,
        normalize_point_clouds: bool | None = None,
        augment: bool = False,
        seed: int = 0,
        videos: Any = None,
        audio: Any = None,
        return_tensors: str | None = "pt",
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Turn one modality's inputs, prompts and captions into RegionBLIP model inputs.

        Args:
            images: one image per sample (PIL / numpy / tensor).
            text: one prompt per sample (default: empty, the released OPT prompt; see `T5_PROMPTS` for Flan-T5).
            boxes: image regions, one per image, absolute pixel xyxy of the ORIGINAL image:
                `boxes[image] = [[x1, y1, x2, y2]]`.
            point_clouds: one `(N_i, 3 + C)` array per sample (extra columns such as colour are dropped),
                `N_i >= num_points`.
            boxes_3d: point-cloud regions, one per cloud: `(cx, cy, cz, sx, sy, sz)` or 8 corners `(8, 3)`, in the
                cloud's input frame.
            captions: one target caption per sample (training): appended after the prompt, closed by eos and
                supervised in `labels`.
            normalize_point_clouds: centre + unit-sphere scaling; default True for whole clouds (objects), False with
                `boxes_3d` (scenes stay in scene units, as released). Boxes follow their cloud.
            augment: apply the seeded training augmentation (rotation about z, scale 0.8-1.25, shift 0.1).
            seed: seeds point sampling and augmentation (sample i uses `(seed, i)`), so outputs are reproducible.
            return_tensors: "pt" (default), "np" or None.
            **kwargs: tokenizer options (`padding`, `padding_side`, `max_length`, `truncation`) and image processor
                options.
        """
        if videos is not None or audio is not None:
            raise ValueError("RegionBLIP takes images or point clouds (and text); got `videos` or `audio`.")
        if images is not None and point_clouds is not None:
            raise ValueError(
                "Pass either `images` or `point_clouds`: RegionBLIP batches hold one modality (semi-hybrid training)."
            )
        if images is None and point_clouds is None:
            raise ValueError("Pass `images` (image / image-region captioning) or `point_clouds` (3D captioning).")
        if boxes is not None and images is None:
            raise ValueError("`boxes` are image regions and need `images`; 3D regions go in `boxes_3d`.")
        if boxes_3d is not None and point_clouds is None:
            raise ValueError("`boxes_3d` are point-cloud regions and need `point_clouds`.")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None; got {return_tensors!r}.")
        if not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative integer; got {seed!r}.")
        merged = self._merge_kwargs(ProcessingKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        data: dict[str, Any] = {}
        if images is not None:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            data.update(self._process_images(images, boxes, images_kwargs))
            batch_size = len(images)
        else:
            point_clouds = list(point_clouds) if isinstance(point_clouds, (list, tuple)) else list(point_clouds)
            data.update(self._process_point_clouds(point_clouds, boxes_3d, normalize_point_clouds, augment, seed))
            batch_size = len(point_clouds)

        prompts = self._per_sample(text, "text", batch_size, default="")
        targets = None if captions is None else self._per_sample(captions, "captions", batch_size, default=None)
        data.update(self._tokenize(prompts, targets, text_kwargs))
        return BatchFeature(self._convert(data, return_tensors))

    # -----------------------------------------------------------------------------------------------------------
    # modalities

    def _process_images(self, images: list[Any], boxes: Any, images_kwargs: dict[str, Any]) -> dict[str, Any]:
        sizes = [_image_size(image, index) for index, image in enumerate(images)]
        pixel_values = self.image_processor(images, return_tensors="pt", **images_kwargs)["pixel_values"]
        data = {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.int64)}
        if boxes is not None:
            per_image = validate_pixel_boxes(boxes, sizes, "boxes", max_boxes=1)
            normalized = []
            for index, (image_boxes, (height, width)) in enumerate(zip(per_image, sizes)):
                if image_boxes.shape[0] != 1:
                    raise ValueError(
                        f"`boxes[{index}]` is empty; RegionBLIP captions exactly one region per image "
                        "(`boxes[image] = [[x1, y1, x2, y2]]`). Use images without `boxes` for image captioning."
                    )
                # Released: whole-pixel boxes divided by the image size.
                box = image_boxes[0].floor() / torch.tensor([width, height, width, height], dtype=torch.float32)
                normalized.append(box.clamp(0.0, 1.0))
            data["region_boxes"] = torch.stack(normalized)
        return data

    def _process_point_clouds(
        self,
        point_clouds: list[Any],
        boxes_3d: Any,
        normalize: bool | None,
        augment: bool,
        seed: int,
    ) -> dict[str, Any]:
        if boxes_3d is not None:
            boxes_3d = list(boxes_3d)
            if len(boxes_3d) != len(point_clouds):
                raise ValueError(
                    f"`boxes_3d` has {len(boxes_3d)} entries but there are {len(point_clouds)} point clouds; pass one "
                    "box per cloud."
                )
        if normalize is None:
            normalize = boxes_3d is None
        clouds, corners = [], []
        for index, cloud in enumerate(point_clouds):
            rng = np.random.default_rng([seed, index])
            array = np.asarray(cloud.detach().cpu() if isinstance(cloud, torch.Tensor) else cloud, dtype=np.float64)
            if array.ndim != 2 or array.shape[1] < 3:
                raise ValueError(
                    f"`point_clouds[{index}]` must be an (N, 3) array of xyz (extra columns allowed); got shape "
                    f"{array.shape}."
                )
            array = array[:, :3]
            if not np.isfinite(array).all():
                raise ValueError(f"`point_clouds[{index}]` contains NaN or inf; remove non-finite points.")
            if array.shape[0] < self.num_points:
                raise ValueError(
                    f"`point_clouds[{index}]` has {array.shape[0]} points but the processor samples "
                    f"num_points={self.num_points}; pass denser clouds or build the processor with a smaller "
                    "`num_points`."
                )
            box_corners = None
            if boxes_3d is not None:
                try:
                    box_corners = box_3d_corners(boxes_3d[index], self.box_3d_convention)
                except ValueError as error:
                    raise ValueError(f"`boxes_3d[{index}]`: {error}.") from None
                if not np.isfinite(box_corners).all():
                    raise ValueError(f"`boxes_3d[{index}]` contains NaN or inf.")
            array = sample_points(array, self.num_points, self.point_sampling, rng)
            if normalize:
                centroid, radius = normalize_to_unit_sphere(array)
                array = (array - centroid) / radius
                if box_corners is not None:
                    box_corners = (box_corners - centroid) / radius
            if augment:
                array, box_corners = augment_point_cloud(array, box_corners, rng)
            clouds.append(torch.from_numpy(array.astype(np.float32)))
            if box_corners is not None:
                corners.append(torch.from_numpy(box_corners.reshape(24).astype(np.float32)))
        data = {"point_clouds": torch.stack(clouds)}
        if corners:
            data["region_boxes_3d"] = torch.stack(corners)
        return data

    # -----------------------------------------------------------------------------------------------------------
    # text

    @staticmethod
    def _per_sample(values: Any, name: str, batch_size: int, default: str | None) -> list[str | None]:
        if values is None:
            return [default] * batch_size
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise TypeError(f"`{name}` must be a string or a list of strings, one per sample; got {values!r}.")
        if len(values) != batch_size:
            raise ValueError(f"`{name}` has {len(values)} entries for {batch_size} samples; pass one per sample.")
        if any(IMAGE_TOKEN in v for v in values):
            raise ValueError(
                f"`{name}` must not contain {IMAGE_TOKEN!r}; the processor writes the query placeholders."
            )
        return list(values)

    def _tokenize(
        self, prompts: list[str], captions: list[str] | None, text_kwargs: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        padding_side = text_kwargs.get("padding_side") or self.tokenizer.padding_side
        max_length = text_kwargs.get("max_length") if text_kwargs.get("truncation") else None
        placeholders = [self.image_token_id] * self.num_query_tokens
        # One batched tokenizer call per kind instead of one per sample (the processor-throughput bench).
        all_prompt_ids = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        all_caption_ids = None if captions is None else self.tokenizer(list(captions), add_special_tokens=False)
        rows, label_rows = [], []
        for index, prompt_ids in enumerate(all_prompt_ids):
            ids = placeholders + list(prompt_ids)
            labels = [-100] * len(ids)
            if all_caption_ids is not None:
                caption_ids = list(all_caption_ids["input_ids"][index]) + [self.tokenizer.eos_token_id]
                ids += caption_ids
                labels += caption_ids
            if max_length is not None:
                if max_length <= self.num_query_tokens:
                    raise ValueError(f"`max_length` must exceed num_query_tokens={self.num_query_tokens}.")
                ids, labels = ids[:max_length], labels[:max_length]
            rows.append(ids)
            label_rows.append(labels)
        length = max(len(row) for row in rows)
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention_mask, labels = [], [], []
        for ids, row_labels in zip(rows, label_rows):
            padding = length - len(ids)
            if padding_side == "left":
                input_ids.append([pad_id] * padding + ids)
                attention_mask.append([0] * padding + [1] * len(ids))
                labels.append([-100] * padding + row_labels)
            else:
                input_ids.append(ids + [pad_id] * padding)
                attention_mask.append([1] * len(ids) + [0] * padding)
                labels.append(row_labels + [-100] * padding)
        data = {
            "input_ids": torch.tensor(input_ids, dtype=torch.int64),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.int64),
        }
        if captions is not None:
            data["labels"] = torch.tensor(labels, dtype=torch.int64)
        return data

    @staticmethod
    def _convert(data: dict[str, Any], return_tensors: str | None) -> dict[str, Any]:
        if return_tensors == "pt":
            return data
        if return_tensors == "np":
            return {key: value.numpy() for key, value in data.items()}
        return {key: value.tolist() for key, value in data.items()}

    # -----------------------------------------------------------------------------------------------------------
    # post-processing

    def post_process_captions(self, generated_ids: Any, prompt_length: int | None = None) -> list[str]:
        """Decode generated ids `(B, L)` into captions, dropping the first `prompt_length` ids (the prompt) and
        special tokens."""
        ids = generated_ids.tolist() if isinstance(generated_ids, (torch.Tensor, np.ndarray)) else list(generated_ids)
        if prompt_length is not None:
            ids = [row[prompt_length:] for row in ids]
        return [text.strip() for text in self.tokenizer.decode(ids, skip_special_tokens=True)]
