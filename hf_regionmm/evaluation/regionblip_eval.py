"""RegionBLIP evaluation: captioning CIDEr-D per modality (paper section 4.1, Table 1).

The paper reports captioning on four modalities -- COCO images, RefCOCO image regions, Objaverse point clouds and
ScanRefer point-cloud regions -- with `pycocoevalcap`'s CIDEr. Here every modality's captions are generated from the
model and scored with the packaged offline `cider_d` metric (pycocoevalcap scale, 0-10) against the references of the
same modality; the metrics are `cider_image`, `cider_image_region`, `cider_point_cloud` and
`cider_point_cloud_region`.

Decoding follows the released evaluation yamls (reference/original_repos.md 2c): beam search with 5 beams, at most 30
and at least 8 new tokens, no sampling, repetition penalty 1. `decoding="greedy"` is a cheaper option (one beam,
at least one token) for short synthetic captions and the demo. The OPT variant prompts with nothing; the Flan-T5
variant with the released prefixes (`T5_PROMPTS`).

Examples are dicts in the schema of `hf_regionmm.trainers.regionblip.RegionBlipTrainingDataset`: `modality`,
`caption` (or `references`, a list of captions), plus `image` (PIL) and, for image regions, `box` (absolute pixel xyxy
of that image), or `points` (`(N, 3)`) and, for point-cloud regions, `box_3d` (centre + size, or 8 corners).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForImageTextToText

from ..data.synthetic import generate_3d_scenes, generate_point_clouds, generate_scenes
from ..modeling.configuration_regionblip import MODALITIES
from ..processing.processing_regionblip import T5_PROMPTS
from . import load_metric
from .checkpoint_eval import check_positive_int, load_checkpoint, write_predictions

__all__ = [
    "GREEDY_GENERATION",
    "RELEASED_GENERATION",
    "evaluate_regionblip",
    "evaluate_regionblip_checkpoint",
    "generate_regionblip_captions",
    "regionblip_eval_examples",
]

# Released eval yamls: `num_beams 5`, `max_len 30`, `min_len 8`, no nucleus sampling, `repetition_penalty 1.0`.
RELEASED_GENERATION: dict[str, Any] = {
    "num_beams": 5,
    "max_new_tokens": 30,
    "min_new_tokens": 8,
    "do_sample": False,
    "repetition_penalty": 1.0,
}
GREEDY_GENERATION: dict[str, Any] = {"num_beams": 1, "max_new_tokens": 16, "do_sample": False}
_DECODINGS = {"beam": RELEASED_GENERATION, "greedy": GREEDY_GENERATION}
_REQUIRED_KEYS = {
    "image": ("image",),
    "image_region": ("image", "box"),
    "point_cloud": ("points",),
    "point_cloud_region": ("points", "box_3d"),
}


def _check_modalities(modalities: Any) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise ValueError(f"`modalities` must be a non-empty subset of {MODALITIES}; got {list(modalities)!r}.")
    return modalities


def _references(example: Mapping[str, Any], index: int) -> list[str]:
    references = example.get("references", example.get("caption"))
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, (list, tuple)) or not references or not all(isinstance(r, str) for r in references):
        raise ValueError(
            f"`examples[{index}]` needs a `caption` string or a non-empty `references` list of strings to score "
            "against."
        )
    return list(references)


def _check_examples(examples: Any) -> list[Mapping[str, Any]]:
    if isinstance(examples, Mapping) or not hasattr(examples, "__len__") or not hasattr(examples, "__getitem__"):
        raise TypeError(
            "`examples` must be a list of example dicts (e.g. `regionblip_eval_examples(16)`); got "
            f"{type(examples).__name__}."
        )
    rows = [examples[index] for index in range(len(examples))]
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping) or row.get("modality") not in MODALITIES:
            raise ValueError(
                f"`examples[{index}]` must be a dict with `modality` in {MODALITIES}; got "
                f"{row.get('modality') if isinstance(row, Mapping) else type(row).__name__!r}."
            )
        missing = [key for key in _REQUIRED_KEYS[row["modality"]] if key not in row]
        if missing:
            raise ValueError(f"`examples[{index}]` ({row['modality']}) lacks {missing}.")
    return rows


def regionblip_eval_examples(
    num_samples: int = 64,
    seed: int = 0,
    split: str = "test",
    modalities: Sequence[str] = ("image_region", "point_cloud", "point_cloud_region"),
    num_points: int = 64,
) -> list[dict[str, Any]]:
    """Held-out synthetic captioning examples, `num_samples` per modality (split "test" never shares a sample with
    "train"): scene captions (image), one region caption per scene (image region, a random object's box), primitive
    captions (point cloud, `num_points` points) and object captions in 3D scenes (point-cloud region, at least 256
    points). The scenes are those the tiny RegionBLIP trains on (64-112 pixel images)."""
    from ..trainers.regionblip import RegionBlipTrainingDataset

    check_positive_int(num_samples, "num_samples")
    modalities = _check_modalities(modalities)
    image_modalities = {"image", "image_region"} & set(modalities)
    scenes = (
        generate_scenes(num_samples, seed=seed, split=split, image_size_range=(64, 112), with_masks=False)
        if image_modalities
        else []
    )
    clouds = (
        generate_point_clouds(num_samples, seed=seed, split=split, num_points=num_points)
        if "point_cloud" in modalities
        else []
    )
    scenes_3d = (
        generate_3d_scenes(num_samples, seed=seed, split=split, num_points=max(256, num_points))
        if "point_cloud_region" in modalities
        else []
    )
    dataset = RegionBlipTrainingDataset.from_synthetic(
        scenes, clouds, scenes_3d, seed=seed, include_image_text="image" in modalities
    )
    return [example for example in dataset.examples if example["modality"] in modalities]


def _model_inputs(processor: Any, model: Any, modality: str, rows: Sequence[Mapping[str, Any]]) -> Any:
    prompt = T5_PROMPTS[modality] if model.config.is_encoder_decoder_language_model else ""
    text = [prompt] * len(rows)
    if modality in ("image", "image_region"):
        return processor(
            images=[row["image"].convert("RGB") for row in rows],
            boxes=[[list(row["box"])] for row in rows] if modality == "image_region" else None,
            text=text,
            padding_side="left",
            return_tensors="pt",
        )
    return processor(
        point_clouds=[np.asarray(row["points"]) for row in rows],
        boxes_3d=[list(np.asarray(row["box_3d"]).reshape(-1)) for row in rows]
        if modality == "point_cloud_region"
        else None,
        text=text,
        padding_side="left",
        return_tensors="pt",
    )


@torch.no_grad()
def generate_regionblip_captions(
    model: Any,
    processor: Any,
    examples: Sequence[Mapping[str, Any]],
    *,
    decoding: str = "beam",
    generation_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Captions for `examples` (any mix of modalities; batches hold one modality each), in order.

    Args:
        model: a `RegionBlipForConditionalGeneration` (eval mode during the call, then restored).
        processor: its `RegionBlipProcessor`.
        examples: dicts as in the module docstring.
        decoding: `"beam"` (released: 5 beams, 8-30 new tokens) or `"greedy"` (1 beam, up to 16 new tokens).
        generation_kwargs: overrides of the chosen decoding settings (`max_new_tokens`, `num_beams`, ...).
        batch_size: samples per `generate` call.
    """
    if decoding not in _DECODINGS:
        raise ValueError(f"`decoding` must be one of {sorted(_DECODINGS)}; got {decoding!r}.")
    check_positive_int(batch_size, "batch_size")
    rows = _check_examples(examples)
    settings = {**_DECODINGS[decoding], **dict(generation_kwargs or {})}
    tokenizer = processor.tokenizer
    settings.setdefault("eos_token_id", tokenizer.eos_token_id)
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    captions: list[str | None] = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for modality in MODALITIES:
            indices = [index for index, row in enumerate(rows) if row["modality"] == modality]
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                inputs = _model_inputs(processor, model, modality, [rows[index] for index in chunk]).to(model.device)
                generated = model.generate(**inputs, **settings)
                # Decoder-only LLMs return the prompt too; T5 returns the decoder's ids only.
                prompt_length = (
                    None if model.config.is_encoder_decoder_language_model else inputs["input_ids"].shape[1]
                )
                for index, caption in zip(
                    chunk, processor.post_process_captions(generated, prompt_length), strict=True
                ):
                    captions[index] = caption
    finally:
        model.train(was_training)
    return [caption or "" for caption in captions]


def evaluate_regionblip(
    model: Any,
    processor: Any,
    examples: Any,
    modalities: Sequence[str] | None = None,
    *,
    decoding: str = "beam",
    generation_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    predictions: list[dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Caption `examples` and score each modality with CIDEr-D against its references.

    Args:
        model, processor: a `RegionBlipForConditionalGeneration` and its `RegionBlipProcessor`.
        examples: a list of example dicts (module docstring), e.g. `regionblip_eval_examples(64)`.
        modalities: which modalities to evaluate (default: every modality present in `examples`); each needs at
            least two examples (CIDEr-D's IDF comes from the evaluated corpus).
        decoding, generation_kwargs, batch_size: see `generate_regionblip_captions`.
        predictions: if a list is given, it receives one JSON-serialisable dict per evaluated example (`modality`,
            `references`, `prediction`).
        progress: optional callback for one-line progress messages.

    Returns:
        `cider_<modality>` (pycocoevalcap scale, 0-10) for every evaluated modality. Floats.
    """
    rows = _check_examples(examples)
    present = [m for m in MODALITIES if any(row["modality"] == m for row in rows)]
    modalities = _check_modalities(present if modalities is None else modalities)
    missing = [m for m in modalities if m not in present]
    if missing:
        raise ValueError(f"`examples` hold no {missing} example; pass examples of every requested modality.")
    selected = [row for row in rows if row["modality"] in modalities]
    references = [_references(row, index) for index, row in enumerate(selected)]
    captions = generate_regionblip_captions(
        model, processor, selected, decoding=decoding, generation_kwargs=generation_kwargs, batch_size=batch_size
    )
    cider = load_metric("cider_d")
    report = progress or (lambda message: None)
    metrics: dict[str, float] = {}
    for modality in modalities:
        indices = [index for index, row in enumerate(selected) if row["modality"] == modality]
        if len(indices) < 2:
            raise ValueError(
                f"`examples` hold {len(indices)} {modality} example(s); CIDEr-D needs at least 2 per modality (its "
                "IDF comes from the evaluated references)."
            )
        result = cider.compute(
            predictions=[captions[index] for index in indices], references=[references[index] for index in indices]
        )
        metrics[f"cider_{modality}"] = float(result["cider_d"])
        report(f"regionblip {modality}: CIDEr-D {metrics[f'cider_{modality}']:.3f} on {len(indices)} samples")
    if predictions is not None:
        predictions.extend(
            {"modality": row["modality"], "references": refs, "prediction": caption}
            for row, refs, caption in zip(selected, references, captions, strict=True)
        )
    return metrics


def evaluate_regionblip_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    num_samples: int = 64,
    *,
    seed: int = 0,
    modalities: Sequence[str] = ("image_region", "point_cloud", "point_cloud_region"),
    decoding: str = "beam",
    generation_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """`hf-regionmm eval regionblip CHECKPOINT`: load a checkpoint through the Auto classes and caption
    `num_samples` held-out synthetic examples per modality (`regionblip_eval_examples`, split "test").

    Writes `regionblip_predictions.json` (every example with its references and prediction) to `output_dir` and
    returns the metrics of `evaluate_regionblip`.
    """
    check_positive_int(num_samples, "num_samples")
    model, processor = load_checkpoint(checkpoint, AutoModelForImageTextToText)
    examples = regionblip_eval_examples(
        max(2, num_samples), seed=seed, modalities=modalities, num_points=processor.num_points
    )
    collected: list[dict[str, Any]] = []
    metrics = evaluate_regionblip(
        model,
        processor,
        examples,
        modalities,
        decoding=decoding,
        generation_kwargs=generation_kwargs,
        batch_size=batch_size,
        predictions=collected,
        progress=progress,
    )
    write_predictions(output_dir, "regionblip", collected)
    return metrics
