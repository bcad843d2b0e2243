"""u-LLaVA as a registered system: Auto-class registration and the tiny factories the shared tests and demo use.

Importing this module registers `ULlavaConfig` (model type `"ullava"`) with `AutoConfig`, `ULlavaModel` with
`AutoModel`, `ULlavaForConditionalGeneration` with `AutoModelForImageTextToText`, `ULlavaImageProcessor` with
`AutoImageProcessor` and `ULlavaProcessor` with `AutoProcessor`. The tiny model (CLIP 56 px, SAM 64 px, a 2-layer
Llama) works on the synthetic coloured-shape scenes with a word-level tokenizer, offline, in seconds.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from hf_regionmm.data.synthetic import decode_masks, generate_scenes, generate_videos, split_words, vocabulary_words
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.evaluation.ullava_eval import evaluate_ullava_checkpoint
from hf_regionmm.hub.convert_ullava import convert_ullava_checkpoint
from hf_regionmm.modeling.configuration_ullava import ULLAVA_NEW_TOKENS, ULlavaConfig
from hf_regionmm.modeling.modeling_ullava import ULlavaForConditionalGeneration, ULlavaModel
from hf_regionmm.processing import processing_ullava
from hf_regionmm.processing.image_processing_ullava import ULlavaImageProcessor
from hf_regionmm.processing.processing_ullava import ULlavaProcessor
from hf_regionmm.registry import BadInputCase, SystemSpec, TrainingRecipe, register_system
from hf_regionmm.systems.ullava_demo import ullava_demo
from hf_regionmm.trainers.ullava import (
    _CAPTION_PROMPT,
    ULLAVA_STAGES,
    ULLAVA_TASKS,
    ULlavaCollator,
    ULlavaTrainer,
    ULlavaTrainingDataset,
)

__all__ = ["ULLAVA_SYSTEM", "tiny_ullava_config", "tiny_ullava_processor", "tiny_ullava_words"]


@lru_cache(maxsize=1)
def tiny_ullava_words() -> tuple[str, ...]:
    """Words of the tiny tokenizer: the synthetic vocabulary plus the conversation and task templates."""
    texts = [
        processing_ullava.ULLAVA_SYSTEM_PROMPT,
        "USER ASSISTANT Sure Mask Location Info Explanation",
        _CAPTION_PROMPT,
        *processing_ullava.RES_INSTRUCTIONS,
        *processing_ullava.REC_INSTRUCTIONS,
        *processing_ullava.SALIENT_INSTRUCTIONS,
        *processing_ullava.VIDEO_CAPTION_INSTRUCTIONS,
    ]
    words = list(vocabulary_words())
    for text in texts:
        words += split_words(text.replace("{}", " "))
    return tuple(dict.fromkeys(word.lower() for word in words))


def _tiny_text_vocab_size() -> int:
    # build_word_tokenizer: <unk> <s> </s> <pad>, the words, then u-LLaVA's 11 tokens as the last ids.
    return 4 + len(tiny_ullava_words()) + len(ULLAVA_NEW_TOKENS)


def tiny_ullava_config(**overrides: Any) -> ULlavaConfig:
    """`ULlavaConfig.from_preset("ullava-tiny")` with the vocabulary of the tiny tokenizer."""
    text_config = {"vocab_size": _tiny_text_vocab_size(), **overrides.pop("text_config", {})}
    return ULlavaConfig.from_preset("ullava-tiny", text_config=text_config, **overrides)


def tiny_ullava_processor() -> ULlavaProcessor:
    """An offline `ULlavaProcessor` for the tiny config: 56 px CLIP input, 64 px SAM input, word-level tokenizer."""
    config = tiny_ullava_config()
    tokenizer = build_word_tokenizer(tiny_ullava_words(), extra_special_tokens=ULLAVA_NEW_TOKENS)
    return ULlavaProcessor.from_model_config(config, tokenizer)


@lru_cache(maxsize=1)
def _example_scenes() -> list[dict]:
    scenes = generate_scenes(2, seed=0, image_size_range=(64, 96), min_objects=2, max_objects=3, with_masks=True)
    return [scenes[index] for index in range(len(scenes))]


def _instruction(scene: dict, task: str) -> dict:
    return next(item for item in scene["ullava_instructions"] if item["task"] == task)


def example_inputs(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    """A mixed batch: a RES sample (answer with `[SEG]` and `[LOC]`: one mask and one box target) and a REC sample
    (answer with `[LOC]`: one box target), with labels on the answers."""
    res_scene, rec_scene = _example_scenes()
    res, rec = _instruction(res_scene, "res"), _instruction(rec_scene, "rec")
    mask = decode_masks(res_scene)[res["object_indices"]].any(axis=0)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    res_box = [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]
    rec_box = rec_scene["boxes"][rec["object_indices"][0]]
    inputs = processor(
        images=[res_scene["image"], rec_scene["image"]],
        text=[res["instruction"], rec["instruction"]],
        answers=[res["answer"], rec["answer"]],
        ground_masks=[[mask], []],
        ground_boxes=[[res_box], [rec_box]],
        return_tensors="pt",
    )
    return dict(inputs)


def generation_inputs(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    """Two prompts of different lengths, left-padded for batched generation."""
    res_scene, rec_scene = _example_scenes()
    inputs = processor(
        images=[res_scene["image"], rec_scene["image"]],
        text=[_instruction(res_scene, "res")["instruction"], processing_ullava.salient_prompt()],
        padding_side="left",
        return_tensors="pt",
    )
    return {key: value for key, value in inputs.items() if key != "sam_pixel_values"}


def _call_model(inputs_builder):
    def call(model: PreTrainedModel, processor: ULlavaProcessor) -> Any:
        return model(**inputs_builder(processor, model.config))

    return call


def _seg_without_image(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    inputs = processor(text=["find it"], answers=[processing_ullava.res_answer("red circle")], return_tensors="pt")
    return {**inputs, "seg_masks": [torch.zeros(1, 8, 8)]}


def _sam_batch_mismatch(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    inputs = example_inputs(processor, config)
    return {**inputs, "sam_pixel_values": inputs["sam_pixel_values"][:1]}


def _wrong_frame_count(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    video = generate_videos(1, seed=0, num_frames=config.num_video_frames, image_size=64)[0]
    inputs = processor(videos=[video["frames"]], text=["describe the video"], return_tensors="pt")
    frames = inputs["pixel_values_videos"]
    return {**inputs, "pixel_values_videos": frames[:, : config.num_video_frames - 1]}


def _wrong_image_size(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    inputs = example_inputs(processor, config)
    return {**inputs, "pixel_values": torch.zeros(2, 3, config.image_size * 2, config.image_size * 2)}


def _missing_mask_target(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    inputs = example_inputs(processor, config)
    return {**inputs, "seg_masks": [inputs["seg_masks"][0].repeat(2, 1, 1), inputs["seg_masks"][1]]}


def _image_tokens_without_image(processor: ULlavaProcessor, config: ULlavaConfig) -> dict:
    inputs = example_inputs(processor, config)
    return {key: value for key, value in inputs.items() if key not in ("pixel_values", "sam_pixel_values")} | {
        "seg_masks": None
    }


def bad_inputs() -> list[BadInputCase]:
    """Calls that must fail with a clear error naming the argument."""
    scene = _example_scenes()[0]
    return [
        BadInputCase("[SEG] in text without an image", _call_model(_seg_without_image), ValueError, r"\[SEG\].*image"),
        BadInputCase(
            "SAM and CLIP inputs for different batches",
            _call_model(_sam_batch_mismatch),
            ValueError,
            r"`sam_pixel_values`.*`pixel_values`",
        ),
        BadInputCase(
            "video with the wrong frame count",
            _call_model(_wrong_frame_count),
            ValueError,
            r"`pixel_values_videos`.*num_video_frames",
        ),
        BadInputCase("pixel_values of the wrong size", _call_model(_wrong_image_size), ValueError, r"`pixel_values`"),
        BadInputCase(
            "more masks than [SEG] tokens", _call_model(_missing_mask_target), ValueError, r"`seg_masks\[0\]`.*\[SEG\]"
        ),
        BadInputCase(
            "image tokens without pixel_values",
            _call_model(_image_tokens_without_image),
            ValueError,
            r"<image_patch>.*`pixel_values`",
        ),
        BadInputCase(
            "processor: target box outside the image",
            lambda model, processor: processor(
                images=[scene["image"]],
                text=["where is it?"],
                answers=[processing_ullava.rec_answer("red circle")],
                ground_boxes=[[[0.0, 0.0, 10_000.0, 10.0]]],
            ),
            ValueError,
            r"`ground_boxes\[0\]\[0\]`.*outside",
        ),
        BadInputCase(
            "processor: two <image> for one image",
            lambda model, processor: processor(images=[scene["image"]], text=["<image> <image> what is it?"]),
            ValueError,
            r"`text\[0\]`.*<image>",
        ),
    ]


def build_training_dataset(
    processor: ULlavaProcessor, num_samples: int, seed: int, stage: str | None = None
) -> ULlavaTrainingDataset:
    """Synthetic scenes with masks (+ a few captioned videos): captions for `align`, the full task mix otherwise."""
    scenes = generate_scenes(
        num_samples, seed=seed, split="train", image_size_range=(64, 112), max_objects=4, with_masks=True
    )
    num_videos = max(1, num_samples // 8)
    videos = generate_videos(
        num_videos, seed=seed, split="train", num_frames=processor.num_video_frames, image_size=64
    )
    tasks = ("caption",) if stage == "align" else ULLAVA_TASKS
    return ULlavaTrainingDataset(scenes, videos, tasks=tasks, seed=seed)


ULLAVA_SYSTEM = register_system(
    SystemSpec(
        name="ullava",
        config_class=ULlavaConfig,
        model_classes={"AutoModel": ULlavaModel, "AutoModelForImageTextToText": ULlavaForConditionalGeneration},
        main_auto_class="AutoModelForImageTextToText",
        tiny_config=tiny_ullava_config,
        tiny_processor=tiny_ullava_processor,
        example_inputs=example_inputs,
        image_processor_classes={"torchvision": ULlavaImageProcessor},
        processor_class=ULlavaProcessor,
        generation_inputs=generation_inputs,
        bad_inputs=bad_inputs,
        training=TrainingRecipe(
            trainer_class=ULlavaTrainer,
            build_dataset=build_training_dataset,
            collator=ULlavaCollator,
            stages=ULLAVA_STAGES,
            default_stage="instruct",
        ),
        card_template="ullava",
        demo=ullava_demo,
        evaluate=evaluate_ullava_checkpoint,
        convert=convert_ullava_checkpoint,
        # CLIP and the SAM image encoder are frozen in both stages. The CLIP layers after `vision_feature_layer`, the
        # SAM prompt encoder's point/box/mask embeddings and the mask decoder's IoU head are unused by u-LLaVA
        # (a [SEG] prompt with single-mask output), so no gradient reaches them.
        frozen_parameter_patterns=(
            "model.vision_tower.",
            "model.sam_vision_encoder.",
            "model.sam_prompt_encoder.",
            "model.sam_mask_decoder.iou_prediction_head.",
        ),
    )
)
