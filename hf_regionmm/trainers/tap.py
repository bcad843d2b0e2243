"""TAP-v2 training: the two pre-training stages, the two-stage prompt sampler, the data set and the collator.

Section 3.1 of the paper ("Promptable segmentation", "Pre-training loss") and section 4.1 ("Implementation details"):

| stage | data (paper) | loss | trains | lr | weight decay |
|---|---|---|---|---|---|
| `stage1` | SemanticSA-1B: masks + CLIP concept priors | `L_concept + alpha * L_seg` (beta = 0; alpha = 1 here, the paper leaves it open) | image encoder, prompt encoder, image decoder, concept head | 1e-3 | 0.1 |
| `stage2` | CaptionSA-400M: + Visual Genome region captions | `L_concept + 5 * L_seg + 1 * L_cap` | everything | 1e-4 | 0.1 |

Prompt sampling (section 3.1, "Promptable segmentation"), per ground-truth mask and optimisation step:

1. first stage (collator): a box or a point, with equal probability, from the ground-truth mask;
2. second stage (`TapTrainer.compute_loss`, after a forward pass on the first-stage prompts): with probability 0.5
   the interactive branch adds 1-8 points drawn uniformly from the error region between the routed predicted mask and
   the ground truth (missed pixels -> positive points, spurious pixels -> negative points); otherwise the
   non-interactive branch replaces the prompt by 1-9 positive points drawn uniformly from the ground-truth mask. The
   loss is the mean of the two passes, which share one image encoding.

Every random choice is seeded by `(seed, example index)` (collator) or by the batch's `prompt_seeds` (second stage), so
a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from trl import SFTTrainer

from ..data.synthetic import decode_masks
from ..modeling.modeling_tap import TapImageSegmentationOutput
from ..processing.processing_tap import caption_prompt, chat_prompt
from .region_trainer import (
    RegionTrainer,
    TrainingStage,
    apply_training_stage,
    language_model_lora_stage,
    stage_by_name,
)

__all__ = [
    "TAP_CHAT_STAGES",
    "TAP_STAGES",
    "TAP_STAGE_LOSS_WEIGHTS",
    "TapChatCollator",
    "TapChatSFTTrainer",
    "TapChatTrainer",
    "TapChatTrainingDataset",
    "TapCollator",
    "TapTrainer",
    "TapTrainingDataset",
    "build_tap_chat_sft_dataset",
    "lora_stage",
    "sample_second_stage_prompts",
    "tap_chat_messages",
]

_TOKENIZER_PARTS = ("vision_encoder.", "prompt_encoder.", "image_decoder.", "concept_head.")

TAP_STAGES: tuple[TrainingStage, ...] = (
    TrainingStage(
        name="stage1",
        trainable=_TOKENIZER_PARTS,
        learning_rate=1e-3,
        weight_decay=0.1,
        description="SemanticSA-1B pre-training: concept KL + focal/dice segmentation, text decoder frozen (beta = 0)",
    ),
    TrainingStage(
        name="stage2",
        trainable=(*_TOKENIZER_PARTS, "text_decoder."),
        learning_rate=1e-4,
        weight_decay=0.1,
        description="CaptionSA-400M pre-training: concept + segmentation + captioning (alpha, beta = 5, 1)",
    ),
)

TAP_STAGE_LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "stage1": {"concept_loss_weight": 1.0, "seg_loss_weight": 1.0, "caption_loss_weight": 0.0},
    "stage2": {"concept_loss_weight": 1.0, "seg_loss_weight": 5.0, "caption_loss_weight": 1.0},
}

MAX_PROMPT_POINTS = 9


def _mask_pixels(mask: np.ndarray) -> np.ndarray:
    """`(n, 2)` integer `(x, y)` of the True pixels of a 2-D mask."""
    rows, cols = np.nonzero(mask)
    return np.stack([cols, rows], axis=1)


def first_stage_prompt(mask: np.ndarray, box: Sequence[float], rng: random.Random) -> tuple[str, list]:
    """A box (`("box", [x1, y1, x2, y2])`) or a uniformly drawn mask pixel (`("point", [[x, y]])`), 50/50,
    in original-image pixels."""
    pixels = _mask_pixels(mask)
    if rng.random() < 0.5 or len(pixels) == 0:
        return "box", [float(v) for v in box]
    x, y = pixels[rng.randrange(len(pixels))]
    return "point", [[float(x), float(y)]]


class TapTrainingDataset(torch.utils.data.Dataset):
    """TAP training examples over scenes in the synthetic schema (`image`, `masks` RLE, `boxes`, `concept_targets`,
    `region_captions`; `hf_regionmm.data.synthetic.generate_scenes(with_masks=True)` or a real-format loader).

    Item i: `{"image", "masks" (n, H, W) bool, "prompts" [(kind, value)], "concept_targets" (n, K), "captions"
    (n strings or None), "prompt_seed"}` for at most `max_prompts` objects of scene i (paper: 64 per GPU).
    """

    def __init__(self, scenes: Any, seed: int = 0, max_prompts: int = 64, with_captions: bool = True) -> None:
        if not isinstance(max_prompts, int) or max_prompts < 1:
            raise ValueError(f"`max_prompts` must be an integer >= 1; got {max_prompts!r}.")
        self.scenes = scenes
        self.seed = seed
        self.max_prompts = max_prompts
        self.with_captions = with_captions

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scenes[index]
        rng = random.Random(self.seed * 1_000_003 + index)
        masks = decode_masks(scene)
        objects = [i for i in range(len(masks)) if masks[i].any()]
        objects = sorted(rng.sample(objects, min(self.max_prompts, len(objects))))
        return {
            "image": scene["image"],
            "masks": masks[objects],
            "prompts": [first_stage_prompt(masks[i], scene["boxes"][i], rng) for i in objects],
            "concept_targets": [scene["concept_targets"][i] for i in objects],
            "captions": [scene["region_captions"][i] for i in objects] if self.with_captions else None,
            "prompt_seed": rng.randrange(2**31),
        }


class TapCollator:
    """Batch TAP examples through the processor: point prompts first, then box prompts (the processor's order), with
    every target reordered to match; adds `prompt_seeds` `(B,)` int64 for the second-stage sampler."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        points, boxes, masks, concepts, captions = [], [], [], [], []
        with_captions = any(example["captions"] is not None for example in examples)
        for example in examples:
            order = [i for i, (kind, _) in enumerate(example["prompts"]) if kind == "point"]
            order += [i for i, (kind, _) in enumerate(example["prompts"]) if kind == "box"]
            points.append([example["prompts"][i][1] for i in order if example["prompts"][i][0] == "point"])
            boxes.append([example["prompts"][i][1] for i in order if example["prompts"][i][0] == "box"])
            masks.append(np.asarray(example["masks"])[order])
            concepts.append([example["concept_targets"][i] for i in order])
            if with_captions:
                example_captions = example["captions"] or [None] * len(order)
                captions.append([example_captions[i] for i in order])
        batch = self.processor(
            images=[example["image"].convert("RGB") for example in examples],
            points=points if any(points) else None,
            boxes=boxes if any(boxes) else None,
            masks=masks,
            concept_targets=concepts,
            captions=captions if with_captions else None,
        )
        batch = dict(batch)
        batch["prompt_seeds"] = torch.tensor([example["prompt_seed"] for example in examples], dtype=torch.int64)
        return batch


@torch.no_grad()
def sample_second_stage_prompts(
    routed_masks: torch.Tensor,
    mask_labels: torch.Tensor,
    input_points: torch.Tensor,
    input_labels: torch.Tensor,
    prompt_mask: torch.Tensor,
    image_size: int,
    generator: torch.Generator,
    non_interactive_probability: float = 0.5,
    pad_label: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-stage prompts of section 3.1.

    Args:
        routed_masks: `(B, P, m, m)` predicted logits of the first pass (the routed output).
        mask_labels: `(B, P, m, m)` ground truth in {0, 1}; both in the padded model frame at mask resolution.
        input_points, input_labels: the first-stage prompts `(B, P, N, 2)` / `(B, P, N)` (model-frame pixels).
        prompt_mask: `(B, P)` bool, real prompts.
        image_size: side of the padded model frame in pixels (mask cell centres are mapped into it).
        generator: CPU generator for every draw.

    Returns:
        points `(B, P, N', 2)` float and labels `(B, P, N')` int64 (padding label `pad_label`), N' = N + 8 or 9.
    """
    batch, num_prompts, mask_side = routed_masks.shape[0], routed_masks.shape[1], routed_masks.shape[-1]
    stride = image_size / mask_side
    width = max(input_points.shape[2] + MAX_PROMPT_POINTS - 1, MAX_PROMPT_POINTS)
    points = torch.zeros(batch, num_prompts, width, 2)
    labels = torch.full((batch, num_prompts, width), pad_label, dtype=torch.long)
    predicted = (routed_masks > 0).cpu()
    truth = (mask_labels > 0.5).cpu()
    for b in range(batch):
        for p in range(num_prompts):
            first = input_labels[b, p].cpu() != pad_label
            first_points, first_labels = input_points[b, p].cpu()[first], input_labels[b, p].cpu()[first]
            new_points, new_labels = first_points, first_labels
            if bool(prompt_mask[b, p]):
                gt_cells = truth[b, p].nonzero()
                if float(torch.rand((), generator=generator)) < non_interactive_probability:
                    if len(gt_cells):
                        count = int(torch.randint(1, MAX_PROMPT_POINTS + 1, (), generator=generator))
                        chosen = gt_cells[torch.randperm(len(gt_cells), generator=generator)[:count]]
                        new_points = chosen.flip(-1).float().add(0.5).mul(stride).sub(0.5)
                        new_labels = torch.ones(len(chosen), dtype=torch.long)
                else:
                    error = predicted[b, p] ^ truth[b, p]
                    error_cells = error.nonzero()
                    if len(error_cells):
                        count = int(torch.randint(1, MAX_PROMPT_POINTS, (), generator=generator))
                        chosen = error_cells[torch.randperm(len(error_cells), generator=generator)[:count]]
                        # A missed ground-truth pixel asks for more (positive); a spurious one for less (negative).
                        chosen_labels = truth[b, p][chosen[:, 0], chosen[:, 1]].long()
                        chosen_points = chosen.flip(-1).float().add(0.5).mul(stride).sub(0.5)
                        new_points = torch.cat([first_points, chosen_points])
                        new_labels = torch.cat([first_labels, chosen_labels])
            points[b, p, : len(new_points)] = new_points
            labels[b, p, : len(new_labels)] = new_labels
    return points.to(input_points.device), labels.to(input_labels.device)


class TapTrainer(RegionTrainer):
    """`RegionTrainer` for TAP-v2: freezes per paper stage, weights the loss terms per stage, and runs the two-stage
    prompt sampler (two forward passes per step sharing one image encoding; the loss is their mean).

    Args:
        stage: `"stage1"` or `"stage2"` (see the module docstring).
        stages: the stage table; loss_weights: stage name -> `{concept_loss_weight, seg_loss_weight,
            caption_loss_weight}`.
        non_interactive_probability: probability of the non-interactive second-stage branch (0.5).
    """

    def __init__(
        self,
        *args: Any,
        stage: str = "stage2",
        stages: Sequence[TrainingStage] = TAP_STAGES,
        loss_weights: dict[str, dict[str, float]] | None = None,
        non_interactive_probability: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stages = tuple(stages)
        self.stage_loss_weights = dict(TAP_STAGE_LOSS_WEIGHTS if loss_weights is None else loss_weights)
        if not 0.0 <= non_interactive_probability <= 1.0:
            raise ValueError(f"`non_interactive_probability` must be in [0, 1]; got {non_interactive_probability}.")
        self.non_interactive_probability = non_interactive_probability
        self.set_stage(stage)

    def set_stage(self, name: str) -> None:
        """Freeze/unfreeze for stage `name` and pick its loss weights; call before `train()`."""
        self.stage = stage_by_name(self.stages, name)
        if name not in self.stage_loss_weights:
            raise ValueError(
                f"No loss weights for stage {name!r}; `loss_weights` has {sorted(self.stage_loss_weights)}."
            )
        self.loss_weights = dict(self.stage_loss_weights[name])
        self.stage_parameter_counts = apply_training_stage(self.model, self.stage)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        inputs = dict(inputs)
        seeds = inputs.pop("prompt_seeds", None)
        first = model(**inputs, **self.loss_weights)
        outputs = first
        if inputs.get("mask_labels") is not None and first.loss is not None:
            generator = torch.Generator().manual_seed(0 if seeds is None else int(seeds.sum()))
            routed = first.pred_masks.gather(
                2, first.mask_index[:, :, None, None, None].expand(-1, -1, 1, *first.pred_masks.shape[-2:])
            )[:, :, 0]
            points, labels = sample_second_stage_prompts(
                routed.detach(),
                inputs["mask_labels"],
                inputs["input_points"],
                inputs["input_labels"],
                first.prompt_mask,
                image_size=inputs["pixel_values"].shape[-1],
                generator=generator,
                non_interactive_probability=self.non_interactive_probability,
            )
            second_inputs = {
                key: value
                for key, value in inputs.items()
                if key not in ("pixel_values", "input_points", "input_labels", "input_boxes")
            }
            second = model(
                image_embeddings=first.image_embeddings,
                input_points=points,
                input_labels=labels,
                **second_inputs,
                **self.loss_weights,
            )
            outputs = TapImageSegmentationOutput(
                loss=(first.loss + second.loss) / 2,
                loss_dict={name: (first.loss_dict[name] + second.loss_dict[name]) / 2 for name in first.loss_dict},
                pred_masks=second.pred_masks,
                iou_scores=second.iou_scores,
                mask_index=second.mask_index,
                semantic_tokens=second.semantic_tokens,
                selected_semantic_tokens=second.selected_semantic_tokens,
                semantic_embeddings=second.semantic_embeddings,
                concept_logits=second.concept_logits,
                caption_logits=second.caption_logits,
                prompt_mask=second.prompt_mask,
                image_embeddings=second.image_embeddings,
            )
        if outputs.loss is None:
            raise ValueError("The TAP batch carries no targets (`mask_labels`, `concept_targets`, `caption_ids`).")
        if model.training:
            self._accumulate_loss_terms(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


# ---------------------------------------------------------------------------------------------------------------
# TAP-v2-Chat (section 3.2 "Training methods", section 4.1): caption pre-training, then instruction tuning. Both
# train the same parts: the last k ViT blocks (k = 4), the projector and the LLM.
#
# | stage | data (paper) | prompt -> target | trains | lr |
# |---|---|---|---|---|
# | `caption` | 232k detailed captions | `<image>` -> caption | last k ViT blocks, projector, LLM | 1e-3 |
# | `instruct` | Bunny-695K conversations | USER / ASSISTANT turns -> every answer | the same | 2e-4 |
#
# The LLM trains fully by default (the tiny recipe); `use_lora=True` tunes it with LoRA as the paper does
# (`TapChatForConditionalGeneration.add_language_model_lora`: r=128, alpha=256 on q/k/v/dense of Phi-2, the
# projector and the last k ViT blocks as `modules_to_save`); the LLM's base weights, embeddings and `lm_head` are then
# frozen, and the saved checkpoint is one PEFT adapter. `TapChatSFTTrainer` runs the same stages on trl's `SFTTrainer`
# over a `datasets.Dataset` of `messages` + `images` (`build_tap_chat_sft_dataset`), with the loss on the answers.

LAST_VISION_BLOCKS = "{last_vision_blocks}"
_LANGUAGE_MODEL_PARTS = ("model.language_model.", "lm_head.")
_CHAT_PARTS = ("model.multi_modal_projector.", *_LANGUAGE_MODEL_PARTS, LAST_VISION_BLOCKS)

TAP_CHAT_STAGES: tuple[TrainingStage, ...] = (
    TrainingStage(
        name="caption",
        trainable=_CHAT_PARTS,
        learning_rate=1e-3,
        description="detailed-caption pre-training: visual tokens only -> caption (232k captions in the paper)",
    ),
    TrainingStage(
        name="instruct",
        trainable=_CHAT_PARTS,
        learning_rate=2e-4,
        description="instruction tuning on USER / ASSISTANT conversations (Bunny-695K in the paper)",
    ),
)


def _expand_vision_blocks(stage: TrainingStage, model: torch.nn.Module) -> TrainingStage:
    """Replace the `{last_vision_blocks}` pattern by the parameter prefixes of the model's last k ViT blocks."""
    if LAST_VISION_BLOCKS not in stage.trainable:
        return stage
    config = model.config
    depth = config.vision_config.vision_num_hidden_layers
    blocks = tuple(
        f"model.vision_tower.layers.{index}." for index in range(depth - config.num_trainable_vision_blocks, depth)
    )
    trainable = tuple(p for p in stage.trainable if p != LAST_VISION_BLOCKS) + blocks
    return dataclasses.replace(stage, trainable=trainable)


def lora_stage(stage: TrainingStage, model: torch.nn.Module) -> TrainingStage:
    """The LoRA variant of a TAP-Chat stage (`language_model_lora_stage` after naming the last k ViT blocks): the LLM
    trains through its LoRA weights only (base weights, embeddings and `lm_head` frozen), every other trained module
    through its `modules_to_save` copy (peft keeps the original frozen next to it), so the saved adapter holds
    everything the stage trains.

    Raises a `ValueError` when the model has no LoRA in its LLM or when a trained module is not in the adapter's
    `modules_to_save`.
    """
    return language_model_lora_stage(_expand_vision_blocks(stage, model), model, _LANGUAGE_MODEL_PARTS)


def _trainer_model(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    model = kwargs.get("model", args[0] if args else None)
    if model is None or not callable(getattr(model, "add_language_model_lora", None)):
        raise TypeError("`model` must be a TapChatForConditionalGeneration instance to train TAP-Chat stages.")
    return model


class TapChatTrainingDataset(torch.utils.data.Dataset):
    """TAP-Chat examples over scenes in the synthetic schema: `"caption"` -> (`<image>`, `image_caption`),
    `"instruct"` -> (`chat_prompt(question)`, answer) from the scene's `vqa` pairs (seeded by `(seed, index)`)."""

    def __init__(self, scenes: Any, task: str = "instruct", seed: int = 0) -> None:
        if task not in ("caption", "instruct"):
            raise ValueError(f"`task` must be 'caption' or 'instruct'; got {task!r}.")
        self.scenes = scenes
        self.task = task
        self.seed = seed

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scenes[index]
        if self.task == "caption" or not scene["vqa"]:
            return {"image": scene["image"], "prompt": caption_prompt(), "answer": scene["image_caption"]}
        pair = random.Random(self.seed * 1_000_003 + index).choice(scene["vqa"])
        return {"image": scene["image"], "prompt": chat_prompt(pair["question"]), "answer": pair["answer"]}


class TapChatCollator:
    """Batch TAP-Chat examples through `TapChatProcessor` (right padding, labels on the answers)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor(
            images=[example["image"].convert("RGB") for example in examples],
            text=[example["prompt"] for example in examples],
            answers=[example["answer"] for example in examples],
            padding_side="right",
        )
        return dict(batch)


class TapChatTrainer(RegionTrainer):
    """`RegionTrainer` for TAP-v2-Chat: freezes everything but the stage's parts (`"caption"` or `"instruct"`).

    Args:
        use_lora: tune the LLM with LoRA (the paper's recipe): adds `model.add_language_model_lora(lora_config)`
            unless the model already carries it, and trains the stage through the adapter (`lora_stage`).
        lora_config: a custom peft `LoraConfig` (default: `model.language_model_lora_config()`).
        Other arguments: `RegionTrainer`'s (`stage=`) and `Trainer`'s.
    """

    stages = TAP_CHAT_STAGES
    default_stage = "instruct"
    language_model_parts = _LANGUAGE_MODEL_PARTS

    def __init__(self, *args: Any, use_lora: bool = False, lora_config: Any = None, **kwargs: Any) -> None:
        _trainer_model(args, kwargs)
        super().__init__(*args, use_lora=use_lora, lora_config=lora_config, **kwargs)

    def resolve_stage(self, name: str) -> TrainingStage:
        stage = stage_by_name(self.stages, name)
        if self.use_lora:
            return lora_stage(stage, self.model)
        return _expand_vision_blocks(stage, self.model)


# ---- trl SFTTrainer path ----------------------------------------------------------------------------------------


def tap_chat_messages(scene: dict[str, Any], task: str = "instruct", seed: int = 0, max_turns: int = 3) -> dict:
    """One conversation in trl's vision format: `{"messages": [...], "images": [image]}`.

    `"caption"`: a user message holding only the image (the caption prompt) and the detailed caption; `"instruct"`:
    up to `max_turns` of the scene's `vqa` pairs (order seeded by `seed`), the image in the first user message.
    `processor.apply_chat_template(messages)` renders it as `chat_prompt` / `caption_prompt` + answers.
    """
    if task not in ("caption", "instruct"):
        raise ValueError(f"`task` must be 'caption' or 'instruct'; got {task!r}.")
    if not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"`max_turns` must be an integer >= 1; got {max_turns!r}.")
    image = scene["image"].convert("RGB")
    if task == "caption" or not scene["vqa"]:
        messages = [
            {"role": "user", "content": [{"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": scene["image_caption"]}]},
        ]
        return {"messages": messages, "images": [image]}
    pairs = list(scene["vqa"])
    random.Random(seed).shuffle(pairs)
    messages = []
    for turn, pair in enumerate(pairs[:max_turns]):
        user_content = [{"type": "text", "text": pair["question"]}]
        if turn == 0:
            user_content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": user_content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": pair["answer"]}]})
    return {"messages": messages, "images": [image]}


def build_tap_chat_sft_dataset(
    scenes: Sequence[dict[str, Any]], task: str = "instruct", seed: int = 0, max_turns: int = 3
) -> Dataset:
    """A `datasets.Dataset` of `messages` + `images` (`tap_chat_messages` per scene, seeded by `(seed, index)`) for
    `TapChatSFTTrainer` or a plain `trl.SFTTrainer`."""
    rows = [
        tap_chat_messages(scenes[index], task=task, seed=seed * 1_000_003 + index, max_turns=max_turns)
        for index in range(len(scenes))
    ]
    return Dataset.from_list(rows)


class TapChatSFTTrainer(TapChatTrainer, SFTTrainer):
    """TAP-Chat's stages on trl's `SFTTrainer` (DESIGN principle 5): a `datasets.Dataset` of `messages` + `images`
    (`build_tap_chat_sft_dataset`), `processing_class=TapChatProcessor` (its chat template marks the answers), and
    `SFTConfig(assistant_only_loss=True)`, so trl's vision collator supervises every assistant answer (and the final
    EOS) and nothing else. Freezing and LoRA are `TapChatTrainer`'s (`stage=`, `use_lora=`).

    Usage:
        ```python
        args = SFTConfig(output_dir="tap-chat-instruct", assistant_only_loss=True, max_length=None,
                         learning_rate=2e-4, lr_scheduler_type="cosine", adam_beta2=0.95)
        trainer = TapChatSFTTrainer(model=model, args=args, train_dataset=build_tap_chat_sft_dataset(scenes),
                                    processing_class=processor, stage="instruct", use_lora=True)
        trainer.train()
        ```

    `max_length` truncates from the end and must leave the `num_image_tokens` image slots whole (the processor
    raises otherwise): None or >= 2048 at paper size. trl keeps only the `messages` / `images` columns of a vision
    data set (`remove_unused_columns`) and skips its text preparation for it (no `dataset_kwargs` needed). trl's
    SFTTrainer adds no BOS (`add_special_tokens=False`); Phi-2's tokenizer adds none either. Pass the LoRA through
    `use_lora=` rather than trl's `peft_config=`, which would wrap the model in a `PeftModel` and rename every
    parameter the stages name.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "TapChatSFTTrainer adds the paper's LoRA itself: pass use_lora=True (and optionally lora_config=) "
                "instead of peft_config."
            )
        arguments = kwargs.get("args", args[1] if len(args) > 1 else None)
        if not getattr(arguments, "assistant_only_loss", False):
            raise ValueError(
                "TAP-Chat's stages supervise the assistant answers only: pass `args=SFTConfig(..., "
                "assistant_only_loss=True)`."
            )
        super().__init__(*args, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        # TAP-Chat has a single loss term, so RegionTrainer's named-term logging has nothing to add; asking trl for the
        # outputs would cost a second forward pass (its fused LM head builds no logits).
        return SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
