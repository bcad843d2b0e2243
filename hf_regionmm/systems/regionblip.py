"""RegionBLIP as a registered system: Auto-class registration and the tiny factories the shared tests and demo use.

Importing this module registers `RegionBlipConfig` (model type `"regionblip"`) with `AutoConfig`, `RegionBlipModel`
with `AutoModel`, `RegionBlipForConditionalGeneration` with `AutoModelForImageTextToText`, `BlipImageProcessor` for
the config with `AutoImageProcessor` and `RegionBlipProcessor` with `AutoProcessor` (Point-BERT's `PointBertConfig`
also resolves through `AutoConfig`). The tiny model (BLIP-2-compatible sizes: a 56-pixel ViT, 2-layer Q-Formers,
4 queries, a 2-layer OPT) works on the synthetic scenes and point clouds of `hf_regionmm.data.synthetic` with a
word-level tokenizer, so everything runs offline on a CPU in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import BlipImageProcessor, PreTrainedModel

from hf_regionmm.data.synthetic import (
    generate_3d_scenes,
    generate_point_clouds,
    generate_scenes,
    split_words,
    vocabulary_words,
)
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.evaluation.regionblip_eval import evaluate_regionblip_checkpoint
from hf_regionmm.hub.convert_regionblip import convert_regionblip_checkpoint
from hf_regionmm.modeling.configuration_regionblip import RegionBlipConfig
from hf_regionmm.modeling.modeling_regionblip import (
    RegionBlipForConditionalGeneration,
    RegionBlipModel,
    qformer_text_inputs,
)
from hf_regionmm.modeling.point_bert import PointBertConfig
from hf_regionmm.processing.processing_regionblip import IMAGE_TOKEN, T5_PROMPTS, RegionBlipProcessor
from hf_regionmm.registry import BadInputCase, SystemSpec, TrainingRecipe, register_system
from hf_regionmm.trainers.regionblip import (
    REGIONBLIP_STAGES,
    RegionBlipCollator,
    RegionBlipTrainer,
    RegionBlipTrainingDataset,
)

__all__ = [
    "REGIONBLIP_SYSTEM",
    "TINY_NUM_POINTS",
    "tiny_regionblip_config",
    "tiny_regionblip_processor",
    "tiny_regionblip_words",
]

TINY_NUM_POINTS = 64


@lru_cache(maxsize=1)
def tiny_regionblip_words() -> tuple[str, ...]:
    """Words of the tiny tokenizer: the synthetic vocabulary plus the Flan-T5 prompts."""
    words = list(vocabulary_words())
    for prompt in T5_PROMPTS.values():
        words += split_words(prompt)
    return tuple(dict.fromkeys(word.lower() for word in words))


def _tiny_image_token_index() -> int:
    # build_word_tokenizer: <unk> <s> </s> <pad>, the words, then the extra special tokens (`<image>`).
    return 4 + len(tiny_regionblip_words())


def tiny_regionblip_config(**overrides: Any) -> RegionBlipConfig:
    """`RegionBlipConfig.from_preset("regionblip-tiny")` with the vocabulary of the tiny tokenizer.

    The tiny Q-Formers share the word tokenizer with the LLM (there is no BERT tokenizer offline): their vocabulary is
    the LLM's plus one `[DEC]` id at the end, which starts the Q-Former captions of ITG.
    """
    image_token_index = _tiny_image_token_index()
    text_config = {"vocab_size": image_token_index + 1, **overrides.pop("text_config", {})}
    qformer_vocab = {"vocab_size": image_token_index + 2}
    for name in ("qformer_config", "point_cloud_qformer_config"):
        if overrides.get(name, {}) is not None:
            overrides[name] = {**qformer_vocab, **overrides.get(name, {})}
    overrides.setdefault("image_token_index", image_token_index)
    overrides.setdefault("qformer_decoder_start_token_id", image_token_index + 1)
    return RegionBlipConfig.from_preset("regionblip-tiny", text_config=text_config, **overrides)


def tiny_regionblip_processor(num_points: int = TINY_NUM_POINTS) -> RegionBlipProcessor:
    """An offline `RegionBlipProcessor` for the tiny config: 56-pixel images, 64-point clouds, word tokenizer."""
    config = tiny_regionblip_config()
    tokenizer = build_word_tokenizer(tiny_regionblip_words(), extra_special_tokens=[IMAGE_TOKEN])
    size = config.vision_config.image_size
    image_processor = BlipImageProcessor(size={"height": size, "width": size})
    return RegionBlipProcessor(
        image_processor, tokenizer, num_query_tokens=config.num_query_tokens, num_points=num_points
    )


@lru_cache(maxsize=1)
def _example_scenes() -> list[dict]:
    scenes = generate_scenes(2, seed=0, image_size_range=(64, 112), min_objects=2, max_objects=3, with_masks=False)
    return [scenes[index] for index in range(len(scenes))]


def example_inputs(processor: RegionBlipProcessor, config: RegionBlipConfig) -> dict:
    """An image-region batch: two synthetic scenes, one object box each, its region caption as the label (LLM) and
    as Q-Former text (ITC / ITG), as `RegionBlipCollator` builds training batches."""
    scenes = _example_scenes()
    captions = [scene["region_captions"][0] for scene in scenes]
    inputs = processor(
        images=[scene["image"] for scene in scenes],
        boxes=[[scene["boxes"][0]] for scene in scenes],
        captions=captions,
        return_tensors="pt",
    )
    inputs = dict(inputs)
    if config.use_qformer_losses:
        inputs.update(qformer_text_inputs(processor.tokenizer, captions, config.qformer_max_text_length))
    return inputs


def generation_inputs(processor: RegionBlipProcessor, config: RegionBlipConfig) -> dict:
    """Image-region prompts (empty, as released for OPT), left-padded for batched generation."""
    scenes = _example_scenes()
    inputs = processor(
        images=[scene["image"] for scene in scenes],
        boxes=[[scene["boxes"][-1]] for scene in scenes],
        padding_side="left",
        return_tensors="pt",
    )
    return dict(inputs)


def _point_cloud_inputs(processor: RegionBlipProcessor, num_points: int) -> dict:
    clouds = generate_point_clouds(2, seed=0, num_points=num_points)
    return dict(processor(point_clouds=[clouds[i]["points"] for i in range(2)], captions=["a cube", "a sphere"]))


def _call_model(inputs_builder):
    def call(model: PreTrainedModel, processor: RegionBlipProcessor) -> Any:
        return model(**inputs_builder(processor, model.config))

    return call


def _with_example(**changes: Any):
    def build(processor: RegionBlipProcessor, config: RegionBlipConfig) -> dict:
        inputs = example_inputs(processor, config)
        for key, change in changes.items():
            inputs[key] = change(inputs, config)
        return inputs

    return build


def _box_outside(inputs: dict, config: RegionBlipConfig) -> torch.Tensor:
    boxes = inputs["region_boxes"].clone()
    boxes[1] = torch.tensor([0.2, 0.2, 1.7, 0.9])
    return boxes


def _box_nan(inputs: dict, config: RegionBlipConfig) -> torch.Tensor:
    boxes = inputs["region_boxes"].clone()
    boxes[0, 2] = float("nan")
    return boxes


def _no_placeholders(inputs: dict, config: RegionBlipConfig) -> torch.Tensor:
    input_ids = inputs["input_ids"].clone()
    input_ids[0, 0] = config.text_config.eos_token_id
    return input_ids


def _too_few_points(processor: RegionBlipProcessor, config: RegionBlipConfig) -> dict:
    inputs = _point_cloud_inputs(processor, TINY_NUM_POINTS)
    inputs["point_clouds"] = inputs["point_clouds"][:, : config.point_bert_config.num_groups - 1]
    return inputs


def build_training_dataset(
    processor: RegionBlipProcessor, num_samples: int, seed: int, stage: str | None = None
) -> RegionBlipTrainingDataset:
    """Synthetic I-region, P and P-region captioning data, `num_samples` in total (rounded up to a multiple of 3)."""
    per_modality = max(1, -(-num_samples // 3))
    scenes = generate_scenes(per_modality, seed=seed, image_size_range=(64, 112), with_masks=False)
    clouds = generate_point_clouds(per_modality, seed=seed, num_points=processor.num_points)
    scenes_3d = generate_3d_scenes(per_modality, seed=seed, num_points=max(256, processor.num_points))
    return RegionBlipTrainingDataset.from_synthetic(scenes, clouds, scenes_3d, seed=seed)


def bad_inputs() -> list[BadInputCase]:
    """Calls that must fail with a clear error naming the argument."""
    scene = _example_scenes()[0]
    return [
        BadInputCase(
            "pixel_values of the wrong size",
            _call_model(_with_example(pixel_values=lambda inputs, config: torch.zeros(2, 3, 20, 20))),
            ValueError,
            r"`pixel_values`",
        ),
        BadInputCase(
            "region box outside [0, 1]",
            _call_model(_with_example(region_boxes=_box_outside)),
            ValueError,
            r"`region_boxes`.*\[0, 1\]",
        ),
        BadInputCase("region box with NaN", _call_model(_with_example(region_boxes=_box_nan)), ValueError, "NaN"),
        BadInputCase(
            "two modalities in one batch",
            _call_model(_with_example(point_clouds=lambda inputs, config: torch.zeros(2, TINY_NUM_POINTS, 3))),
            ValueError,
            "one modality per batch",
        ),
        BadInputCase(
            "prompt without all query placeholders",
            _call_model(_with_example(input_ids=_no_placeholders)),
            ValueError,
            "placeholders",
        ),
        BadInputCase(
            "point cloud with fewer points than Point-BERT groups",
            _call_model(_too_few_points),
            ValueError,
            r"`point_clouds`.*at least",
        ),
        BadInputCase(
            "processor: pixel box outside the image",
            lambda model, processor: processor(images=[scene["image"]], boxes=[[[0.0, 0.0, 10_000.0, 10.0]]]),
            ValueError,
            r"`boxes\[0\]\[0\]`.*outside",
        ),
        BadInputCase(
            "processor: two regions for one image",
            lambda model, processor: processor(
                images=[scene["image"]], boxes=[[scene["boxes"][0], scene["boxes"][1]]]
            ),
            ValueError,
            r"`boxes\[0\]`",
        ),
        BadInputCase(
            "processor: point cloud with too few points",
            lambda model, processor: processor(point_clouds=[torch.zeros(TINY_NUM_POINTS - 1, 3)]),
            ValueError,
            r"`point_clouds\[0\]`.*num_points",
        ),
    ]


def regionblip_demo_hook(output_dir: Path, progress: Callable[[str], None], **options: Any) -> dict[str, float]:
    """`hf-regionmm demo` for RegionBLIP: see `hf_regionmm.systems.regionblip_demo.regionblip_demo` (imported on use,
    since that module builds on this one)."""
    from hf_regionmm.systems.regionblip_demo import regionblip_demo

    return regionblip_demo(output_dir, progress, **options)


REGIONBLIP_SYSTEM = register_system(
    SystemSpec(
        name="regionblip",
        config_class=RegionBlipConfig,
        model_classes={
            "AutoModel": RegionBlipModel,
            "AutoModelForImageTextToText": RegionBlipForConditionalGeneration,
        },
        main_auto_class="AutoModelForImageTextToText",
        tiny_config=tiny_regionblip_config,
        tiny_processor=tiny_regionblip_processor,
        example_inputs=example_inputs,
        image_processor_classes={"torchvision": BlipImageProcessor},
        processor_class=RegionBlipProcessor,
        extra_configs=(PointBertConfig,),
        generation_inputs=generation_inputs,
        bad_inputs=bad_inputs,
        training=TrainingRecipe(
            trainer_class=RegionBlipTrainer,
            build_dataset=build_training_dataset,
            collator=RegionBlipCollator,
            stages=REGIONBLIP_STAGES,
            default_stage="pretrain",
        ),
        card_template="regionblip",
        demo=regionblip_demo_hook,
        evaluate=evaluate_regionblip_checkpoint,
        convert=convert_regionblip_checkpoint,
        # The frozen BLIP-2 parts and Point-BERT, plus what the image-region example does not use: the image path
        # (frozen: BLIP-2's queries, projection and image LoRA), the ITM head (image modality only, as released) and
        # every point-cloud parameter.
        frozen_parameter_patterns=(
            "model.vision_tower.",
            "model.point_encoder.",
            "model.point_cloud_adapter.",
            "model.point_cloud_qformer.",
            "model.point_cloud_qformer_text.",
            "model.itm_head.",
            "query_tokens.point_cloud",
            "point_cloud_region",
            ".point_cloud.",
            ".image.",
        ),
    )
)
