"""RegionBLIP training: single-stage multi-modal pre-training with the semi-hybrid schedule (paper section 3.2).

* What trains is fixed by the model's config (released `freeze_*` flags): the new modalities' queries, PaFE MLPs, LLM
  projections, box heads, the point-cloud adapter and Q-Former, and the LoRA adapters of the new modalities. BLIP-2
  (ViT, image Q-Former, LLM, the image modality) and Point-BERT stay frozen.
* Optimiser (released train yaml): AdamW, weight decay 0.05, cosine from 1e-4 down to 1e-5, 200 warmup steps.
* Semi-hybrid schedule: data of all modalities are mixed in one data set, but every batch holds ONE modality (each
  needs its own encoder, queries and adapters); within an epoch the modalities' batches come one modality after the
  other ("sequential", as the paper) or shuffled ("interleaved").
* Losses (eq. 2): `loss_itc + loss_itm + loss_itg + loss_lm + lambda * loss_reg` (all weights 1 as released),
  logged by name on every step (0 where a term does not apply: `loss_reg` for holistic modalities, `loss_itm` outside
  the config's `itm_modalities`, which are `("image",)` as released). ITC / ITM / ITG run on the Q-Former of the
  batch's modality and need the captions in the Q-Former's vocabulary: `RegionBlipCollator` tokenizes them with the
  processor's `qformer_tokenizer` (BERT) or, when the processor has none, its `tokenizer` (the tiny preset's
  Q-Formers share the word tokenizer).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from ..modeling.modeling_regionblip import qformer_text_inputs
from .region_trainer import RegionTrainer, TrainingStage, stage_by_name

__all__ = [
    "REGIONBLIP_STAGES",
    "RegionBlipCollator",
    "RegionBlipTrainer",
    "RegionBlipTrainingDataset",
    "SemiHybridSampler",
]

_MODALITIES = ("image", "image_region", "point_cloud", "point_cloud_region")

REGIONBLIP_STAGES: tuple[TrainingStage, ...] = (
    TrainingStage(
        name="pretrain",
        trainable=(
            "query_tokens.",
            "region_position_embeddings.",
            "multi_modal_projector.",
            "box_heads.",
            "point_cloud_adapter.",
            "point_cloud_qformer.",
            "point_cloud_qformer_text.",
            "vision_projections.",
            "text_projection.",
            "itm_head.",
            "temperature",
            ".lora_",
        ),
        learning_rate=1e-4,
        weight_decay=0.05,
        lr_scheduler_type="cosine_with_min_lr",
        warmup_steps=200,
        extra_arguments={"lr_scheduler_kwargs": {"min_lr": 1e-5}},
        description="single-stage pre-training of the new modalities on a frozen BLIP-2 and Point-BERT",
    ),
)


class RegionBlipTrainingDataset(torch.utils.data.Dataset):
    """Captioning examples of the four modalities: `{"modality", "caption"}` plus `image` (+ `box`, pixel xyxy) or
    `points` (`(N, 3)`) (+ `box_3d`, centre + size)."""

    def __init__(self, examples: Sequence[dict[str, Any]]) -> None:
        unknown = {example.get("modality") for example in examples} - set(_MODALITIES)
        if unknown:
            raise ValueError(f"examples have unknown modalities {sorted(map(str, unknown))}; use {_MODALITIES}.")
        self.examples = list(examples)

    @classmethod
    def from_synthetic(
        cls, scenes: Any, clouds: Any, scenes_3d: Any, seed: int = 0, include_image_text: bool = False
    ) -> RegionBlipTrainingDataset:
        """I-region-text (region captions), P-text (primitive captions) and P-region-text (object captions in 3D
        scenes) from the synthetic generators, plus I-text (scene captions) with `include_image_text` -- off by
        default, as released: incremental pre-training keeps BLIP-2's image path frozen and needs no I-text data."""
        rng = random.Random(seed)
        examples: list[dict[str, Any]] = []
        if include_image_text:
            for scene in scenes:
                examples.append({"modality": "image", "image": scene["image"], "caption": scene["image_caption"]})
        for scene in scenes:
            index = rng.randrange(len(scene["boxes"]))
            examples.append(
                {
                    "modality": "image_region",
                    "image": scene["image"],
                    "box": list(scene["boxes"][index]),
                    "caption": scene["region_captions"][index],
                }
            )
        for cloud in clouds:
            examples.append(
                {"modality": "point_cloud", "points": np.asarray(cloud["points"]), "caption": cloud["caption"]}
            )
        for scene in scenes_3d:
            index = rng.randrange(len(scene["boxes_3d"]))
            examples.append(
                {
                    "modality": "point_cloud_region",
                    "points": np.asarray(scene["points"]),
                    "box_3d": list(scene["boxes_3d"][index]),
                    "caption": scene["object_captions"][index],
                }
            )
        return cls(examples)

    @property
    def modalities(self) -> list[str]:
        return [example["modality"] for example in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class SemiHybridSampler(Sampler[int]):
    """Indices such that every consecutive run of `batch_size` indices holds one modality.

    Each modality's indices are shuffled (seed + epoch) and cut into batches; a short last batch is filled by
    wrapping around the same modality. `schedule="sequential"` yields the modalities one after the other (the
    paper), `"interleaved"` shuffles the batches of all modalities.
    """

    def __init__(
        self, modalities: Sequence[str], batch_size: int, seed: int = 0, schedule: str = "sequential"
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}.")
        if schedule not in ("sequential", "interleaved"):
            raise ValueError(f"`schedule` must be 'sequential' or 'interleaved'; got {schedule!r}.")
        self.modalities = list(modalities)
        self.batch_size = batch_size
        self.seed = seed
        self.schedule = schedule
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = []
        for modality in _MODALITIES:
            indices = [i for i, m in enumerate(self.modalities) if m == modality]
            if not indices:
                continue
            rng.shuffle(indices)
            shortfall = -len(indices) % self.batch_size
            indices += [indices[i % len(indices)] for i in range(shortfall)]
            batches += [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.schedule == "interleaved":
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[int]:
        return iter([index for batch in self.batches() for index in batch])

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches())


class RegionBlipCollator:
    """Batch one modality's examples through `RegionBlipProcessor` (captions -> `labels`).

    Image examples -> `pixel_values`, `image_sizes` (+ `region_boxes`); point-cloud examples -> `point_clouds`
    (+ `region_boxes_3d`); always `input_ids`, `attention_mask`, `labels`, and with `qformer_text` the captions for
    the Q-Former losses: `qformer_input_ids`, `qformer_attention_mask` `(B, T)` (`qformer_text_inputs`, at most
    `max_qformer_text_length` tokens). `augment` turns on the seeded point-cloud augmentation (seed = `seed` + a
    running batch counter).

    Args:
        qformer_tokenizer: tokenizer of the Q-Former's vocabulary (BERT for released checkpoints); None uses the
            processor's `qformer_tokenizer` if it has one, else its `tokenizer` (right for the tiny preset, whose
            Q-Formers share the LLM's word vocabulary; the model rejects ids outside the Q-Former vocabulary).
        qformer_text: False leaves the Q-Former text out (ITC / ITM / ITG are then 0).
    """

    def __init__(
        self,
        processor: Any,
        augment: bool = False,
        seed: int = 0,
        prompts: dict[str, str] | None = None,
        qformer_tokenizer: Any | None = None,
        qformer_text: bool = True,
        max_qformer_text_length: int = 32,
    ):
        self.processor = processor
        self.augment = augment
        self.seed = seed
        self.prompts = dict(prompts or {})
        self.qformer_tokenizer = (
            qformer_tokenizer or getattr(processor, "qformer_tokenizer", None) or processor.tokenizer
            if qformer_text
            else None
        )
        self.max_qformer_text_length = max_qformer_text_length
        self._calls = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        modalities = {example["modality"] for example in examples}
        if len(modalities) != 1:
            raise ValueError(
                f"A RegionBLIP batch mixes modalities {sorted(modalities)}; use SemiHybridSampler (RegionBlipTrainer "
                "does) so that each batch holds one modality."
            )
        modality = modalities.pop()
        captions = [example["caption"] for example in examples]
        prompt = self.prompts.get(modality, "")
        text = [prompt] * len(examples)
        if modality in ("image", "image_region"):
            batch = self.processor(
                images=[example["image"].convert("RGB") for example in examples],
                boxes=[[example["box"]] for example in examples] if modality == "image_region" else None,
                text=text,
                captions=captions,
                return_tensors="pt",
            )
        else:
            batch = self.processor(
                point_clouds=[example["points"] for example in examples],
                boxes_3d=[example["box_3d"] for example in examples] if modality == "point_cloud_region" else None,
                text=text,
                captions=captions,
                augment=self.augment,
                seed=self.seed + self._calls,
                return_tensors="pt",
            )
        self._calls += 1
        batch = dict(batch)
        if self.qformer_tokenizer is not None:
            batch.update(qformer_text_inputs(self.qformer_tokenizer, captions, self.max_qformer_text_length))
        return batch


class RegionBlipTrainer(RegionTrainer):
    """`RegionTrainer` with the semi-hybrid schedule: every batch holds one modality.

    Args:
        stage: `"pretrain"` (the only stage; its optimiser settings are in `REGIONBLIP_STAGES`).
        schedule: `"sequential"` (paper) or `"interleaved"`, see `SemiHybridSampler`.

    The train data set must expose `modalities` (one name per example, as `RegionBlipTrainingDataset` does). What
    trains is the model config's business (`freeze_*` flags); `self.stage_parameter_counts` reports it.
    """

    def __init__(
        self,
        *args: Any,
        stage: str = "pretrain",
        stages: Sequence[TrainingStage] = REGIONBLIP_STAGES,
        schedule: str = "sequential",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage_by_name(tuple(stages), stage)
        self.schedule = schedule
        counts = {"trainable": 0, "frozen": 0}
        for parameter in self.model.parameters():
            counts["trainable" if parameter.requires_grad else "frozen"] += parameter.numel()
        self.stage_parameter_counts = counts

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        modalities = getattr(dataset, "modalities", None)
        if modalities is None:
            raise ValueError(
                "RegionBlipTrainer needs a train data set with a `modalities` list (e.g. RegionBlipTrainingDataset) "
                "to build one-modality batches."
            )
        # One modality per GLOBAL batch: accelerate hands each process consecutive per-device slices of it.
        global_batch = self.args.per_device_train_batch_size * max(1, self.args.world_size)
        return SemiHybridSampler(modalities, global_batch, seed=self.args.seed, schedule=self.schedule)
