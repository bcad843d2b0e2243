"""Groma as a registered system: Auto-class registration and the tiny factories the shared tests and demo use.

Importing this module registers `GromaConfig` (model type `"groma"`) with `AutoConfig`, `GromaModel` with
`AutoModel`, `GromaForConditionalGeneration` with `AutoModelForImageTextToText`, `GromaImageProcessor` with
`AutoImageProcessor` and `GromaProcessor` with `AutoProcessor` (the proposer's `DetrProposerConfig` also resolves
through `AutoConfig`). The tiny model works on the synthetic coloured-shape scenes of `hf_regionmm.data.synthetic`
with a word-level tokenizer over their vocabulary, so everything runs offline on a CPU in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_regionmm.data.synthetic import generate_scenes, split_words, vocabulary_words
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.evaluation.groma_eval import evaluate_groma_checkpoint
from hf_regionmm.hub.convert_groma import convert_groma_checkpoint
from hf_regionmm.modeling.configuration_detr_proposer import DetrProposerConfig
from hf_regionmm.modeling.configuration_groma import GromaConfig, groma_special_tokens
from hf_regionmm.modeling.modeling_groma import GromaForConditionalGeneration, GromaModel
from hf_regionmm.processing import processing_groma
from hf_regionmm.processing.image_processing_groma import GromaImageProcessor
from hf_regionmm.processing.processing_groma import GromaProcessor
from hf_regionmm.registry import BadInputCase, SystemSpec, TrainingRecipe, register_system
from hf_regionmm.trainers.groma import (
    GROMA_ANNOTATION_COLUMNS,
    GROMA_STAGES,
    GROMA_TASKS,
    GromaCollator,
    GromaTrainer,
    GromaTrainingDataset,
    groma_tasks_of_scene,
)

__all__ = ["GROMA_SYSTEM", "tiny_groma_config", "tiny_groma_processor", "tiny_groma_words"]

_TINY_MAX_REGION_NUM = GromaConfig.from_preset("groma-tiny").max_region_num


@lru_cache(maxsize=1)
def tiny_groma_words() -> tuple[str, ...]:
    """Words of the tiny tokenizer: the synthetic data's vocabulary plus the released conversation and task prompts."""
    texts = [
        processing_groma.GROMA_SYSTEM_PROMPT,
        processing_groma.FIRST_USER_TURN,
        processing_groma.FIRST_ASSISTANT_TURN,
        "USER ASSISTANT",
        *processing_groma.REC_INSTRUCTIONS,
        *processing_groma.MULTI_GROUNDING_INSTRUCTIONS,
        *processing_groma.REGION_CAPTION_INSTRUCTIONS,
        *processing_groma.DETAILED_REGION_CAPTION_INSTRUCTIONS,
        *processing_groma.GROUNDED_CAPTION_INSTRUCTIONS,
    ]
    words = list(vocabulary_words())
    for text in texts:
        for token in groma_special_tokens(1):
            text = text.replace(token, " ")
        words += split_words(text.replace("{}", " "))
    # The tokenizer lower-cases; deduplicate after lower-casing so its base vocabulary size is known.
    return tuple(dict.fromkeys(word.lower() for word in words))


def _tiny_text_vocab_size() -> int:
    # build_word_tokenizer puts <unk> <s> </s> <pad> first, then the words, then Groma's tokens.
    return 4 + len(tiny_groma_words())


def tiny_groma_config(**overrides: Any) -> GromaConfig:
    """`GromaConfig.from_preset("groma-tiny")` with the text vocabulary of the tiny tokenizer."""
    text_config = {"vocab_size": _tiny_text_vocab_size(), **overrides.pop("text_config", {})}
    return GromaConfig.from_preset("groma-tiny", text_config=text_config, **overrides)


def tiny_groma_processor(max_region_num: int = _TINY_MAX_REGION_NUM) -> GromaProcessor:
    """An offline `GromaProcessor` for the tiny config: 112-pixel images and a word-level tokenizer."""
    config = tiny_groma_config(max_region_num=max_region_num)
    tokenizer = build_word_tokenizer(tiny_groma_words(), extra_special_tokens=groma_special_tokens(max_region_num))
    image_processor = GromaImageProcessor(size={"height": config.image_size, "width": config.image_size})
    return GromaProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=config.num_image_tokens,
        max_region_num=config.max_region_num,
    )


@lru_cache(maxsize=1)
def _example_scenes() -> list[dict]:
    scenes = generate_scenes(2, seed=0, image_size_range=(96, 160), min_objects=2, max_objects=4, with_masks=False)
    return [scenes[index] for index in range(len(scenes))]


def example_inputs(processor: GromaProcessor, config: GromaConfig) -> dict:
    """Two synthetic scenes: a REC sample (answer `<roi><ground_box></roi>`, one ground-truth box) and a region
    caption sample (one user box referred to with `<refer_feat>`), with labels on the answers."""
    rec_scene, caption_scene = _example_scenes()
    expression = rec_scene["referring_expressions"][0]
    target_box = rec_scene["boxes"][expression["object_index"]]
    inputs = processor(
        images=[rec_scene["image"], caption_scene["image"]],
        text=[processing_groma.rec_prompt(expression["text"]), processing_groma.region_caption_prompt()],
        boxes=[[], [caption_scene["boxes"][0]]],
        ground_boxes=[[target_box], []],
        answers=[
            processing_groma.rec_answer(),
            processing_groma.region_caption_answer(caption_scene["region_captions"][0]),
        ],
        return_tensors="pt",
    )
    return dict(inputs)


def generation_inputs(processor: GromaProcessor, config: GromaConfig) -> dict:
    """Two prompts of different lengths, left-padded for batched generation."""
    rec_scene, caption_scene = _example_scenes()
    inputs = processor(
        images=[rec_scene["image"], caption_scene["image"]],
        text=[processing_groma.grounded_caption_prompt(), processing_groma.region_caption_prompt()],
        boxes=[[], [caption_scene["boxes"][0]]],
        padding_side="left",
        return_tensors="pt",
    )
    return dict(inputs)


def _with(inputs: dict, **changes: Any) -> dict:
    return {**inputs, **changes}


def _call_model(inputs_builder):
    def call(model: PreTrainedModel, processor: GromaProcessor) -> Any:
        return model(**inputs_builder(processor, model.config))

    return call


def _wrong_image_size(processor: GromaProcessor, config: GromaConfig) -> dict:
    inputs = example_inputs(processor, config)
    return _with(inputs, pixel_values=torch.zeros(2, 3, config.image_size // 2, config.image_size // 2))


def _refer_box_outside_image(processor: GromaProcessor, config: GromaConfig) -> dict:
    inputs = example_inputs(processor, config)
    boxes = inputs["refer_boxes"].clone()
    boxes[1, 0] = torch.tensor([0.2, 0.2, 1.7, 0.9])
    return _with(inputs, refer_boxes=boxes)


def _refer_box_nan(processor: GromaProcessor, config: GromaConfig) -> dict:
    inputs = example_inputs(processor, config)
    boxes = inputs["refer_boxes"].clone()
    boxes[1, 0, 2] = float("nan")
    return _with(inputs, refer_boxes=boxes)


def _refer_box_inverted(processor: GromaProcessor, config: GromaConfig) -> dict:
    inputs = example_inputs(processor, config)
    boxes = inputs["refer_boxes"].clone()
    boxes[1, 0] = torch.tensor([0.8, 0.2, 0.1, 0.9])
    return _with(inputs, refer_boxes=boxes)


def _too_many_refer_boxes(processor: GromaProcessor, config: GromaConfig) -> dict:
    inputs = example_inputs(processor, config)
    count = config.max_region_num + 1
    return _with(
        inputs,
        refer_boxes=torch.tensor([0.1, 0.1, 0.5, 0.5]).repeat(2, count, 1),
        refer_boxes_mask=torch.ones(2, count, dtype=torch.bool),
    )


def _missing_region_slot(processor: GromaProcessor, config: GromaConfig) -> dict:
    inputs = example_inputs(processor, config)
    input_ids = inputs["input_ids"].clone()
    first_slot = (input_ids[0] == config.region_token_id).nonzero()[0, 0]
    input_ids[0, first_slot] = config.text_config.eos_token_id
    return _with(inputs, input_ids=input_ids)


def build_training_dataset(
    processor: GromaProcessor, num_samples: int, seed: int, stage: str | None = None
) -> GromaTrainingDataset:
    """Synthetic training scenes for `stage`: box targets for `det`, the mixed region tasks otherwise."""
    scenes = generate_scenes(num_samples, seed=seed, split="train", image_size_range=(112, 192), with_masks=False)
    return training_dataset_from_scenes(processor, scenes, seed, stage)


def training_dataset_from_scenes(
    processor: GromaProcessor, scenes: Any, seed: int, stage: str | None = None
) -> GromaTrainingDataset:
    """`stage`'s training data from scenes in the synthetic schema (synthetic or from a real-format loader):
    box targets for `det`, otherwise the mixed region tasks each scene has annotations for. Scenes with none of
    them (e.g. a COCO image without objects for the text tasks) are left out."""
    tasks = ("detection",) if stage == "det" else GROMA_TASKS
    # Only the annotation columns: reading whole rows of a `datasets.Dataset` would decode every image here.
    annotations = (
        scenes.select_columns(list(GROMA_ANNOTATION_COLUMNS)) if hasattr(scenes, "select_columns") else scenes
    )
    usable = [index for index in range(len(scenes)) if set(groma_tasks_of_scene(annotations[index])) & set(tasks)]
    if not usable:
        raise ValueError(
            f"None of the {len(scenes)} scenes has annotations for the {stage or 'instruct'} stage's tasks "
            f"{list(tasks)}; e.g. `det` needs boxes (COCO), REC referring expressions (RefCOCO)."
        )
    if len(usable) < len(scenes):
        scenes = scenes.select(usable) if hasattr(scenes, "select") else [scenes[index] for index in usable]
    return GromaTrainingDataset(scenes, tasks=tasks, seed=seed)


def groma_demo_hook(output_dir: Path, progress: Callable[[str], None], **options: Any) -> dict[str, float]:
    """`hf-regionmm demo` for Groma: see `hf_regionmm.systems.groma_demo.groma_demo` (imported on use, since that
    module builds on this one)."""
    from hf_regionmm.systems.groma_demo import groma_demo

    return groma_demo(output_dir, progress, **options)


def bad_inputs() -> list[BadInputCase]:
    """Calls that must fail with a clear ValueError naming the argument."""
    return [
        BadInputCase("pixel_values of the wrong size", _call_model(_wrong_image_size), ValueError, r"`pixel_values`"),
        BadInputCase(
            "user box outside [0, 1]", _call_model(_refer_box_outside_image), ValueError, r"`refer_boxes`.*\[0, 1\]"
        ),
        BadInputCase("user box with NaN", _call_model(_refer_box_nan), ValueError, r"`refer_boxes`.*NaN"),
        BadInputCase(
            "user box with x2 < x1", _call_model(_refer_box_inverted), ValueError, r"`refer_boxes`.*x2 >= x1"
        ),
        BadInputCase(
            "more user boxes than region slots",
            _call_model(_too_many_refer_boxes),
            ValueError,
            r"`refer_boxes`.*max_region_num",
        ),
        BadInputCase(
            "prompt without all region slots", _call_model(_missing_region_slot), ValueError, r"region slots"
        ),
        BadInputCase(
            "processor: pixel box outside the image",
            lambda model, processor: processor(
                images=[_example_scenes()[0]["image"]],
                text=[processing_groma.region_caption_prompt()],
                boxes=[[[0.0, 0.0, 10_000.0, 10.0]]],
            ),
            ValueError,
            r"`boxes\[0\]\[0\]`.*outside",
        ),
    ]


GROMA_SYSTEM = register_system(
    SystemSpec(
        name="groma",
        config_class=GromaConfig,
        model_classes={"AutoModel": GromaModel, "AutoModelForImageTextToText": GromaForConditionalGeneration},
        main_auto_class="AutoModelForImageTextToText",
        tiny_config=tiny_groma_config,
        tiny_processor=tiny_groma_processor,
        example_inputs=example_inputs,
        image_processor_classes={"torchvision": GromaImageProcessor},
        processor_class=GromaProcessor,
        extra_configs=(DetrProposerConfig,),
        generation_inputs=generation_inputs,
        bad_inputs=bad_inputs,
        training=TrainingRecipe(
            trainer_class=GromaTrainer,
            build_dataset=build_training_dataset,
            collator=GromaCollator,
            stages=GROMA_STAGES,
            default_stage="instruct",
            dataset_from_scenes=training_dataset_from_scenes,
        ),
        card_template="groma",
        demo=groma_demo_hook,
        evaluate=evaluate_groma_checkpoint,
        convert=convert_groma_checkpoint,
        # The image encoder is frozen in every Groma stage; the proposer learns only from `detection_targets`
        # (detection pretraining), which the chat example does not carry, since region selection is not differentiable.
        frozen_parameter_patterns=("model.vision_tower.", "model.proposer."),
    )
)
