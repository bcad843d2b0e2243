"""What every `hf-regionmm convert <system>` shares once the weights are renamed: checks and the atomic write.

A converter builds the model from renamed tensors (`from_pretrained(None, config=..., state_dict=...,
output_loading_info=True)`), then calls `check_loading_info` and `write_converted_checkpoint`: the checkpoint
(safetensors weights, config, processor, model card) is written into a hidden staging folder beside `destination`
and renamed into place only when complete, so a failure or an interrupt leaves nothing half-written, and an
existing non-empty `destination` or the source itself is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from hf_regionmm.hub.model_card import write_model_card

__all__ = ["check_destination", "check_loading_info", "write_converted_checkpoint"]


def check_destination(destination: Path, source: Path) -> None:
    """Refuse a `destination` that holds files already, or that is (or contains) the `source` checkpoint."""
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise ValueError(
            f"`destination` {destination} already exists and is not an empty folder; pass a new path (the converter "
            "never overwrites files)."
        )
    if destination.resolve() == source.resolve() or source.resolve().is_relative_to(destination.resolve()):
        raise ValueError("`destination` must not hold `source`; the original checkpoint is never modified.")


def check_loading_info(loading_info: Mapping[str, Any], allowed_missing: Collection[str] = ()) -> None:
    """Raise unless the converted state dict loaded exactly (no missing, unexpected or mismatched keys).

    `allowed_missing`: parameter names the release does not carry and that keep their initialisation on purpose.
    """
    allowed = set(allowed_missing)
    problems = {
        name: sorted(set(values) - (allowed if name == "missing_keys" else set()))
        for name, values in loading_info.items()
        if values
    }
    problems = {name: values for name, values in problems.items() if values}
    if problems:
        raise ValueError(f"Loading the converted weights was not exact: {problems}. Nothing was written.")


def write_converted_checkpoint(
    model: PreTrainedModel,
    processor: Any,
    destination: Path,
    source: Path,
    *,
    system: str,
    training_summary: str,
) -> Path:
    """Write `model` (+ `processor` when not None) and the `system` model card to `destination`, atomically.

    `training_summary` is the card's note on where the weights came from and which released behaviour is kept.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.converting-", dir=destination.parent))
    try:
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        write_model_card(
            staging, system, model_id=destination.name, tags=["converted"], training_summary=training_summary
        )
        check_destination(destination, source)
        if destination.exists():
            destination.rmdir()
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination
