"""u-LLaVA training: the two stages of the paper (section 3, Fig. 1), the task mix and the collator.

| stage | trains | data | lr (paper sec. 4.1) |
|---|---|---|---|
| `align` (stage I, modality alignment) | the vision-language projector (CLIP, LLM, SAM frozen) | image and video captions | 2e-3 |
| `instruct` (stage II, joint instruction tuning) | projector + LLM + `seg_projector` + `loc_projector` / `loc_head` + SAM mask decoder (CLIP and SAM image encoder frozen) | RES / REC / salient / semantic instructions, captions, video captions | 2e-5 |

AdamW with weight decay 0 in both stages. The released stage II config keeps the projector frozen; this recipe trains
it with the rest of stage II, as the task brief asks (change `ULLAVA_STAGES` to reproduce the release).

LoRA (section 4.1: stage II with LoRA, lr 2e-4): `ULlavaTrainer(..., use_lora=True)` adds the LLM adapter
(`ULlavaForConditionalGeneration.add_language_model_lora`: released r=8, alpha=16, dropout 0.05 on q/v) and trains
stage II through it: LoRA A/B inside the LLM, and the `modules_to_save` copies of the projector, `seg_projector`,
`loc_projector`, `loc_head` and SAM's mask decoder; the LLM's base weights, embeddings and `lm_head` stay frozen (the
released LoRA run also trains `lm_head` and `embed_tokens` fully). The saved checkpoint is one PEFT adapter
(`hf_regionmm.hub.publish.save_adapter`). Set the learning rate yourself (`TrainingArguments(learning_rate=2e-4)`):
the stage table holds the full fine-tuning value.

Examples come from scenes in the synthetic schema (`hf_regionmm.data.synthetic.generate_scenes(with_masks=True)`,
whose `ullava_instructions` carry RES/REC/salient/semantic prompts and `Sure. Mask: [SEG]; Location: [LOC]; ...`
answers) and from `generate_videos` clips. `[SEG]` targets the union of the instruction's object masks, `[LOC]` the box
of that union (the paper converts masks to boxes where detection annotations are missing).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.synthetic import decode_masks
from ..processing.processing_ullava import LOC_TOKEN, SEG_TOKEN, video_caption_prompt
from .region_trainer import RegionTrainer, TrainingStage

__all__ = [
    "ULLAVA_STAGES",
    "ULLAVA_TASKS",
    "ULlavaCollator",
    "ULlavaTrainer",
    "ULlavaTrainingDataset",
    "ullava_example_from_scene",
]

# Stage patterns that are the LLM: under `use_lora` they train as LoRA only.
_LANGUAGE_MODEL_PARTS = ("model.language_model.", "lm_head.")

ULLAVA_STAGES: tuple[TrainingStage, ...] = (
    TrainingStage(
        name="align",
        trainable=("model.multi_modal_projector.",),
        learning_rate=2e-3,
        description="stage I alignment: projector only, on image and video captions (CLIP, LLM, SAM frozen)",
    ),
    TrainingStage(
        name="instruct",
        trainable=(
            "model.multi_modal_projector.",
            *_LANGUAGE_MODEL_PARTS,
            "seg_projector.",
            "loc_projector.",
            "loc_head.",
            "model.sam_mask_decoder.",
        ),
        learning_rate=2e-5,
        description="stage II joint instruction tuning: projector + LLM + mask/location heads + SAM mask decoder",
    ),
)

ULLAVA_TASKS = ("res", "rec", "salient", "semantic", "caption")
_CAPTION_PROMPT = "Describe the image briefly."


def _mask_box(mask: np.ndarray) -> list[float]:
    """Pixel-edge xyxy box of a non-empty (H, W) bool mask (columns c0..c1 -> x1 = c0, x2 = c1 + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def ullava_example_from_scene(scene: dict[str, Any], task: str, rng: random.Random) -> dict[str, Any]:
    """One training example of `task` from a scene with masks.

    Returns `{"image", "video": None, "query", "answer", "masks" ((H, W) bool per [SEG]), "boxes" (pixel xyxy per
    [LOC]), "task"}`.
    """
    example: dict[str, Any] = {"image": scene["image"], "video": None, "masks": [], "boxes": [], "task": task}
    if task == "caption":
        example.update(query=_CAPTION_PROMPT, answer=scene["image_caption"])
        return example
    candidates = [item for item in scene["ullava_instructions"] if item["task"] == task]
    if not candidates:
        # Every scene has a salient and a semantic instruction; RES/REC need a referring expression.
        candidates = [item for item in scene["ullava_instructions"] if item["task"] == "semantic"]
    instruction = rng.choice(candidates)
    object_masks = decode_masks(scene)
    union = object_masks[list(instruction["object_indices"])].any(axis=0)
    example.update(query=instruction["instruction"], answer=instruction["answer"], task=instruction["task"])
    example["masks"] = [union] * instruction["answer"].count(SEG_TOKEN)
    example["boxes"] = [_mask_box(union)] * instruction["answer"].count(LOC_TOKEN)
    return example


class ULlavaTrainingDataset(torch.utils.data.Dataset):
    """u-LLaVA examples: scene i gives task `tasks[i % len(tasks)]`; then every video gives a caption example.

    Args:
        scenes: scenes in the synthetic schema with masks (`generate_scenes(..., with_masks=True)`).
        videos: optional clips (`generate_videos`), captioned.
        tasks: subset of `ULLAVA_TASKS` (`("caption",)` for the `align` stage).
        seed: seeds the choice of instruction per example (deterministic).
    """

    def __init__(self, scenes: Any, videos: Any = None, tasks: Sequence[str] = ULLAVA_TASKS, seed: int = 0) -> None:
        unknown = set(tasks) - set(ULLAVA_TASKS)
        if not tasks or unknown:
            raise ValueError(f"`tasks` must be a non-empty subset of {ULLAVA_TASKS}; got {tuple(tasks)}.")
        self.scenes = scenes
        self.videos = videos if videos is not None else []
        self.tasks = tuple(tasks)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.scenes) + len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < len(self.scenes):
            task = self.tasks[index % len(self.tasks)]
            return ullava_example_from_scene(self.scenes[index], task, random.Random(self.seed * 1_000_003 + index))
        video = self.videos[index - len(self.scenes)]
        return {
            "image": None,
            "video": video["frames"],
            "query": video_caption_prompt(),
            "answer": video["caption"],
            "masks": [],
            "boxes": [],
            "task": "video_caption",
        }


class ULlavaCollator:
    """Batch u-LLaVA examples through the processor. A batch may mix images and videos, and samples with mask
    targets, box targets or neither: `seg_masks` / `loc_boxes` are built whenever any sample has them."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        has_masks = any(example["masks"] for example in examples)
        has_boxes = any(example["boxes"] for example in examples)
        batch = self.processor(
            images=[example["image"] for example in examples],
            videos=[example["video"] for example in examples],
            text=[example["query"] for example in examples],
            answers=[example["answer"] for example in examples],
            ground_masks=[example["masks"] for example in examples] if has_masks else None,
            ground_boxes=[example["boxes"] for example in examples] if has_boxes else None,
            return_tensors="pt",
        )
        return dict(batch)


class ULlavaTrainer(RegionTrainer):
    """`RegionTrainer` for u-LLaVA: freezes the model for the paper stage it trains (`"align"` or `"instruct"`).

    Args:
        use_lora: tune the LLM with LoRA (stage II's LoRA option): adds `model.add_language_model_lora(lora_config)`
            unless the model already carries it, and trains the stage through the adapter (base LLM frozen, the
            stage's other modules through their `modules_to_save` copies).
        lora_config: a custom peft `LoraConfig` (default: `model.language_model_lora_config()`).
        Other arguments: `RegionTrainer`'s (`stage=`) and `Trainer`'s.

    `self.stage_parameter_counts` holds `{"trainable": n, "frozen": m}` after freezing.
    """

    stages = ULLAVA_STAGES
    default_stage = "instruct"
    language_model_parts = _LANGUAGE_MODEL_PARTS
