"""Processors of u-LLaVA, TAP-v2 and RegionBLIP against their transformers peers (PERFORMANCE.md, processors row).

Input: a batch of 8 synthetic coloured-shape scenes (`hf_regionmm.data.synthetic.generate_scenes`) resized to
640x480, with each scene's object boxes scaled along. Every processor runs at paper settings with an offline
word-level tokenizer (`build_word_tokenizer`, no Hub); ours and the peer get the same images, prompts and text.

1. `ULlavaProcessor` (CLIP branch: white pad to square + 224 px, 256 image tokens; SAM branch: 1024 px) vs
   `LlavaProcessor` (CLIP image processor at 224 px with LLaVA's shortest-edge resize + centre crop, 256 tokens).
   Informational: ours also builds the SAM input, which the peer does not.
2. The same `ULlavaProcessor` vs `LlavaProcessor` + `SamProcessor` (1024 px) together: the same work on both sides.
3. `TapProcessor` (1024 px, ImageNet norm; 3 click prompts + 2 box prompts per image) vs `SamProcessor` with the same
   prompts (`input_points` + `input_boxes`).
4. `RegionBlipProcessor` (`BlipImageProcessor` 224 px, 32 query placeholders, one region box per image, T5 prompt)
   vs `Blip2Processor` (the same `BlipImageProcessor`, 32 query tokens, same prompt) without the box.

Ratios are time ratios (ours / peer); the images/s ratio of PERFORMANCE.md is their inverse.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
from transformers import (
    Blip2Processor,
    BlipImageProcessor,
    CLIPImageProcessor,
    LlavaProcessor,
    SamImageProcessor,
    SamProcessor,
)

from hf_regionmm.data.synthetic import generate_scenes
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.processing import processing_ullava
from hf_regionmm.processing.image_processing_tap import TapImageProcessor
from hf_regionmm.processing.image_processing_ullava import ULlavaImageProcessor
from hf_regionmm.processing.processing_regionblip import IMAGE_TOKEN as REGIONBLIP_IMAGE_TOKEN
from hf_regionmm.processing.processing_regionblip import T5_PROMPTS, RegionBlipProcessor
from hf_regionmm.processing.processing_tap import TapProcessor
from hf_regionmm.processing.processing_ullava import ULLAVA_NEW_TOKENS, ULlavaProcessor
from hf_regionmm.systems.regionblip import tiny_regionblip_words
from hf_regionmm.systems.tap import tiny_tap_tokenizer
from hf_regionmm.systems.ullava import tiny_ullava_words

from .harness import Comparison, compare

__all__ = ["run"]

NUM_IMAGES = 8
WIDTH, HEIGHT = 640, 480
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
ULLAVA_QUERY = processing_ullava.res_prompt("red circle", seed=0)


def _scenes(count: int = NUM_IMAGES) -> tuple[list[PIL.Image.Image], list[list[list[float]]]]:
    """`count` synthetic scenes resized to 640x480 (RGB PIL) and their object boxes, absolute pixel xyxy at 640x480."""
    scenes = generate_scenes(
        count, seed=0, image_size_range=(320, 640), min_objects=3, max_objects=5, with_masks=False
    )
    images, boxes = [], []
    for scene in scenes:
        image = scene["image"].convert("RGB")
        scale = np.array([WIDTH / image.width, HEIGHT / image.height] * 2, dtype=np.float64)
        images.append(image.resize((WIDTH, HEIGHT), PIL.Image.BICUBIC))
        boxes.append([(np.asarray(box, dtype=np.float64) * scale).round(1).tolist() for box in scene["boxes"]])
    return images, boxes


def _clip_image_processor(size: int) -> CLIPImageProcessor:
    """LLaVA's CLIP preprocessing (shortest edge + centre crop, bicubic, CLIP mean/std), built locally."""
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        resample=PIL.Image.BICUBIC,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _sam_image_processor() -> SamImageProcessor:
    return SamImageProcessor(size={"longest_edge": 1024}, pad_size={"height": 1024, "width": 1024})


# ----------------------------------------------------------------------------------------------------------------
# 1 + 2: u-LLaVA


def _ullava_comparisons(repeats: int, images: list[PIL.Image.Image]) -> list[Comparison]:
    ours = ULlavaProcessor(
        ULlavaImageProcessor(size={"height": 224, "width": 224}),
        _sam_image_processor(),
        build_word_tokenizer(tiny_ullava_words(), extra_special_tokens=ULLAVA_NEW_TOKENS),
        num_image_tokens=256,
        num_video_frames=8,
    )
    # The peer's tokenizer: same words, LLaVA's `<image>` as its placeholder token.
    llava = LlavaProcessor(
        image_processor=_clip_image_processor(224),
        tokenizer=build_word_tokenizer(tiny_ullava_words(), extra_special_tokens=("<image>",)),
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    sam = SamProcessor(_sam_image_processor())
    prompt = processing_ullava.build_prompt(ULLAVA_QUERY)
    texts = [ULLAVA_QUERY] * len(images)
    llava_texts = [prompt] * len(images)

    def ours_call():
        return ours(images=images, text=texts, return_tensors="pt")

    def llava_call():
        return llava(images=images, text=llava_texts, return_tensors="pt")

    def llava_and_sam():
        return llava_call(), sam(images=images, return_tensors="pt")

    extra = {"images": len(images), "image_size": f"{WIDTH}x{HEIGHT}", "clip": 224, "sam": 1024, "image_tokens": 256}
    return [
        compare(
            "u-LLaVA processor vs LLaVA, 8 images 640x480",
            ours_call,
            llava_call,
            ours_label="ULlavaProcessor (CLIP 224 + SAM 1024)",
            peer_label="LlavaProcessor (CLIP 224)",
            repeats=repeats,
            target="- (ours also builds the SAM input)",
            notes="Time ratio; informational, the peer does only the CLIP half of the work.",
            extra=extra,
        ),
        compare(
            "u-LLaVA processor vs LLaVA + SAM, 8 images 640x480",
            ours_call,
            llava_and_sam,
            ours_label="ULlavaProcessor (CLIP 224 + SAM 1024)",
            peer_label="LlavaProcessor (CLIP 224) + SamProcessor (1024)",
            repeats=repeats,
            target="<= 1.0 (time)",
            notes="Time ratio; images/s ratio is its inverse. Same two image branches and prompt on both sides.",
            extra=extra,
        ),
    ]


# ----------------------------------------------------------------------------------------------------------------
# 3: TAP


def _tap_prompts(boxes: list[list[list[float]]]) -> tuple[list, list]:
    """Per image 3 click prompts (centres of its first objects, repeated if fewer) and 2 box prompts."""
    points, box_prompts = [], []
    for image_boxes in boxes:
        picks = [image_boxes[index % len(image_boxes)] for index in range(3)]
        points.append([[[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]] for box in picks])
        box_prompts.append([image_boxes[index % len(image_boxes)] for index in range(2)])
    return points, box_prompts


def _tap_comparison(repeats: int, images: list[PIL.Image.Image], boxes: list[list[list[float]]]) -> Comparison:
    ours = TapProcessor(TapImageProcessor(), tiny_tap_tokenizer(), max_caption_length=40)
    sam = SamProcessor(_sam_image_processor())
    points, box_prompts = _tap_prompts(boxes)
    # SamProcessor: input_points (image, point_batch, points, 2), input_labels (image, point_batch, points).
    sam_labels = [[[1] for _ in image_points] for image_points in points]
    return compare(
        "TAP processor, 8 images 640x480 + 5 prompts each",
        lambda: ours(images=images, points=points, boxes=box_prompts, return_tensors="pt"),
        lambda: sam(
            images=images, input_points=points, input_labels=sam_labels, input_boxes=box_prompts, return_tensors="pt"
        ),
        ours_label="TapProcessor (1024 px)",
        peer_label="SamProcessor (1024 px)",
        repeats=repeats,
        target="<= 1.0 (time)",
        notes="Time ratio; same images, 3 clicks + 2 boxes per image in original pixels on both sides.",
        extra={"images": len(images), "image_size": f"{WIDTH}x{HEIGHT}", "points": 3, "boxes": 2},
    )


# ----------------------------------------------------------------------------------------------------------------
# 4: RegionBLIP


def _regionblip_comparison(repeats: int, images: list[PIL.Image.Image], boxes: list[list[list[float]]]) -> Comparison:
    tokenizer = build_word_tokenizer(tiny_regionblip_words(), extra_special_tokens=[REGIONBLIP_IMAGE_TOKEN])
    image_processor = BlipImageProcessor(size={"height": 224, "width": 224})
    ours = RegionBlipProcessor(image_processor, tokenizer, num_query_tokens=32)
    blip2 = Blip2Processor(image_processor, tokenizer, num_query_tokens=32)
    prompt = T5_PROMPTS["image_region"]
    texts = [prompt] * len(images)
    regions = [[image_boxes[0]] for image_boxes in boxes]
    return compare(
        "RegionBLIP processor, 8 images 640x480 + 1 box each",
        lambda: ours(images=images, boxes=regions, text=texts, return_tensors="pt"),
        lambda: blip2(images=images, text=texts, return_tensors="pt"),
        ours_label="RegionBlipProcessor (224 px)",
        peer_label="Blip2Processor (224 px)",
        repeats=repeats,
        target="<= 1.0 (time)",
        notes="Time ratio; same BlipImageProcessor, 32 query placeholders and prompt; ours also normalizes the box.",
        extra={"images": len(images), "image_size": f"{WIDTH}x{HEIGHT}", "num_query_tokens": 32},
    )


def run(quick: bool = False) -> list[Comparison]:
    """The four processor rows; `quick` uses fewer repetitions (same inputs)."""
    repeats = 3 if quick else 11
    images, boxes = _scenes()
    return [
        *_ullava_comparisons(repeats, images),
        _tap_comparison(repeats, images, boxes),
        _regionblip_comparison(repeats, images, boxes),
    ]
