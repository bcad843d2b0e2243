"""u-LLaVA's part of `hf-regionmm demo`: train a tiny u-LLaVA through the paper's two stages and show that it learned.

The run (about a minute on 2 CPU cores):

1. build the tiny u-LLaVA and its offline processor, and evaluate the untrained model on held-out synthetic scenes
   (`hf_regionmm.evaluation.ullava_eval`: RES cIoU/gIoU, REC Prec@0.5 of the paper's combined inference and of the
   box-only instruction, salient cIoU);
2. train with `ULlavaTrainer`, stage by stage (paper Sec. 3 and 4.1): `align` (stage I: the projector learns to feed
   the frozen LLM, on image and video captions) and `instruct` (stage II: projector + LLM + `[SEG]` / `[LOC]` heads +
   SAM mask decoder, plus the random SAM image encoder, on RES / REC / salient / semantic instructions, RES weighted
   up);
3. evaluate again, save the checkpoint (safetensors + processor + a model card with the results) and pictures of
   held-out scenes with the predicted RES mask and `[LOC]` box.

What the demo changes from the paper, and why: the tiny model starts from random weights (no CLIP / Vicuna / SAM
download), so the stage II learning rate is 200x the paper's 7B one, init stds and loss weights are changed, the SAM
image encoder trains in stage II (the paper freezes a PRETRAINED one; a random one has no features worth freezing),
REC boxes come from the mask (`rec_fusion="mask"`, see below) (`ULlavaDemoRecipe`), and the data set is the
procedural coloured-shape scenes. CLIP stays frozen and random, as the paper freezes it.

What it shows, and what it does not: the mask head learns to segment the scenes' objects (RES and salient cIoU rise
from 0), but a 2-layer, 64-wide LLM trained from scratch for a minute does not learn to put the REFERENT into the
LLM state that the `[SEG]` / `[LOC]` heads read (the state of the `:` before each token: its spread over inputs is
~5% of its size, and different expressions on one image give the same mask). So the `[LOC]` decoder regresses the
mean box and REC Prec@0.5 stays near chance; the box of the mask (the paper's combined REC, Fig. 2) is the better
box, which is why the demo fuses with `"mask"`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PrinterCallback, TrainerCallback, set_seed

from ..data.pictures import draw_boxes, draw_masks
from ..data.synthetic import generate_scenes, generate_videos
from ..evaluation.ullava_eval import (
    ULLAVA_EVAL_SCENES,
    ULLAVA_EVAL_TASKS,
    evaluate_ullava,
    generate_ullava_answers,
    ullava_eval_samples,
    ullava_eval_scenes,
)
from ..modeling.modeling_ullava import ULlavaForConditionalGeneration
from ..trainers.region_trainer import stage_by_name
from ..trainers.tiny_training import build_tiny_trainer
from ..trainers.ullava import ULLAVA_STAGES, ULlavaTrainingDataset
from .demo_outputs import before_after_table, save_demo_checkpoint, write_demo_metrics

__all__ = ["QUICK_RECIPE", "ULlavaDemoRecipe", "ullava_demo"]


@dataclass(frozen=True)
class ULlavaDemoRecipe:
    """What the u-LLaVA demo trains, on what, for how long.

    Args:
        config_overrides: keyword arguments of `tiny_ullava_config` (sub-config dicts are merged into the preset's).
            The default raises the LLM's and heads' init std to 0.1 (from 0.02: the 64-wide tiny LLM and the
            [SEG]/[LOC] heads would start with nearly input-independent states). It weights CE 0.25, dice 2, box
            L1 2 and GIoU 1 (eq. 3: 1 / 0.5 / 1 / 1), so Adam's steps on the LLM are not dominated by the LM loss of a
            model that has to learn its language from scratch, and sets `rec_fusion="mask"`: REC is scored on the
            box of the `[SEG]` mask (the paper's combined REC), which the tiny model learns far better than the
            `[LOC]` box (see the module docstring).
        num_train_scenes: synthetic training scenes (split "train", the `ULLAVA_EVAL_SCENES` distribution); every
            epoch rotates the task of each scene and reseeds the instruction choice.
        num_train_videos: captioned clips added to the `align` stage.
        num_eval_scenes: held-out scenes (split "test") evaluated before and after training.
        batch_size: per-step batch of both stages.
        align_steps, instruct_steps: optimisation steps per stage.
        align_lr, instruct_lr: peak learning rates (cosine decay, linear warm-up). The paper's 2e-3 / 2e-5 are for
            pretrained 7B weights; the tiny random model needs a far larger stage II rate (4e-3, 200x).
        warmup_ratio: warm-up share of each stage's steps.
        instruct_tasks: task of sample i is `instruct_tasks[i % len]` (RES repeated to weight it up; captions are
            left to the `align` stage).
        eval_tasks: what `evaluate_ullava` measures before and after.
        instruct_extra_trainable: parameter-name patterns trained in `instruct` on top of the paper's stage II
            (default: the SAM image encoder, random here).
        num_pictures: held-out scenes drawn with their predictions.
        seed: seeds data, initialisation and training.
    """

    config_overrides: Mapping[str, Any] = field(
        default_factory=lambda: {
            "text_config": {"initializer_range": 0.1},
            "ce_loss_weight": 0.25,
            "dice_loss_weight": 2.0,
            "l1_loss_weight": 2.0,
            "giou_loss_weight": 1.0,
            "rec_fusion": "mask",
        }
    )
    num_train_scenes: int = 512
    num_train_videos: int = 16
    num_eval_scenes: int = 32
    batch_size: int = 8
    align_steps: int = 40
    instruct_steps: int = 600
    align_lr: float = 2e-3
    instruct_lr: float = 4e-3
    warmup_ratio: float = 0.05
    instruct_tasks: Sequence[str] = ("res", "res", "rec", "res", "salient", "res", "semantic")
    eval_tasks: Sequence[str] = ULLAVA_EVAL_TASKS
    instruct_extra_trainable: Sequence[str] = ("model.sam_vision_encoder.",)
    num_pictures: int = 4
    seed: int = 0


# A reduced run for tests: the same code path in seconds; it shows the plumbing, not learning.
QUICK_RECIPE = ULlavaDemoRecipe(
    num_train_scenes=8,
    num_train_videos=2,
    num_eval_scenes=3,
    batch_size=4,
    align_steps=1,
    instruct_steps=2,
    num_pictures=2,
)


class _ProgressCallback(TrainerCallback):
    """Report the training loss of a stage through the demo's `progress` callback, every `every` steps."""

    def __init__(self, progress: Callable[[str], None], stage: str, max_steps: int, every: int) -> None:
        self.progress, self.stage, self.max_steps, self.every = progress, stage, max_steps, every

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs and (state.global_step % self.every == 0 or state.global_step == self.max_steps):
            terms = ", ".join(
                f"{name.removeprefix('loss_')} {logs[name]:.3f}"
                for name in ("loss_lm_loss", "loss_mask_dice", "loss_box_l1", "loss_box_giou")
                if name in logs
            )
            self.progress(
                f"ullava {self.stage}: step {state.global_step}/{self.max_steps}, loss {logs['loss']:.4f}"
                + (f" ({terms})" if terms else "")
            )


def _instruct_dataset(scenes: Any, tasks: Sequence[str], num_examples: int, seed: int) -> torch.utils.data.Dataset:
    """Enough epochs of `ULlavaTrainingDataset` for `num_examples`; epoch e rotates the task cycle by e and reseeds
    the instruction choice, so a scene shows another task and expression every time it comes back."""
    epochs = max(1, -(-num_examples // len(scenes)))
    tasks = tuple(tasks)
    return torch.utils.data.ConcatDataset(
        [
            ULlavaTrainingDataset(
                scenes, tasks=tasks[epoch % len(tasks) :] + tasks[: epoch % len(tasks)], seed=seed * 1_000 + epoch
            )
            for epoch in range(epochs)
        ]
    )


def _train_stage(
    model: ULlavaForConditionalGeneration,
    processor: Any,
    stage: str,
    dataset: torch.utils.data.Dataset,
    steps: int,
    learning_rate: float,
    recipe: ULlavaDemoRecipe,
    output_dir: Path,
    progress: Callable[[str], None],
) -> list[float]:
    """Train `stage` for `steps` and return the logged losses (first to last)."""
    from .ullava import ULLAVA_SYSTEM

    paper_stage = stage_by_name(ULLAVA_STAGES, stage)
    trainer = build_tiny_trainer(
        ULLAVA_SYSTEM,
        output_dir / f"trainer-{stage}",
        max_steps=steps,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        learning_rate=learning_rate,
        weight_decay=paper_stage.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=int(recipe.warmup_ratio * steps),
        logging_steps=max(1, steps // 10),
        model=model,
        processor=processor,
        train_dataset=dataset,
        stage=stage,
    )
    description = paper_stage.description
    if stage == "instruct" and recipe.instruct_extra_trainable:
        # The paper freezes PRETRAINED CLIP / SAM encoders; the demo's random ones have no features worth freezing.
        trainer.stages = tuple(
            dataclasses.replace(item, trainable=(*item.trainable, *recipe.instruct_extra_trainable))
            if item.name == "instruct"
            else item
            for item in trainer.stages
        )
        trainer.set_stage(stage)
        description += f" + {', '.join(recipe.instruct_extra_trainable)} (demo: random encoders)"
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_ProgressCallback(progress, stage, steps, every=max(1, steps // 4)))
    counts = trainer.stage_parameter_counts
    progress(
        f"ullava {stage}: {description}; {counts['trainable']:,} trainable / {counts['frozen']:,} frozen "
        f"parameters, {steps} steps at lr {learning_rate:g}"
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _evaluate(model: ULlavaForConditionalGeneration, processor: Any, scenes: Any, recipe: ULlavaDemoRecipe) -> dict:
    """`evaluate_ullava` on `recipe.eval_tasks`, plus REC asked with the box-only instruction (`locate_prec@0.5`)."""
    metrics = evaluate_ullava(model, processor, scenes, tasks=recipe.eval_tasks)
    if "rec" in recipe.eval_tasks:
        locate = evaluate_ullava(model, processor, scenes, tasks=("rec",), rec_query="locate")
        metrics["locate_prec@0.5"] = locate["prec@0.5"]
        metrics["locate_no_box_rate"] = locate["rec_no_box_rate"]
    return metrics


def _upscale(mask: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)


def _pictures(
    model: ULlavaForConditionalGeneration, processor: Any, scenes: Any, directory: Path, scale: int = 3
) -> list[dict[str, Any]]:
    """Draw, for each scene, the RES mask and `[LOC]` box predicted for its first referring expression."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [scenes[index] for index in range(len(scenes))]
    samples = ullava_eval_samples(rows, ("res",))["res"]
    # One picture per scene: the first object with an expression.
    firsts = {sample["scene"]: sample for sample in reversed(samples)}
    picked = [firsts[index] for index in sorted(firsts)]
    answers = generate_ullava_answers(
        model, processor, [rows[sample["scene"]]["image"] for sample in picked], [sample["query"] for sample in picked]
    )
    entries = []
    for sample, answer in zip(picked, answers, strict=True):
        # Pictures are upscaled so the labels (PIL's default bitmap font) stay readable next to 64-112 pixel scenes.
        image = rows[sample["scene"]]["image"].convert("RGB")
        image = image.resize((image.width * scale, image.height * scale), resample=0)
        mask = (
            answer.mask if answer.mask is not None else np.zeros((image.height // scale, image.width // scale), bool)
        )
        picture = draw_masks(image, _upscale(mask, scale)[None])
        boxes = [[value * scale for value in box] for box in answer.boxes[:1]]
        picture = draw_boxes(picture, boxes, labels=[sample["expression"]] * len(boxes))
        path = directory / f"scene{sample['scene']}_res.png"
        picture.save(path)
        entries.append(
            {
                "scene": sample["scene"],
                "picture": path.name,
                "query": sample["query"],
                "answer": answer.text,
                "predicted_box": answer.boxes[0] if answer.boxes else None,
                "predicted_mask_pixels": int(mask.sum()),
                "mask_iou": float((mask & sample["mask"]).sum() / max(1, (mask | sample["mask"]).sum())),
            }
        )
    (directory / "pictures.json").write_text(json.dumps(entries, indent=1))
    return entries


def _training_summary(recipe: ULlavaDemoRecipe, before: Mapping[str, float], after: Mapping[str, float]) -> str:
    return (
        "This tiny checkpoint was trained by `hf-regionmm demo` from random weights on procedurally generated "
        f"scenes of 2-4 coloured shapes ({recipe.num_train_scenes} training scenes): `align` {recipe.align_steps} "
        f"steps at lr {recipe.align_lr:g}, `instruct` {recipe.instruct_steps} steps at lr {recipe.instruct_lr:g}, "
        f"batch {recipe.batch_size} (the paper's stage II rate 2e-5 is for pretrained 7B weights; a tiny random model "
        "needs a larger one). CLIP is random and frozen; trained on top of the paper's stage II: "
        f"{', '.join(recipe.instruct_extra_trainable) or 'nothing'}. REC boxes: "
        f"`rec_fusion={recipe.config_overrides.get('rec_fusion', 'box')!r}`. Held-out scenes before and after "
        f"training:\n\n{before_after_table(before, after)}"
    )


def ullava_demo(
    output_dir: Path,
    progress: Callable[[str], None] = print,
    *,
    quick: bool = False,
    recipe: ULlavaDemoRecipe | None = None,
) -> dict[str, float]:
    """Train a tiny u-LLaVA through align -> instruct on synthetic scenes and measure what it learned.

    Args:
        output_dir: folder for everything the run writes: `checkpoint/` (model, processor, README.md card),
            `pictures/` (held-out scenes with the predicted RES mask and box, plus `pictures.json`), `metrics.json`,
            and the trainers' scratch folders.
        progress: called with one-line progress messages.
        quick: run `QUICK_RECIPE` (a few steps, seconds; for tests) instead of the full demo.
        recipe: an explicit `ULlavaDemoRecipe` (overrides `quick`).

    Returns:
        Floats: `ciou_before` / `_after`, `prec@0.5_before` / `_after` (the paper's combined REC: segment-and-locate
        query, box fused by `config.rec_fusion`), `locate_prec@0.5_before` / `_after` (box-only query, the `[LOC]`
        box alone), and the other `evaluate_ullava` metrics with the same suffixes (`giou`, `salient_ciou`,
        `salient_giou`, `res_no_mask_rate`, `rec_no_box_rate`, `salient_no_mask_rate`), plus `train_seconds`.
    """
    from .ullava import tiny_ullava_config, tiny_ullava_processor

    recipe = recipe or (QUICK_RECIPE if quick else ULlavaDemoRecipe())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(recipe.seed)
    config = tiny_ullava_config(**dict(recipe.config_overrides))
    model = ULlavaForConditionalGeneration(config)
    processor = tiny_ullava_processor()
    if (
        processor.num_image_tokens != config.num_image_tokens
        or processor.sam_image_processor.size["longest_edge"] != config.sam_image_size
    ):
        raise ValueError(
            "`recipe.config_overrides` changes `image_size` or the SAM input size, which the tiny processor does not "
            "follow; keep the tiny preset's image sizes."
        )

    eval_scenes = ullava_eval_scenes(recipe.num_eval_scenes, seed=recipe.seed)
    progress(f"ullava: evaluating the untrained model on {len(eval_scenes)} held-out scenes")
    before = _evaluate(model, processor, eval_scenes, recipe)

    started = time.perf_counter()
    train_scenes = generate_scenes(recipe.num_train_scenes, seed=recipe.seed, split="train", **ULLAVA_EVAL_SCENES)
    videos = (
        generate_videos(
            recipe.num_train_videos,
            seed=recipe.seed,
            split="train",
            num_frames=processor.num_video_frames,
            image_size=64,
        )
        if recipe.num_train_videos
        else None
    )
    losses = {}
    if recipe.align_steps:
        dataset = ULlavaTrainingDataset(train_scenes, videos, tasks=("caption",), seed=recipe.seed)
        losses["align"] = _train_stage(
            model, processor, "align", dataset, recipe.align_steps, recipe.align_lr, recipe, output_dir, progress
        )
    if recipe.instruct_steps:
        dataset = _instruct_dataset(
            train_scenes, recipe.instruct_tasks, recipe.instruct_steps * recipe.batch_size, recipe.seed
        )
        losses["instruct"] = _train_stage(
            model,
            processor,
            "instruct",
            dataset,
            recipe.instruct_steps,
            recipe.instruct_lr,
            recipe,
            output_dir,
            progress,
        )
    train_seconds = time.perf_counter() - started

    progress("ullava: evaluating the trained model on the same held-out scenes")
    after = _evaluate(model, processor, eval_scenes, recipe)

    save_demo_checkpoint(
        model,
        processor,
        output_dir,
        "ullava",
        model_id="ullava-tiny-demo",
        eval_results=after,
        eval_dataset=f"hf_regionmm synthetic (held-out split, {len(eval_scenes)} scenes)",
        training_summary=_training_summary(recipe, before, after),
    )
    picture_scenes = eval_scenes.select(range(min(recipe.num_pictures, len(eval_scenes))))
    _pictures(model, processor, picture_scenes, output_dir / "pictures")

    metrics = write_demo_metrics(output_dir, before, after, train_seconds, recipe, losses=losses)
    summary = []
    if "ciou" in after:
        summary.append(f"RES cIoU {before['ciou']:.3f} -> {after['ciou']:.3f}")
    if "prec@0.5" in after:
        summary.append(f"REC Prec@0.5 {before['prec@0.5']:.3f} -> {after['prec@0.5']:.3f}")
    if "locate_prec@0.5" in after:
        summary.append(f"box-only REC Prec@0.5 {before['locate_prec@0.5']:.3f} -> {after['locate_prec@0.5']:.3f}")
    progress(f"ullava: {', '.join(summary) or 'trained'} after {train_seconds:.0f} s of training")
    return metrics
