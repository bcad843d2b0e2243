"""What every system's part of `hf-regionmm demo` writes the same way: the checkpoint with its card, the
before/after table of the card, and `metrics.json`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..hub.model_card import write_model_card

__all__ = ["before_after_table", "save_demo_checkpoint", "write_demo_metrics"]


def before_after_table(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """Markdown table `| metric | untrained | trained |` of the metrics present in both, in `after`'s order."""
    rows = "\n".join(f"| {name} | {before[name]:.4f} | {after[name]:.4f} |" for name in after if name in before)
    return f"| metric | untrained | trained |\n|---|---|---|\n{rows}\n"


def save_demo_checkpoint(model: Any, processor: Any, output_dir: Path, system: str, **card: Any) -> Path:
    """Save model + processor to `output_dir/checkpoint` with the `system` card rendered from `card`
    (`model_id`, `eval_results`, `eval_dataset`, `training_summary`, ...: `write_model_card`'s arguments)."""
    checkpoint = output_dir / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    write_model_card(checkpoint, system, **card)
    return checkpoint


def write_demo_metrics(
    output_dir: Path,
    before: Mapping[str, float],
    after: Mapping[str, float],
    train_seconds: float,
    recipe: Any,
    **extra: Any,
) -> dict[str, float]:
    """Write `output_dir/metrics.json` = {"metrics", *extra, "recipe"} and return the flat metrics:
    `<name>_before`, `<name>_after` and `train_seconds`. `recipe` is the demo's recipe dataclass."""
    metrics = {f"{name}_before": value for name, value in before.items()}
    metrics.update({f"{name}_after": value for name, value in after.items()})
    metrics["train_seconds"] = train_seconds
    recipe_json = json.loads(json.dumps(dataclasses.asdict(recipe), default=list))
    (output_dir / "metrics.json").write_text(
        json.dumps({"metrics": metrics, **extra, "recipe": recipe_json}, indent=2)
    )
    return metrics
