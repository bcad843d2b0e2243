"""Trainer throughput of every registered system's tiny config vs tiny LLaVA in a plain `Trainer` (PERFORMANCE.md).

Ours: `build_tiny_trainer(spec, ...)`, i.e. the system's tiny config, its `TrainingRecipe` (dataset, collator,
`Trainer` subclass, default paper stage with its freezing) on synthetic data. Peer: transformers'
`LlavaForConditionalGeneration` in a plain `transformers.Trainer`, its collator running `LlavaProcessor` on synthetic
scenes each batch (as the systems' collators run their processors). Both use the same `TrainingArguments` (batch size,
`max_steps`, learning rate, no eval, no saving, `report_to=[]`, no workers, CPU) and the same torch threads.

What the peer matches, per system (from the system's tiny config and its first training batch):
* LLM: the system's own `text_config` (same model type, width, depth, heads, MLP, vocabulary); TAP's caption decoder
  (no `text_config`) is matched by a Llama of its width / depth / heads / MLP ratio / vocabulary;
* vision tower: a CLIP tower of the system's vision width / depth / heads (MLP 2x width when unknown), at the side of
  the system's `pixel_values`;
* sequence: the same padded length as the system's batch and the same number of visual tokens fed to the LLM
  (the CLIP patch is `side / sqrt(visual tokens)`, since LLaVA has no pooling or resampler); for TAP (no LLM input
  sequence) the visual tokens are its image-encoder grid and the text its prompts x caption length per image.

The peer trains all its parameters; ours freezes what its paper stage freezes (trainable counts are in `extra`).
The timed figure is the steady-state seconds per optimisation step (median interval between consecutive
`on_step_end` callbacks, data loading and collation included, the first step of each run excluded); the ratio is
ours / peer, so the samples/s ratio of PERFORMANCE.md is its inverse (target >= 0.9, i.e. time ratio <= 1.11).
Whole `train()` calls (Trainer set-up included) are in `extra`.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import tempfile
import time
from typing import Any

import PIL.Image
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from hf_regionmm.data.synthetic import generate_scenes, vocabulary_words
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.registry import SystemSpec, registered_systems
from hf_regionmm.trainers.tiny_training import build_tiny_trainer

from .harness import Comparison, compare

__all__ = ["run"]

BATCH_SIZE = 4
NUM_SAMPLES = 16
SEED = 0
LEARNING_RATE = 1e-3
IMAGE_TOKEN = "<image>"


class _StepClock(TrainerCallback):
    """Records `time.perf_counter()` at every `on_step_end`; the run's step intervals are their differences."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.ends, self.ends[1:])]


def _training_arguments(output_dir: str, max_steps: int) -> dict[str, Any]:
    """The `TrainingArguments` both sides share (as `build_tiny_trainer` sets them)."""
    return {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "logging_steps": max_steps + 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": SEED,
        "data_seed": SEED,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


# ----------------------------------------------------------------------------------------------------------------
# The LLaVA peer


def _peer_shape(spec: SystemSpec, config: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """Sizes of the LLaVA peer matched to one system (see the module docstring)."""
    side = int(batch["pixel_values"].shape[-1])
    if spec.name == "tap":
        grid = config.image_size // config.patch_size
        captions = batch["caption_ids"]
        text_config = LlamaConfig(
            vocab_size=config.text_vocab_size,
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_hidden_size * config.text_mlp_ratio,
            num_hidden_layers=config.text_num_hidden_layers,
            num_attention_heads=config.text_num_attention_heads,
            max_position_embeddings=512,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        ).to_dict()
        vision = (config.vision_hidden_size, config.vision_num_hidden_layers, config.vision_num_attention_heads)
        visual_tokens = grid * grid
        sequence = visual_tokens + 1 + int(captions.shape[1] * captions.shape[2])
    else:
        # Tied or untied, the head costs the same; LLaVA cannot tie OPT's head (its embeddings sit one level deeper).
        text_config = {**config.text_config.to_dict(), "tie_word_embeddings": False}
        vision_config = config.vision_config
        if spec.name == "tap_chat":  # TAP's own image encoder as the vision tower
            vision = (
                vision_config.vision_hidden_size,
                vision_config.vision_num_hidden_layers,
                vision_config.vision_num_attention_heads,
            )
        else:
            vision = (vision_config.hidden_size, vision_config.num_hidden_layers, vision_config.num_attention_heads)
        visual_tokens = int(getattr(config, "num_image_tokens", None) or config.num_query_tokens)
        sequence = int(batch["input_ids"].shape[1])
    grid = math.isqrt(visual_tokens)
    if grid * grid != visual_tokens or side % grid:
        raise ValueError(
            f"System {spec.name!r}: cannot give the LLaVA peer {visual_tokens} visual tokens on {side}-pixel images "
            "(needs a square grid dividing the side)."
        )
    hidden, layers, heads = vision
    return {
        "text_config": text_config,
        "vision": {
            "hidden_size": hidden,
            "num_hidden_layers": max(layers, 2),
            "num_attention_heads": heads,
            "intermediate_size": 2 * hidden,
            "image_size": side,
            "patch_size": side // grid,
            "projection_dim": hidden,
        },
        "visual_tokens": visual_tokens,
        "sequence": sequence,
    }


class _LlavaCollator:
    """Runs `LlavaProcessor` on a batch of `{"image", "text"}` examples; labels = ids with image and pad ids at -100."""

    def __init__(self, processor: LlavaProcessor, image_token_id: int, pad_token_id: int) -> None:
        self.processor = processor
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(
            self.processor(
                images=[example["image"] for example in examples],
                text=[example["text"] for example in examples],
                padding=True,
                return_tensors="pt",
            )
        )
        labels = batch["input_ids"].clone()
        labels[(labels == self.image_token_id) | (labels == self.pad_token_id)] = -100
        batch["labels"] = labels
        return batch


def _llava_trainer(shape: dict[str, Any], output_dir: str, max_steps: int) -> Trainer:
    """A plain `Trainer` on a tiny LLaVA of `shape`, with a synthetic image + text dataset of `NUM_SAMPLES`."""
    text_config = shape["text_config"]
    vocab_size = int(text_config["vocab_size"])
    # Word tokenizer: <unk> <s> </s> <pad>, words, `<image>` last, all inside the matched LLM vocabulary.
    words = list(dict.fromkeys(vocabulary_words()))[: vocab_size - 5]
    tokenizer = build_word_tokenizer(words, extra_special_tokens=(IMAGE_TOKEN,))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    side = shape["vision"]["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            resample=PIL.Image.BICUBIC,
        ),
        tokenizer=tokenizer,
        patch_size=shape["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    # BOS + expanded image + words: exactly the system's padded sequence length.
    num_words = max(shape["sequence"] - 1 - shape["visual_tokens"], 1)
    scenes = generate_scenes(NUM_SAMPLES, seed=SEED, image_size_range=(64, 128), max_objects=4, with_masks=False)
    dataset = [
        {
            "image": scene["image"].convert("RGB"),
            "text": IMAGE_TOKEN + " " + " ".join(words[(index + offset) % len(words)] for offset in range(num_words)),
        }
        for index, scene in enumerate(scenes)
    ]
    set_seed(SEED)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**shape["vision"]),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    return Trainer(
        model=model,
        args=TrainingArguments(**_training_arguments(output_dir, max_steps)),
        train_dataset=dataset,
        data_collator=_LlavaCollator(processor, image_token_id, tokenizer.pad_token_id),
    )


# ----------------------------------------------------------------------------------------------------------------
# Timing


def _trainable(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _system_comparison(spec: SystemSpec, max_steps: int, repeats: int) -> Comparison:
    output_dir = tempfile.mkdtemp(prefix=f"bench-train-{spec.name}-")
    ours = build_tiny_trainer(
        spec,
        output_dir,
        max_steps=max_steps,
        batch_size=BATCH_SIZE,
        num_samples=NUM_SAMPLES,
        seed=SEED,
        learning_rate=LEARNING_RATE,
        logging_steps=max_steps + 1,
        eval_strategy="no",
    )
    # The stage's freezing happens when the trainer is built; the model's counts are read after it.
    ours_trainable = _trainable(ours.model)
    first_batch = next(iter(ours.get_train_dataloader()))
    shape = _peer_shape(spec, ours.model.config, first_batch)
    peer_dir = tempfile.mkdtemp(prefix="bench-train-llava-")
    peer = _llava_trainer(shape, peer_dir, max_steps)
    peer_batch = next(iter(peer.get_train_dataloader()))

    clocks = {"ours": _StepClock(), "peer": _StepClock()}
    intervals: dict[str, list[float]] = {"ours": [], "peer": []}
    for label, trainer in (("ours", ours), ("peer", peer)):
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(clocks[label])

    def train(label: str, trainer: Trainer) -> None:
        # `compare` times under inference mode; training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            trainer.train()
        intervals[label].extend(clocks[label].intervals())

    result = compare(
        f"Trainer throughput, {spec.name} tiny",
        lambda: train("ours", ours),
        lambda: train("peer", peer),
        ours_label=f"{type(ours).__name__} ({spec.name} tiny recipe)",
        peer_label="Trainer + LlavaForConditionalGeneration",
        repeats=repeats,
        warmup=1,
        target="<= 1.11 (time; >= 0.9 samples/s)",
    )
    for directory in (output_dir, peer_dir):  # nothing is saved there (save_strategy="no"), but Trainer creates them
        shutil.rmtree(directory, ignore_errors=True)
    # The warm-up run's intervals are dropped: only the timed rounds count.
    warm = max_steps - 1
    ours_step = statistics.median(intervals["ours"][warm:])
    peer_step = statistics.median(intervals["peer"][warm:])
    return dataclasses.replace(
        result,
        ours_seconds=ours_step,
        peer_seconds=peer_step,
        ratio=ours_step / peer_step,
        notes=(
            f"Seconds per step (batch {BATCH_SIZE}, steady state, collation included); same TrainingArguments and "
            "threads; LLaVA matched to the system's LLM, vision width/depth, image side, visual tokens and sequence "
            "length (see bench/training.py)."
        ),
        extra={
            "batch_size": BATCH_SIZE,
            "max_steps": max_steps,
            "ours_samples_per_second": round(BATCH_SIZE / ours_step, 2),
            "peer_samples_per_second": round(BATCH_SIZE / peer_step, 2),
            "samples_per_second_ratio": round(peer_step / ours_step, 3),
            "ours_train_call_seconds": round(result.ours_seconds, 3),
            "peer_train_call_seconds": round(result.peer_seconds, 3),
            "ours_trainable_parameters": ours_trainable,
            "peer_trainable_parameters": _trainable(peer.model),
            "ours_parameters": sum(p.numel() for p in ours.model.parameters()),
            "peer_parameters": sum(p.numel() for p in peer.model.parameters()),
            "ours_sequence": int(first_batch["input_ids"].shape[1]) if "input_ids" in first_batch else None,
            "peer_sequence": int(peer_batch["input_ids"].shape[1]),
            "peer_visual_tokens": shape["visual_tokens"],
            "peer_vision": {key: shape["vision"][key] for key in ("hidden_size", "num_hidden_layers", "image_size")},
            "peer_text_model_type": shape["text_config"].get("model_type", "llama"),
            "stage": spec.training.default_stage,
        },
    )


def run(quick: bool = False) -> list[Comparison]:
    """One row per registered system with a training recipe; `quick` runs fewer steps and repetitions."""
    max_steps, repeats = (6, 2) if quick else (12, 5)
    return [_system_comparison(spec, max_steps, repeats) for spec in registered_systems() if spec.training is not None]
