"""`RegionTrainer`: the `transformers.Trainer` every system's trainer derives from, and training-stage recipes.

The four papers train with several loss terms at once (Groma's focal + L1 + GIoU set loss, RegionBLIP's ITC + ITM +
ITG + LM + L_reg, TAP's concept KL + focal/dice + caption CE, u-LLaVA's CE + BCE + dice + L1 + GIoU), and in stages
that freeze different parts (Groma Table 10, u-LLaVA stages I/II, TAP stages 1/2). This module adds exactly those two
things to `Trainer` and nothing else, so `accelerate launch`, checkpointing, resuming and callbacks stay stock:

- every model output may carry `loss_dict: dict[str, Tensor]` (unweighted named terms); `RegionTrainer` averages each
  term over the optimisation steps since the last log, across processes, and logs it next to `loss`;
- a `TrainingStage` names which parameters train (by substring patterns) plus the stage's optimiser settings;
  `apply_training_stage` freezes everything else and returns a summary that tests and logs can check;
- `use_lora=True` (systems whose model has `LanguageModelLoraMixin` and whose trainer names `language_model_parts`):
  the LLM trains through LoRA and every other trained module through the adapter's `modules_to_save` copy
  (`language_model_lora_stage`), so the saved PEFT adapter holds everything the stage trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer

__all__ = [
    "RegionTrainer",
    "TrainingStage",
    "apply_training_stage",
    "language_model_lora_stage",
    "prepare_language_model_lora",
    "stage_by_name",
    "trainable_parameter_names",
]

# Parameter-name patterns of the LLM's LoRA weights (peft: `<module>.lora_A.<adapter>.weight`).
LORA_PARAMETER_PARTS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class TrainingStage:
    """One training stage of a paper: what trains, and with which optimiser settings.

    Args:
        name: the stage's name on the command line (`"det"`, `"align"`, `"instruct"`).
        trainable: substrings of parameter names (as in `model.named_parameters()`) that train in this stage; every
            other parameter is frozen. An empty tuple trains nothing and is rejected.
        frozen: substrings that stay frozen even if they match `trainable` (e.g. a frozen tower inside a trained
            block).
        learning_rate, weight_decay, lr_scheduler_type, warmup_steps: the paper's optimiser settings for the stage,
            applied by `training_arguments_overrides()`.
        description: one line for logs and the model card.
    """

    name: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...] = ()
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.0
    description: str = ""
    extra_arguments: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.trainable:
            raise ValueError(f"TrainingStage {self.name!r}: `trainable` must name at least one parameter pattern.")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainingStage {self.name!r}: `learning_rate` must be > 0, got {self.learning_rate}.")

    def is_trainable(self, parameter_name: str) -> bool:
        return any(p in parameter_name for p in self.trainable) and not any(p in parameter_name for p in self.frozen)

    def training_arguments_overrides(self) -> dict[str, Any]:
        """Keyword arguments for `TrainingArguments` that this stage fixes (the caller's other settings stay)."""
        return {
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": self.lr_scheduler_type,
            "warmup_steps": self.warmup_steps,
            **self.extra_arguments,
        }


def apply_training_stage(model: nn.Module, stage: TrainingStage) -> dict[str, int]:
    """Set `requires_grad` on every parameter of `model` according to `stage`.

    Returns `{"trainable": n_trainable_parameters, "frozen": n_frozen_parameters}` (counts of scalars). Raises a
    `ValueError` when a pattern of `stage.trainable` matches no parameter (a renamed module would otherwise silently
    freeze everything).
    """
    matched = dict.fromkeys(stage.trainable, False)
    counts = {"trainable": 0, "frozen": 0}
    for name, parameter in model.named_parameters():
        train = stage.is_trainable(name)
        parameter.requires_grad_(train)
        counts["trainable" if train else "frozen"] += parameter.numel()
        for pattern in stage.trainable:
            if pattern in name:
                matched[pattern] = True
    missing = [p for p, hit in matched.items() if not hit]
    if missing:
        raise ValueError(
            f"Stage {stage.name!r}: the trainable patterns {missing} match no parameter of {type(model).__name__}; "
            "check the module names (model.named_parameters())."
        )
    return counts


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that currently require gradients."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def language_model_lora_stage(
    stage: TrainingStage, model: nn.Module, language_model_parts: Sequence[str]
) -> TrainingStage:
    """The LoRA variant of `stage`: the LLM (the patterns of `stage.trainable` listed in `language_model_parts`)
    trains through its LoRA weights only (base weights, embeddings and `lm_head` frozen); every other trained pattern
    must name a module the adapter keeps in `modules_to_save` and trains through that copy (peft keeps the original
    frozen next to it), so the saved adapter holds everything the stage trains.

    Raises a `ValueError` when the model has no LoRA in its LLM, or when a trained pattern names no module or a module
    that is not in the adapter's `modules_to_save`.
    """
    from peft.utils import ModulesToSaveWrapper

    has_lora = getattr(model, "has_language_model_lora", None)
    if not callable(has_lora) or not has_lora():
        raise ValueError(
            f"Stage {stage.name!r} with LoRA needs LoRA layers in the LLM; call "
            "`model.add_language_model_lora()` (or pass use_lora=True to the trainer)."
        )
    # A stage that keeps the LLM frozen (u-LLaVA's alignment stage) keeps its LoRA frozen too.
    trains_language_model = any(pattern in language_model_parts for pattern in stage.trainable)
    lora_parts = LORA_PARAMETER_PARTS if trains_language_model else ()
    trainable: list[str] = []
    for pattern in stage.trainable:
        if pattern in language_model_parts:
            continue
        module_name = pattern.rstrip(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as error:
            raise ValueError(
                f"Stage {stage.name!r}: with LoRA every trainable pattern must name a module; {pattern!r} does not."
            ) from error
        if not isinstance(module, ModulesToSaveWrapper):
            raise ValueError(
                f"Stage {stage.name!r} trains `{module_name}`, but the LoRA adapter does not keep it in "
                "`modules_to_save`, so a saved adapter would lose it; build the adapter with "
                "`model.language_model_lora_config()` or add the module to `modules_to_save`."
            )
        trainable.append(f"{module_name}.modules_to_save.")
    return dataclasses.replace(
        stage,
        trainable=(*trainable, *lora_parts),
        frozen=(*stage.frozen, ".original_module."),
        description=f"{stage.description}; LLM through LoRA",
    )


def prepare_language_model_lora(model: Any, use_lora: bool, lora_config: Any = None) -> None:
    """Add the LLM's LoRA adapter for `use_lora` (`model.add_language_model_lora(lora_config)`, unless the model
    already carries one); refuse a `lora_config` without `use_lora`, and a model with unmerged LoRA without it."""
    if lora_config is not None and not use_lora:
        raise ValueError("`lora_config` is given but `use_lora` is False; pass use_lora=True to train with LoRA.")
    supports_lora = callable(getattr(model, "add_language_model_lora", None))
    if use_lora and not supports_lora:
        raise TypeError(
            f"use_lora=True needs a model with LLM LoRA support (`add_language_model_lora`); "
            f"{type(model).__name__} has none."
        )
    if not supports_lora:
        return
    if use_lora and not model.has_language_model_lora():
        model.add_language_model_lora(lora_config)
    elif not use_lora and model.has_language_model_lora():
        raise ValueError(
            "The model carries LoRA layers in its LLM; pass use_lora=True to train them, or merge them first "
            "(`model.merge_language_model_lora()`)."
        )


class RegionTrainer(Trainer):
    """A `Trainer` that logs each named loss term of the model output next to the total loss.

    Models return unweighted terms in `outputs.loss_dict` (`{"loss_ce": ..., "loss_giou": ...}`); the total that is
    optimised stays `outputs.loss`. Terms are averaged over the micro-batches since the last log and over processes,
    then logged under their own names (a name without the `loss` prefix gets `loss_` prepended). Terms are assumed
    to be normalised like `outputs.loss` (by the global token count when the model takes `num_items_in_batch`, else
    per process), so the logged values match a one-process run at the same global batch. All processes must
    return the same term names for a given batch layout (return zeros for absent terms), since the cross-process mean
    is a collective call.

    Paper stages: a subclass sets `stages` (its `TrainingStage` table) and `default_stage`; the trainer then freezes
    the model for `stage=` (or the default) at construction, and `set_stage(name)` switches before `train()` (the
    optimizer is built from the parameters that require gradients). `self.stage_parameter_counts` holds
    `{"trainable": n, "frozen": m}`. Override `resolve_stage` to adapt a stage to the model (e.g. to name blocks
    that depend on the config).

    LoRA: `use_lora=True` adds the model's LLM adapter (`model.add_language_model_lora(lora_config)`, unless it is
    already there; `lora_config` defaults to `model.language_model_lora_config()`) before `Trainer` sees the model,
    and every stage is trained through it (`language_model_lora_stage`): the stage patterns listed in the class
    attribute `language_model_parts` are the LLM and train as LoRA, the others through their `modules_to_save`
    copies. A trainer whose `language_model_parts` is empty refuses `use_lora=True`.
    """

    stages: tuple[TrainingStage, ...] = ()
    default_stage: str | None = None
    # Stage patterns that are the LLM (its base weights, embeddings and head): under LoRA they train as LoRA only.
    language_model_parts: tuple[str, ...] = ()

    def __init__(
        self,
        *args: Any,
        stage: str | None = None,
        stages: Sequence[TrainingStage] | None = None,
        use_lora: bool = False,
        lora_config: Any = None,
        **kwargs: Any,
    ) -> None:
        if (use_lora or lora_config is not None) and not self.language_model_parts:
            raise ValueError(f"{type(self).__name__} has no LoRA recipe; leave `use_lora` / `lora_config` unset.")
        model = kwargs.get("model", args[0] if args else None)
        if self.language_model_parts and model is not None:
            prepare_language_model_lora(model, use_lora, lora_config)
        self.use_lora = use_lora
        super().__init__(*args, **kwargs)
        self._loss_term_sums: dict[str, torch.Tensor] = {}
        self._loss_term_count = 0
        if stages is not None:
            self.stages = tuple(stages)
        self.stage: TrainingStage | None = None
        self.stage_parameter_counts: dict[str, int] | None = None
        if self.stages:
            self.set_stage(stage or self.default_stage or self.stages[-1].name)
        elif stage is not None:
            raise ValueError(f"{type(self).__name__} defines no training stages; got stage={stage!r}.")

    def resolve_stage(self, name: str) -> TrainingStage:
        """The `TrainingStage` called `name` (subclasses may adapt it to the model), through LoRA under `use_lora`."""
        stage = stage_by_name(self.stages, name)
        if self.use_lora:
            return language_model_lora_stage(stage, self.model, self.language_model_parts)
        return stage

    def set_stage(self, name: str) -> None:
        """Freeze/unfreeze the model for stage `name`; call before `train()`."""
        self.stage = self.resolve_stage(name)
        self.stage_parameter_counts = apply_training_stage(self.model, self.stage)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            # Trainer multiplies the loss by the process count when the model normalised it by the token count of
            # the whole global batch (average_tokens_across_devices); the named terms get the same factor so that
            # the logged values equal a one-process run at the same global batch.
            scale = 1
            if (
                self.args.average_tokens_across_devices
                and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None
            ):
                scale = self.accelerator.num_processes
            self._accumulate_loss_terms(outputs, scale)
        return (loss, outputs) if return_outputs else loss

    def _accumulate_loss_terms(self, outputs: Any, scale: float = 1) -> None:
        loss_dict = outputs.get("loss_dict") if isinstance(outputs, dict) else getattr(outputs, "loss_dict", None)
        if not loss_dict:
            return
        for name, value in loss_dict.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            value = value * scale
            key = name if name.startswith("loss") else f"loss_{name}"
            self._loss_term_sums[key] = self._loss_term_sums.get(key, 0.0) + value
        self._loss_term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_term_count:
            names = sorted(self._loss_term_sums)
            device = self.args.device
            means = torch.stack([self._loss_term_sums[n].to(device) for n in names]) / self._loss_term_count
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            logs.update({name: round(float(v), 6) for name, v in zip(names, means.tolist(), strict=True)})
            self._loss_term_sums.clear()
            self._loss_term_count = 0
        super().log(logs, start_time)


def stage_by_name(stages: Sequence[TrainingStage], name: str) -> TrainingStage:
    """The stage called `name`, or a clear error listing the known stage names."""
    for stage in stages:
        if stage.name == name:
            return stage
    raise ValueError(f"Unknown training stage {name!r}; choose one of {[s.name for s in stages]}.")
