"""Model cards rendered from the templates in `hub_cards/` (shipped in the wheel as `hf_regionmm.hub_cards`).

A card is a `huggingface_hub.ModelCard`: YAML front matter (license, `library_name`, pipeline tag, tags, base model,
datasets and a `model-index` filled from evaluation results) followed by the system's Markdown body with its usage
snippet, training stages, evaluation table, limitations and citation.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["available_card_templates", "card_template_path", "render_model_card", "write_model_card"]


def available_card_templates() -> list[str]:
    """System names that have a template in `hub_cards/`."""
    root = importlib.resources.files("hf_regionmm.hub_cards")
    return sorted(entry.name[: -len(".md")] for entry in root.iterdir() if entry.name.endswith(".md"))


def card_template_path(system: str) -> Path:
    """Path of `hub_cards/<system>.md`; a clear error lists the available templates otherwise."""
    path = Path(str(importlib.resources.files("hf_regionmm.hub_cards").joinpath(f"{system}.md")))
    if not path.is_file():
        raise ValueError(f"No model-card template for {system!r}; available: {available_card_templates()}.")
    return path


def render_model_card(
    system: str,
    *,
    model_id: str,
    eval_results: Mapping[str, float] | None = None,
    eval_dataset: str = "hf_regionmm synthetic (held-out split)",
    eval_task: str = "image-text-to-text",
    base_model: str | list[str] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    pipeline_tag: str = "image-text-to-text",
    tags: list[str] | None = None,
    **template_values: Any,
) -> ModelCard:
    """Render `hub_cards/<system>.md` into a `ModelCard`.

    Args:
        system: the registered system name (`"groma"`).
        model_id: the repository id the card describes (`"org/groma-7b"`); used in the usage snippet.
        eval_results: metric name -> value, written to `model-index` and to the card's evaluation table.
        eval_dataset: the data set the metrics were measured on.
        base_model, datasets, license, pipeline_tag, tags: card metadata.
        template_values: extra Jinja variables the template uses (e.g. `training_stages`).
    """
    if not isinstance(model_id, str) or not model_id:
        raise ValueError("`model_id` must be a non-empty repository id such as 'org/groma-tiny'.")
    results = dict(eval_results or {})
    for name, value in results.items():
        if not isinstance(value, int | float):
            raise TypeError(f"`eval_results[{name!r}]` must be a number, got {type(value).__name__}.")
    card_data = ModelCardData(
        license=license,
        library_name="hf_regionmm",
        pipeline_tag=pipeline_tag,
        tags=sorted({"hf_regionmm", "transformers", "region-level", system, *(tags or [])}),
        base_model=base_model,
        datasets=datasets,
        model_name=model_id,
        eval_results=[
            EvalResult(
                task_type=eval_task,
                dataset_type="hf_regionmm/synthetic" if "synthetic" in eval_dataset else eval_dataset,
                dataset_name=eval_dataset,
                metric_type=name,
                metric_value=float(value),
            )
            for name, value in results.items()
        ]
        or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(card_template_path(system)),
        model_id=model_id,
        eval_results=results,
        eval_dataset=eval_dataset,
        **template_values,
    )


def write_model_card(
    directory: str | Path, system: str, *, eval_json: str | Path | None = None, **kwargs: Any
) -> Path:
    """Render the card for the checkpoint in `directory` (optionally with results from `eval_json`) as README.md."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"`directory` {directory} holds no config.json; pass a saved checkpoint folder.")
    if eval_json is not None:
        loaded = json.loads(Path(eval_json).read_text())
        metrics = loaded.get("metrics", loaded) if isinstance(loaded, dict) else None
        if not isinstance(metrics, dict):
            raise ValueError(f"`eval_json` {eval_json} must hold a JSON object of metric name -> number.")
        kwargs["eval_results"] = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    kwargs.setdefault("model_id", directory.name)
    card = render_model_card(system, **kwargs)
    path = directory / "README.md"
    card.save(path)
    return path
