"""What every system's `hf-regionmm eval` hook shares: argument checks, loading a checkpoint, writing predictions.

The per-system modules (`groma_eval`, `ullava_eval`, `tap_eval`, `regionblip_eval`) build their held-out data and
score it; loading the saved folder through the Auto classes and writing `<system>_predictions.json` is the same for
all of them and lives here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoProcessor

__all__ = ["check_positive_int", "load_checkpoint", "write_predictions"]


def check_positive_int(value: Any, name: str) -> int:
    """`value` if it is an int >= 1 (bools refused), else a `ValueError` naming the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    return value


def load_checkpoint(checkpoint: str | Path, auto_class: Any, name: str = "checkpoint") -> tuple[Any, Any]:
    """Model (through `auto_class`, e.g. `AutoModelForImageTextToText`) and processor of a `save_pretrained` folder;
    `name` is the argument named in the error when the folder holds no config.json."""
    import hf_regionmm  # noqa: F401  (registers every system with the Auto classes)

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(
            f"`{name}` {checkpoint} holds no config.json; pass a folder written by save_pretrained (model and "
            "processor)."
        )
    return auto_class.from_pretrained(checkpoint), AutoProcessor.from_pretrained(checkpoint)


def write_predictions(
    output_dir: str | Path, system: str, records: Any, metrics: dict[str, float] | None = None
) -> None:
    """Write `<output_dir>/<system>_predictions.json` (and `metrics.json` when `metrics` is given)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{system}_predictions.json").write_text(json.dumps(records, indent=1))
    if metrics is not None:
        (output_dir / "metrics.json").write_text(json.dumps({"metrics": metrics}, indent=2))
