"""Train a registered system's tiny model with its own trainer recipe (used by the contract test, the demo and CI).

One function so that the single-process run, the resumed run and the `accelerate launch` run of the contract test
(and the demo) are built the same way: same seed, same data, same `TrainingArguments` apart from what is asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Trainer, TrainingArguments, set_seed

from ..registry import SystemSpec

__all__ = ["build_tiny_trainer"]


def build_tiny_trainer(
    spec: SystemSpec,
    output_dir: str | Path,
    *,
    max_steps: int,
    batch_size: int = 2,
    num_samples: int = 16,
    seed: int = 0,
    learning_rate: float = 1e-3,
    save_steps: int | None = None,
    logging_steps: int = 1,
    model: Any = None,
    processor: Any = None,
    train_dataset: Any = None,
    stage: str | None = None,
    **training_arguments: Any,
) -> Trainer:
    """Build `spec`'s trainer on its tiny config (or the given `model`/`processor`) and synthetic training data.

    Args:
        spec: a registered system with a `training` recipe.
        output_dir: where checkpoints go.
        max_steps: optimisation steps.
        batch_size: per-device batch size (the global batch is `batch_size * processes`).
        num_samples: size of the synthetic training set built by the recipe.
        seed: seeds model init, data and the Trainer.
        save_steps: save a checkpoint every `save_steps` steps (None: no checkpoints).
        stage: the paper's training stage (recipes with `stages`); None is the recipe's `default_stage`. Its
            optimiser settings override `learning_rate` unless `use_stage_optimizer=False` is passed.
        training_arguments: any other `TrainingArguments` field.
    """
    if spec.training is None:
        raise ValueError(f"System {spec.name!r} has no training recipe yet; nothing to train.")
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}.")
    set_seed(seed)
    if model is None:
        model = spec.main_model_class(spec.tiny_config())
    if processor is None:
        processor = spec.tiny_processor()
    recipe = spec.training
    use_stage_optimizer = training_arguments.pop("use_stage_optimizer", False)
    trainer_kwargs = dict(recipe.trainer_kwargs)
    stage_overrides: dict[str, Any] = {}
    if recipe.stages:
        from .region_trainer import stage_by_name

        stage = stage or recipe.default_stage
        trainer_kwargs["stage"] = stage
        if use_stage_optimizer:
            stage_overrides = stage_by_name(recipe.stages, stage).training_arguments_overrides()
    elif stage is not None:
        raise ValueError(f"System {spec.name!r} defines no training stages; got stage={stage!r}.")
    if train_dataset is None:
        train_dataset = recipe.build_dataset(processor, num_samples, seed, stage)
    arguments = {
        "output_dir": str(output_dir),
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "learning_rate": learning_rate,
        "logging_steps": logging_steps,
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "report_to": [],
        "use_cpu": True,
        "seed": seed,
        "data_seed": seed,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    arguments.update(stage_overrides)
    arguments.update(training_arguments)
    return recipe.trainer_class(
        model=model,
        args=TrainingArguments(**arguments),
        train_dataset=train_dataset,
        data_collator=recipe.collator(processor),
        processing_class=processor,
        **trainer_kwargs,
    )
