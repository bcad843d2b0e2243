"""TAP-v2 as a registered system: Auto-class registration and the tiny factories the shared tests and demo use.

Importing this module registers `TapConfig` (model type `"tap"`) with `AutoConfig`, `TapModel` with `AutoModel` and
`AutoModelForMaskGeneration` (its forward matches `SamModel`'s: `input_points`, `input_labels`, `input_boxes`,
`image_embeddings` -> `pred_masks`, `iou_scores`), `TapImageProcessor` with `AutoImageProcessor` and `TapProcessor`
with `AutoProcessor`. The tiny model reads 64-pixel inputs, predicts concepts over the synthetic data's
`CONCEPT_VOCABULARY` and captions with a word-level tokenizer over its vocabulary, so everything runs offline on a CPU.

Captions come from TAP's own greedy loop (`TapModel.generate_captions`), not HF `generate`, so `generation_inputs` is
None; `tests/test_tap_modeling.py` checks that decoding with and without the KV cache agree.

TAP-v2-Chat is a second system, `tap_chat`: `TapChatConfig` (model type `"tap_chat"`), `TapChatModel` with
`AutoModel`, `TapChatForConditionalGeneration` with `AutoModelForImageTextToText` (HF `generate`), `TapChatProcessor`
with `AutoProcessor`; its tiny LLM is a 2-layer Phi over the same synthetic vocabulary plus `<image>`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_regionmm.data.synthetic import CONCEPT_VOCABULARY, decode_masks, generate_scenes, vocabulary_words
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.evaluation.tap_eval import evaluate_tap_chat_checkpoint, evaluate_tap_checkpoint, interior_point
from hf_regionmm.hub.convert_tap import convert_tap_checkpoint
from hf_regionmm.modeling.configuration_tap import TapChatConfig, TapConfig
from hf_regionmm.modeling.modeling_tap import TapChatForConditionalGeneration, TapChatModel, TapModel
from hf_regionmm.processing.image_processing_tap import TapImageProcessor
from hf_regionmm.processing.processing_tap import (
    IMAGE_TOKEN,
    TapChatProcessor,
    TapProcessor,
    caption_prompt,
    chat_prompt,
)
from hf_regionmm.registry import BadInputCase, SystemSpec, TrainingRecipe, register_system
from hf_regionmm.trainers.tap import (
    TAP_CHAT_STAGES,
    TAP_STAGES,
    TapChatCollator,
    TapChatTrainer,
    TapChatTrainingDataset,
    TapCollator,
    TapTrainer,
    TapTrainingDataset,
)

__all__ = [
    "TAP_CHAT_SYSTEM",
    "TAP_SYSTEM",
    "chat_example_inputs",
    "example_inputs",
    "tiny_tap_chat_config",
    "tiny_tap_chat_processor",
    "tiny_tap_chat_tokenizer",
    "tiny_tap_config",
    "tiny_tap_processor",
    "tiny_tap_tokenizer",
]

_TINY = TapConfig.from_preset("tap-tiny")


@lru_cache(maxsize=1)
def _tiny_words() -> tuple[str, ...]:
    return tuple(dict.fromkeys(word.lower() for word in vocabulary_words()))


def tiny_tap_tokenizer() -> Any:
    """Word-level caption tokenizer over the synthetic vocabulary (`<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3)."""
    return build_word_tokenizer(_tiny_words())


def tiny_tap_config(**overrides: Any) -> TapConfig:
    """`tap-tiny` with the tiny tokenizer's vocabulary and the synthetic concept vocabulary as its concept bank."""
    fields = {
        "text_vocab_size": 4 + len(_tiny_words()),
        "concept_names": list(CONCEPT_VOCABULARY),
        **overrides,
    }
    return TapConfig.from_preset("tap-tiny", **fields)


def tiny_tap_processor() -> TapProcessor:
    """An offline `TapProcessor` for the tiny config: 64-pixel inputs, 32-pixel mask frame, word-level tokenizer."""
    size, mask_size = _TINY.image_size, _TINY.mask_size
    image_processor = TapImageProcessor(
        size={"longest_edge": size},
        pad_size={"height": size, "width": size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
    )
    return TapProcessor(image_processor, tiny_tap_tokenizer(), max_caption_length=_TINY.text_max_length)


@lru_cache(maxsize=1)
def _example_scenes() -> list[dict]:
    scenes = generate_scenes(2, seed=0, image_size_range=(64, 96), min_objects=3, max_objects=4, with_masks=True)
    return [scenes[index] for index in range(len(scenes))]


def example_inputs(processor: TapProcessor, config: TapConfig) -> dict:
    """Two synthetic scenes prompted with every prompt kind, with masks, concept targets and captions.

    Scene 0: a point prompt (one click) and a refined point prompt (a positive and a negative click) on objects 0 and
    1, a box on object 2. Scene 1: a box on object 0, a point on object 1, a 3-point sketch on object 2.
    """
    scenes = _example_scenes()
    masks = [decode_masks(scene) for scene in scenes]
    first, second = masks
    points = [
        [[interior_point(first[0])], [interior_point(first[1]), interior_point(first[0], offset=3)]],
        [[interior_point(second[1])]],
    ]
    labels = [[[1], [1, 0]], [[1]]]
    boxes = [[scenes[0]["boxes"][2]], [scenes[1]["boxes"][0]]]
    sketches = [[], [[interior_point(second[2], offset=k) for k in (0, 4, 8)]]]
    # Prompt order inside an image: points, boxes, sketches.
    order = [[0, 1, 2], [1, 0, 2]]
    inputs = processor(
        images=[scene["image"] for scene in scenes],
        points=points,
        labels=labels,
        boxes=boxes,
        sketches=sketches,
        masks=[image_masks[indices] for image_masks, indices in zip(masks, order)],
        concept_targets=[[scene["concept_targets"][i] for i in indices] for scene, indices in zip(scenes, order)],
        captions=[[scene["region_captions"][i] for i in indices] for scene, indices in zip(scenes, order)],
        return_tensors="pt",
    )
    return dict(inputs)


def _with(inputs: dict, **changes: Any) -> dict:
    return {**inputs, **changes}


def _call_model(inputs_builder):
    def call(model: PreTrainedModel, processor: TapProcessor) -> Any:
        return model(**inputs_builder(processor, model.config))

    return call


def _wrong_image_size(processor: TapProcessor, config: TapConfig) -> dict:
    inputs = example_inputs(processor, config)
    return _with(inputs, pixel_values=torch.zeros(2, 3, config.image_size // 2, config.image_size // 2))


def _point_outside_frame(processor: TapProcessor, config: TapConfig) -> dict:
    inputs = example_inputs(processor, config)
    points = inputs["input_points"].clone()
    points[0, 0, 0] = torch.tensor([3.0 * config.image_size, 5.0])
    return _with(inputs, input_points=points)


def _unknown_label(processor: TapProcessor, config: TapConfig) -> dict:
    inputs = example_inputs(processor, config)
    labels = inputs["input_labels"].clone()
    labels[0, 0, 0] = 7
    return _with(inputs, input_labels=labels)


def _inverted_box(processor: TapProcessor, config: TapConfig) -> dict:
    inputs = example_inputs(processor, config)
    boxes = torch.tensor([[[40.0, 10.0, 20.0, 30.0]], [[5.0, 5.0, 20.0, 20.0]]])
    return _with(
        inputs,
        input_points=None,
        input_labels=None,
        input_boxes=boxes,
        mask_labels=None,
        concept_targets=None,
        caption_ids=None,
    )


def _wrong_mask_labels(processor: TapProcessor, config: TapConfig) -> dict:
    inputs = example_inputs(processor, config)
    return _with(inputs, mask_labels=inputs["mask_labels"][..., :-1, :-1])


def _wrong_concept_targets(processor: TapProcessor, config: TapConfig) -> dict:
    inputs = example_inputs(processor, config)
    return _with(inputs, concept_targets=inputs["concept_targets"][..., :-1])


def _no_prompt(processor: TapProcessor, config: TapConfig) -> dict:
    inputs = example_inputs(processor, config)
    return {"pixel_values": inputs["pixel_values"]}


def build_training_dataset(
    processor: TapProcessor, num_samples: int, seed: int, stage: str | None = None
) -> TapTrainingDataset:
    """Synthetic scenes with masks; captions only in `stage2` (stage 1 is SemanticSA-1B: masks + concept priors)."""
    scenes = generate_scenes(
        num_samples, seed=seed, split="train", image_size_range=(64, 112), min_objects=2, max_objects=4
    )
    return TapTrainingDataset(scenes, seed=seed, max_prompts=4, with_captions=stage != "stage1")


def bad_inputs() -> list[BadInputCase]:
    """Calls that must fail with a clear error naming the argument."""
    image = _example_scenes()[0]["image"]
    return [
        BadInputCase("pixel_values of the wrong size", _call_model(_wrong_image_size), ValueError, r"`pixel_values`"),
        BadInputCase(
            "prompt point outside the model frame",
            _call_model(_point_outside_frame),
            ValueError,
            r"`input_points`.*outside",
        ),
        BadInputCase("unknown point label", _call_model(_unknown_label), ValueError, r"`input_labels`.*\[7\]"),
        BadInputCase("inverted box", _call_model(_inverted_box), ValueError, r"`input_boxes`.*x2 >= x1"),
        BadInputCase("mask_labels of the wrong size", _call_model(_wrong_mask_labels), ValueError, r"`mask_labels`"),
        BadInputCase(
            "concept targets over another vocabulary",
            _call_model(_wrong_concept_targets),
            ValueError,
            r"`concept_targets`.*num_concepts",
        ),
        BadInputCase("no visual prompt", _call_model(_no_prompt), ValueError, r"visual prompt"),
        BadInputCase(
            "processor: box outside the image",
            lambda model, processor: processor(images=[image], boxes=[[[0.0, 0.0, 10_000.0, 10.0]]]),
            ValueError,
            r"`boxes\[0\]\[0\]`.*outside",
        ),
        BadInputCase(
            "processor: one-point sketch",
            lambda model, processor: processor(images=[image], sketches=[[[[10.0, 10.0]]]]),
            ValueError,
            r"`sketches\[0\]\[0\]`.*at least 2",
        ),
        BadInputCase(
            "processor: fewer masks than prompts",
            lambda model, processor: processor(
                images=[image],
                points=[[[[10.0, 10.0]], [[20.0, 20.0]]]],
                masks=[decode_masks(_example_scenes()[0])[:1]],
            ),
            ValueError,
            r"`masks\[0\]`.*prompts",
        ),
    ]


def tap_demo_hook(output_dir: Path, progress: Callable[[str], None], **options: Any) -> dict[str, float]:
    """`hf-regionmm demo` for TAP: see `hf_regionmm.systems.tap_demo.tap_demo` (imported on use, like the other
    demos, so registering the system stays cheap)."""
    from hf_regionmm.systems.tap_demo import tap_demo

    return tap_demo(output_dir, progress, **options)


def tap_chat_demo_hook(output_dir: Path, progress: Callable[[str], None], **options: Any) -> dict[str, float]:
    """`hf-regionmm demo` for TAP-Chat: see `hf_regionmm.systems.tap_demo.tap_chat_demo`."""
    from hf_regionmm.systems.tap_demo import tap_chat_demo

    return tap_chat_demo(output_dir, progress, **options)


TAP_SYSTEM = register_system(
    SystemSpec(
        name="tap",
        config_class=TapConfig,
        model_classes={"AutoModel": TapModel, "AutoModelForMaskGeneration": TapModel},
        main_auto_class="AutoModelForMaskGeneration",
        tiny_config=tiny_tap_config,
        tiny_processor=tiny_tap_processor,
        example_inputs=example_inputs,
        image_processor_classes={"torchvision": TapImageProcessor},
        processor_class=TapProcessor,
        generation_inputs=None,
        bad_inputs=bad_inputs,
        training=TrainingRecipe(
            trainer_class=TapTrainer,
            build_dataset=build_training_dataset,
            collator=TapCollator,
            stages=TAP_STAGES,
            default_stage="stage2",
        ),
        demo=tap_demo_hook,
        evaluate=evaluate_tap_checkpoint,
        convert=convert_tap_checkpoint,
        card_template="tap",
    )
)


# ---------------------------------------------------------------------------------------------------------------
# TAP-v2-Chat: registered as its own system (`tap_chat`), the TAP image encoder + conv projector + LLM.

_CHAT_WORDS = ("user", "assistant", ":")


def tiny_tap_chat_tokenizer() -> Any:
    """Word-level LLM tokenizer: the synthetic vocabulary, USER / ASSISTANT, and `<image>` as the last id."""
    return build_word_tokenizer((*_tiny_words(), *_CHAT_WORDS), extra_special_tokens=[IMAGE_TOKEN])


def tiny_tap_chat_config(**overrides: Any) -> TapChatConfig:
    """`tap-chat-tiny` with the tiny chat tokenizer's vocabulary (`<image>` is its last id)."""
    vocab_size = 4 + len(dict.fromkeys((*_tiny_words(), *_CHAT_WORDS))) + 1
    text_config = {"vocab_size": vocab_size, **overrides.pop("text_config", {})}
    return TapChatConfig.from_preset(
        "tap-chat-tiny", text_config=text_config, image_token_id=vocab_size - 1, **overrides
    )


def tiny_tap_chat_processor() -> TapChatProcessor:
    """An offline `TapChatProcessor` for the tiny config (64-pixel inputs, 16 visual tokens)."""
    image_processor = tiny_tap_processor().image_processor
    config = tiny_tap_chat_config()
    return TapChatProcessor(image_processor, tiny_tap_chat_tokenizer(), num_image_tokens=config.num_image_tokens)


def chat_example_inputs(processor: TapChatProcessor, config: TapChatConfig) -> dict:
    """A caption pre-training sample and an instruction sample, with labels on the answers."""
    first, second = _example_scenes()
    inputs = processor(
        images=[first["image"], second["image"]],
        text=[caption_prompt(), chat_prompt(second["vqa"][0]["question"])],
        answers=[first["image_caption"], second["vqa"][0]["answer"]],
        return_tensors="pt",
    )
    return dict(inputs)


def chat_generation_inputs(processor: TapChatProcessor, config: TapChatConfig) -> dict:
    """Two questions of different lengths, left-padded for batched generation."""
    first, second = _example_scenes()
    inputs = processor(
        images=[first["image"], second["image"]],
        text=[chat_prompt(first["vqa"][0]["question"]), chat_prompt("describe the image .")],
        padding_side="left",
        return_tensors="pt",
    )
    return dict(inputs)


def _chat_wrong_image_size(processor: TapChatProcessor, config: TapChatConfig) -> dict:
    inputs = chat_example_inputs(processor, config)
    size = config.vision_config.image_size // 2
    return _with(inputs, pixel_values=torch.zeros(2, 3, size, size))


def _chat_missing_image_slot(processor: TapChatProcessor, config: TapChatConfig) -> dict:
    inputs = chat_example_inputs(processor, config)
    input_ids = inputs["input_ids"].clone()
    first_slot = (input_ids[0] == config.image_token_id).nonzero()[0, 0]
    input_ids[0, first_slot] = config.text_config.eos_token_id
    return _with(inputs, input_ids=input_ids)


def build_chat_training_dataset(
    processor: TapChatProcessor, num_samples: int, seed: int, stage: str | None = None
) -> TapChatTrainingDataset:
    """Synthetic scenes: image captions for `caption`, VQA conversations for `instruct`."""
    scenes = generate_scenes(num_samples, seed=seed, split="train", image_size_range=(64, 112), with_masks=False)
    return TapChatTrainingDataset(scenes, task="caption" if stage == "caption" else "instruct", seed=seed)


def chat_bad_inputs() -> list[BadInputCase]:
    image = _example_scenes()[0]["image"]
    return [
        BadInputCase(
            "pixel_values of the wrong size", _call_model(_chat_wrong_image_size), ValueError, r"`pixel_values`"
        ),
        BadInputCase(
            "prompt without all image slots", _call_model(_chat_missing_image_slot), ValueError, r"`<image>` tokens"
        ),
        BadInputCase(
            "processor: prompt without <image>",
            lambda model, processor: processor(images=[image], text=["USER: hello ASSISTANT:"]),
            ValueError,
            r"`text\[0\]` must contain `<image>`",
        ),
        BadInputCase(
            "processor: more prompts than images",
            lambda model, processor: processor(images=[image], text=[caption_prompt(), caption_prompt()]),
            ValueError,
            r"one image per prompt",
        ),
    ]


TAP_CHAT_SYSTEM = register_system(
    SystemSpec(
        name="tap_chat",
        config_class=TapChatConfig,
        model_classes={"AutoModel": TapChatModel, "AutoModelForImageTextToText": TapChatForConditionalGeneration},
        main_auto_class="AutoModelForImageTextToText",
        tiny_config=tiny_tap_chat_config,
        tiny_processor=tiny_tap_chat_processor,
        example_inputs=chat_example_inputs,
        image_processor_classes={"torchvision": TapImageProcessor},
        processor_class=TapChatProcessor,
        generation_inputs=chat_generation_inputs,
        bad_inputs=chat_bad_inputs,
        training=TrainingRecipe(
            trainer_class=TapChatTrainer,
            build_dataset=build_chat_training_dataset,
            collator=TapChatCollator,
            stages=TAP_CHAT_STAGES,
            default_stage="instruct",
        ),
        demo=tap_chat_demo_hook,
        evaluate=evaluate_tap_chat_checkpoint,
        card_template="tap",
    )
)
