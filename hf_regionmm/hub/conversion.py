"""What every `hf-regionmm convert <system>` shares once the weights are renamed: checks and the atomic write.

A converter builds the model from renamed tensors (`from_pretrained(None, config=..., state_dict=...,
output_loading_info=True)`), then calls `check_loading_info` and `write_converted_checkpoint`: the checkpoint
(safetensors weights, config, processor, model card) is written into a hidden staging folder beside `destination`
and renamed into place only when complete, so a failure or an interrupt leaves nothing half-written, and an
existing non-empty `destination` or the source itself is never overwritten.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors_file
from transformers import PreTrainedModel

from hf_regionmm.hub.model_card import write_model_card

__all__ = [
    "check_destination",
    "expected_shapes",
    "format_keys",
    "check_loading_info",
    "instantiate_converted",
    "load_weight_file",
    "resolve_dtype",
    "torch_load_weights_only",
    "write_converted_checkpoint",
]


def format_keys(keys: list[str], limit: int = 12) -> str:
    """The first `limit` of `keys`, comma-separated, with a count of the rest: for error messages."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def expected_shapes(model_class: type[PreTrainedModel], config: Any) -> dict[str, torch.Size]:
    """Parameter name -> shape of `model_class(config)`, built on the meta device (no memory for the weights)."""
    with torch.device("meta"):
        model = model_class(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def torch_load_weights_only(path: Path, label: str, resave_hint: str) -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, never anything else.

    A pickle that names any other object is refused (never executed) with a `ValueError` that starts
    "Refusing to load {label}" and ends with `resave_hint`. Zip-format files are memory-mapped so the weights are not
    read into memory twice.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Refusing to load {label}: it holds more than tensors and plain containers (torch.load(weights_only=True) "
            f"rejected it: {first_line}). It is never unpickled otherwise; {resave_hint}"
        ) from None


def resolve_dtype(dtype: torch.dtype | str | None, tensors: Iterable[torch.Tensor] = ()) -> torch.dtype:
    """The dtype to convert to: `dtype` (a floating torch dtype or its name) when given, else the one floating dtype
    of `tensors` (the release's own), else float32, which holds fp16/bf16 values exactly."""
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"`dtype` must be a torch dtype or its name such as 'float16'; got {dtype!r}.")
        dtype = resolved
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating torch dtype (float32, float16, bfloat16); got {dtype!r}.")
        return dtype
    floating = {tensor.dtype for tensor in tensors if tensor.is_floating_point()}
    return floating.pop() if len(floating) == 1 else torch.float32


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from one `.safetensors` file or a `.bin`/`.pt` read through `torch_load_weights_only`."""
    if path.suffix == ".safetensors":
        return load_safetensors_file(path, device="cpu")
    loaded = torch_load_weights_only(
        path,
        path.name,
        "only state dicts of tensors are converted; re-save the weights with torch.save(model.state_dict()) or as "
        "safetensors.",
    )
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ValueError(
            f"{path.name} must hold a flat state dict (parameter name -> tensor), as `save_pretrained` writes; got "
            f"{type(loaded).__name__}{' with keys ' + str(list(loaded)[:5]) if isinstance(loaded, Mapping) else ''}."
        )
    return dict(loaded)


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


def instantiate_converted(
    model_class: type[PreTrainedModel],
    config: Any,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    *,
    keep_fp32: tuple[str, ...] = (),
    allowed_missing: Collection[str] | Callable[[PreTrainedModel], Collection[str]] = (),
) -> PreTrainedModel:
    """Build `model_class(config)` on a converted state dict and check that it loaded exactly.

    The floating tensors of `state_dict` are cast to `dtype` in place (those whose key starts with a `keep_fp32`
    prefix stay float32 when `dtype` is float16); `state_dict=` makes transformers use them as the parameters, so
    the weights are never held twice. Parameters the state dict lacks are initialised under a fixed seed, so a
    conversion is repeatable; they must be in `allowed_missing` (names, or a function of the loaded model that
    returns them), or `check_loading_info` raises and nothing is written.
    """
    for key, tensor in state_dict.items():
        if tensor.is_floating_point():
            wanted = torch.float32 if dtype == torch.float16 and key.startswith(keep_fp32) else dtype
            if tensor.dtype != wanted:
                state_dict[key] = tensor.to(wanted)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, loading_info = model_class.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
        )
    check_loading_info(loading_info, allowed_missing(model) if callable(allowed_missing) else allowed_missing)
    return model


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
