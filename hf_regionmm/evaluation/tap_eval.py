"""TAP-v2 and TAP-v2-Chat evaluation on scenes in the synthetic schema: masks, concepts, captions, chat.

TAP-v2 (paper Sec. 4.2) is measured the way the paper prompts it, one prompt per ground-truth object:

| task | prompt | prediction | metric |
|---|---|---|---|
| promptable segmentation (Table 3) | the ground-truth box; separately, one click near the mask's centroid | the routed mask (box -> output 0, click -> best of 1-3 by predicted IoU), `post_process_masks` to the original image | mIoU against the ground-truth mask (`mask_iou` gIoU), per prompt kind and pooled |
| concept prediction (Table 1, "prompt with GT boxes") | the ground-truth box | top-1 of `concept_logits` over the model's concept bank | accuracy: the top-1 concept names the object's category (`"red circle"` or `"circle"` for a circle); exact accuracy: it is the object's most likely concept (`argmax concept_targets`, `"red circle"`) |
| region captioning (Table 2, "GT boxes prompt the image decoder") | the ground-truth box | greedy `generate_captions` of the box's semantic token | CIDEr-D (`cider_d`, 0-10 scale); whether the caption names the object's shape / colour (`caption_shape_acc` / `caption_color_acc`, which a one-caption prior cannot game) |

Masks are compared in the ORIGINAL image's pixel grid: the model's `mask_size` logits are upsampled to the padded
frame, cropped to the resized image and resized to the original size (`TapProcessor.post_process_masks`), then
thresholded at logit 0.

TAP-v2-Chat (Sec. 3.2-3.3) is an image-level chat model (it takes no region prompt): `evaluate_tap_chat` measures
image captioning (`caption_prompt()`, the caption pre-training format; CIDEr-D against `image_caption`) and
instruction following on the scenes' VQA pairs (`chat_prompt(question)`; exact match after VQA answer
normalisation), both with greedy `generate`.

Scenes are dicts (or `datasets.Dataset` rows) in the schema of `hf_regionmm.data.synthetic.generate_scenes`: TAP
needs `image`, `boxes` (n, 4 absolute pixel xyxy), `masks` (COCO RLE counts, decoded with `decode_masks`),
`categories` and `region_captions` (`concept_targets` optional); TAP-Chat needs `image`, `image_caption` and `vqa`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoModelForMaskGeneration

from ..data.synthetic import CONCEPT_VOCABULARY, decode_masks, generate_scenes, split_words
from ..processing.processing_tap import caption_prompt, chat_prompt
from . import load_metric
from .checkpoint_eval import check_positive_int, load_checkpoint, write_predictions
from .functional import normalize_vqa_answer

__all__ = [
    "TAP_CHAT_EVAL_TASKS",
    "TAP_EVAL_SCENES",
    "TapRegionPrediction",
    "evaluate_tap",
    "evaluate_tap_chat",
    "evaluate_tap_chat_checkpoint",
    "evaluate_tap_checkpoint",
    "generate_tap_chat_answers",
    "interior_point",
    "predict_tap_regions",
    "tap_eval_scenes",
]

# The scene distribution the tiny TAP demo trains on; held-out evaluation draws the same kind of scene from "test".
TAP_EVAL_SCENES: dict[str, Any] = {"image_size_range": (64, 112), "min_objects": 2, "max_objects": 4}
TAP_CHAT_EVAL_TASKS = ("caption", "vqa")
# Image captions of 2-4 shapes plus a relation sentence run to ~40 words; VQA answers are one word.
_CHAT_MAX_NEW_TOKENS = {"caption": 48, "vqa": 4}


def tap_eval_scenes(num_samples: int = 64, seed: int = 0, split: str = "test", **overrides: Any) -> Any:
    """Held-out synthetic scenes with masks: `generate_scenes(num_samples, split="test", **TAP_EVAL_SCENES)`."""
    return generate_scenes(num_samples, seed=seed, split=split, **{**TAP_EVAL_SCENES, **overrides})


def interior_point(mask: np.ndarray, offset: int = 0) -> list[float]:
    """A click on `mask`: the pixel nearest the mask's centroid (`offset` walks to later pixels in distance order).

    Args:
        mask: `(H, W)` bool, at least one True pixel.
        offset: rank of the returned pixel in the distance order (clamped to the last pixel).

    Returns:
        `[x, y]` absolute pixel coordinates (column, row) of a mask pixel, floats.
    """
    rows, cols = np.nonzero(np.asarray(mask))
    if len(rows) == 0:
        raise ValueError("`mask` is empty; a click needs at least one mask pixel.")
    distance = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
    index = np.argsort(distance, kind="stable")[min(offset, len(rows) - 1)]
    return [float(cols[index]), float(rows[index])]


def _scene_list(scenes: Any, needed: Sequence[str], example: str) -> list[Mapping[str, Any]]:
    if isinstance(scenes, Mapping) or not hasattr(scenes, "__len__") or not hasattr(scenes, "__getitem__"):
        raise TypeError(
            f"`scenes` must be a list of scene dicts or a datasets.Dataset (e.g. `{example}`); got "
            f"{type(scenes).__name__}."
        )
    rows = [scenes[index] for index in range(len(scenes))]
    if not rows:
        raise ValueError(f"`scenes` is empty; pass at least one scene (e.g. `{example}`).")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"`scenes[{index}]` must be a dict in the synthetic scene schema; got {type(row).__name__}."
            )
        missing = [key for key in needed if key not in row or row[key] is None]
        if missing:
            raise ValueError(
                f"`scenes[{index}]` lacks {missing}; pass scenes in the schema of "
                "`hf_regionmm.data.synthetic.generate_scenes` (TAP needs `with_masks=True`)."
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# TAP-v2


@dataclass
class TapRegionPrediction:
    """What TAP predicts for one prompted region.

    Args:
        mask: `(H, W)` bool, the routed mask in the original image's pixel grid.
        mask_index: which of the 4 outputs was routed (0 for boxes, 1-3 for clicks).
        iou_score: the model's predicted IoU of the routed mask.
        concept: top-1 concept name (None when the model has no `concept_names`).
        concept_score: its softmax probability over the concept bank.
        caption: the greedy caption of the prompt's semantic token ("" when captions were not asked for).
    """

    mask: np.ndarray
    mask_index: int
    iou_score: float
    concept: str | None
    concept_score: float
    caption: str


@torch.no_grad()
def predict_tap_regions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    *,
    boxes: Sequence[Sequence[Sequence[float]]] | None = None,
    points: Sequence[Sequence[Sequence[float]]] | None = None,
    with_captions: bool = True,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
) -> list[list[TapRegionPrediction]]:
    """Masks, top-1 concepts and captions for one set of prompts per image.

    Args:
        model: a `TapModel` (switched to eval mode for the call, then restored).
        processor: the matching `TapProcessor`.
        images: PIL images.
        boxes: per image, box prompts `[x1, y1, x2, y2]` in absolute pixels of the original image.
        points: per image, single-click prompts `[x, y]` in absolute pixels of the original image (positive).
            Exactly one of `boxes` and `points` is given.
        with_captions: also decode a greedy caption per prompt (`TapModel.generate_captions`).
        max_new_tokens: caption budget after BOS (default `text_max_length - 1`).
        batch_size: images per forward pass.

    Returns:
        Per image, one `TapRegionPrediction` per prompt, in prompt order; masks are `(H, W)` bool of that image.
    """
    if (boxes is None) == (points is None):
        raise ValueError("Pass exactly one of `boxes` and `points` (one list of prompts per image).")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError("`images` must be a list of PIL images.")
    prompts = list(boxes if boxes is not None else points)
    if len(prompts) != len(images):
        name = "boxes" if boxes is not None else "points"
        raise ValueError(f"`{name}` has {len(prompts)} entries for {len(images)} `images`; give one list per image.")
    check_positive_int(batch_size, "batch_size")
    names = model.concept_names
    was_training = model.training
    model.eval()
    results: list[list[TapRegionPrediction]] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk_images = [image.convert("RGB") for image in images[start : start + batch_size]]
            chunk_prompts = [list(image_prompts) for image_prompts in prompts[start : start + batch_size]]
            counts = [len(image_prompts) for image_prompts in chunk_prompts]
            if boxes is not None:
                prompt_kwargs = {"boxes": chunk_prompts}
            else:
                prompt_kwargs = {"points": [[[point] for point in image_points] for image_points in chunk_prompts]}
            inputs = processor(images=chunk_images, return_tensors="pt", **prompt_kwargs).to(model.device)
            outputs = model(
                pixel_values=inputs["pixel_values"],
                input_points=inputs["input_points"],
                input_labels=inputs["input_labels"],
            )
            masks = processor.post_process_masks(
                outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
            )
            probabilities = outputs.concept_logits.float().softmax(-1).cpu()
            captions = None
            if with_captions:
                caption_ids = model.generate_captions(outputs.selected_semantic_tokens, max_new_tokens=max_new_tokens)
                captions = processor.post_process_captions(caption_ids.cpu())
            for row, count in enumerate(counts):
                image_results = []
                for prompt in range(count):
                    routed = int(outputs.mask_index[row, prompt])
                    score, concept_index = probabilities[row, prompt].max(-1)
                    image_results.append(
                        TapRegionPrediction(
                            mask=masks[row][prompt, routed].numpy().astype(bool),
                            mask_index=routed,
                            iou_score=float(outputs.iou_scores[row, prompt, routed]),
                            concept=None if names is None else names[int(concept_index)],
                            concept_score=float(score),
                            caption="" if captions is None else captions[row][prompt],
                        )
                    )
                results.append(image_results)
    finally:
        model.train(was_training)
    return results


def _names_category(concept: str | None, category: str) -> bool:
    """True if `concept` is `category` or a qualified form of it (`"red circle"` names `"circle"`)."""
    return concept is not None and (concept == category or concept.endswith(" " + category))


def evaluate_tap(
    model: Any,
    processor: Any,
    scenes: Any,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    predictions: list[dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Evaluate a TAP model on scenes with ground-truth masks (see the module docstring for the protocol).

    Args:
        model: `TapModel` whose `concept_names` name its concept bank (the synthetic `CONCEPT_VOCABULARY` for the
            library's tiny models).
        processor: its `TapProcessor`.
        scenes: a `datasets.Dataset` or a list of scene dicts (synthetic schema with masks, boxes in absolute pixel
            xyxy of the original image).
        max_new_tokens: caption budget after BOS (default `text_max_length - 1`).
        batch_size: images per forward pass.
        predictions: if a list is given, it receives one JSON-serialisable dict per object (scene, object, box,
            click, per-prompt IoU, concept, caption, references), e.g. to save or draw them.
        progress: optional callback for one-line progress messages.

    Returns:
        Floats: `box_miou`, `point_miou` (mIoU of box- / click-prompted routed masks), `miou` (both pooled),
        `concept_acc` (top-1 concept names the category), `concept_exact_acc` (top-1 is the object's most likely
        concept; only when scenes carry `concept_targets` over the model's concept bank), `cider` (region-caption
        CIDEr-D, 0-10 scale), `caption_shape_acc` (the caption contains the object's category word) and
        `caption_color_acc` (it contains the object's colour word; only when scenes carry `colors`). The last two
        tell region content from a prior: one caption for every object scores the attribute's base rate.
    """
    if model.concept_names is None:
        raise ValueError(
            "`model` has no `concept_names`; set them with `model.set_concept_bank(embeddings, names)` so concept "
            "predictions can be compared with categories."
        )
    if max_new_tokens is not None:
        check_positive_int(max_new_tokens, "max_new_tokens")
    rows = _scene_list(scenes, ("image", "boxes", "masks", "categories", "region_captions"), "tap_eval_scenes(64)")
    report = progress or (lambda message: None)

    images, scene_boxes, scene_points, truths, objects = [], [], [], [], []
    for index, row in enumerate(rows):
        masks = decode_masks(row)
        height, width = row["image"].height, row["image"].width
        if masks.shape[1:] != (height, width):
            raise ValueError(
                f"`scenes[{index}]` has masks of size {masks.shape[1:]} for a {height}x{width} image; masks must "
                "be in the image's pixel grid."
            )
        kept = [k for k in range(len(masks)) if masks[k].any()]
        if not kept:
            continue
        images.append(row["image"])
        scene_boxes.append([list(map(float, row["boxes"][k])) for k in kept])
        scene_points.append([interior_point(masks[k]) for k in kept])
        truths.append(masks[kept])
        objects.append((index, kept))
    if not images:
        raise ValueError("`scenes` hold no object with a non-empty mask; nothing to evaluate.")

    box_results = predict_tap_regions(
        model, processor, images, boxes=scene_boxes, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    point_results = predict_tap_regions(
        model, processor, images, points=scene_points, with_captions=False, batch_size=batch_size
    )

    mask_metric = load_metric("mask_iou")
    box_scores, point_scores = [], []
    concept_hits, exact_hits, exact_total = [], [], 0
    caption_shape_hits, caption_color_hits = [], []
    captions, references, records = [], [], []
    for image_index, (scene_index, kept) in enumerate(objects):
        row = rows[scene_index]
        for slot, object_index in enumerate(kept):
            truth = truths[image_index][slot]
            by_box, by_point = box_results[image_index][slot], point_results[image_index][slot]
            box_iou = _iou(by_box.mask, truth)
            point_iou = _iou(by_point.mask, truth)
            box_scores.append(box_iou)
            point_scores.append(point_iou)
            category = row["categories"][object_index]
            concept_hits.append(_names_category(by_box.concept, category))
            exact = None
            # Exact accuracy needs targets over the model's own bank (the synthetic scenes' CONCEPT_VOCABULARY).
            targets = row.get("concept_targets")
            if targets is not None and len(targets[object_index]) == len(model.concept_names):
                target = model.concept_names[int(np.argmax(targets[object_index]))]
                exact = by_box.concept == target
                exact_hits.append(exact)
                exact_total += 1
            captions.append(by_box.caption)
            # Whether the caption names the object's own attributes: a learned prior (one caption for every object)
            # scores the attribute's base rate here, however well its template matches the references' n-grams.
            caption_words = set(split_words(by_box.caption.lower()))
            caption_shape_hits.append(category.lower() in caption_words)
            if row.get("colors") is not None:
                caption_color_hits.append(row["colors"][object_index].lower() in caption_words)
            references.append([row["region_captions"][object_index]])
            records.append(
                {
                    "scene": scene_index,
                    "object": object_index,
                    "category": category,
                    "box": scene_boxes[image_index][slot],
                    "click": scene_points[image_index][slot],
                    "box_iou": box_iou,
                    "point_iou": point_iou,
                    "point_mask_index": by_point.mask_index,
                    "concept": by_box.concept,
                    "concept_score": by_box.concept_score,
                    "concept_correct": concept_hits[-1],
                    "concept_exact": exact,
                    "caption": by_box.caption,
                    "reference_caption": row["region_captions"][object_index],
                }
            )
    truth_masks = [truth for image_truths in truths for truth in image_truths]
    box_miou = mask_metric.compute(
        predictions=[result.mask for image_results in box_results for result in image_results],
        references=truth_masks,
    )["giou"]
    point_miou = mask_metric.compute(
        predictions=[result.mask for image_results in point_results for result in image_results],
        references=truth_masks,
    )["giou"]
    cider = load_metric("cider_d").compute(predictions=captions, references=references)["cider_d"]
    metrics = {
        "miou": (float(box_miou) + float(point_miou)) / 2,
        "box_miou": float(box_miou),
        "point_miou": float(point_miou),
        "concept_acc": float(np.mean(concept_hits)),
        "cider": float(cider),
        "caption_shape_acc": float(np.mean(caption_shape_hits)),
    }
    if caption_color_hits:
        metrics["caption_color_acc"] = float(np.mean(caption_color_hits))
    if exact_total:
        metrics["concept_exact_acc"] = float(np.mean(exact_hits))
    if predictions is not None:
        predictions.extend(records)
    report(
        f"TAP: mIoU box {metrics['box_miou']:.3f} / click {metrics['point_miou']:.3f}, concept acc "
        f"{metrics['concept_acc']:.3f}, caption CIDEr-D {metrics['cider']:.3f} on {len(records)} objects"
    )
    return metrics


def _iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Per-object IoU for the prediction log (the reported mIoU comes from the `mask_iou` metric)."""
    union = np.count_nonzero(prediction | truth)
    return float(np.count_nonzero(prediction & truth) / union) if union else 1.0


def evaluate_tap_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    num_samples: int = 64,
    *,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """`hf-regionmm eval tap CHECKPOINT`: load a checkpoint through `AutoModelForMaskGeneration` / `AutoProcessor`
    and evaluate it on `num_samples` held-out synthetic scenes (`tap_eval_scenes`, split "test").

    A checkpoint without `concept_names` is given the synthetic `CONCEPT_VOCABULARY` when its bank has that size.
    Writes `metrics.json` and `tap_predictions.json` (every object with its prediction) to `output_dir` and returns
    the metrics of `evaluate_tap`.
    """
    check_positive_int(num_samples, "num_samples")
    model, processor = load_checkpoint(checkpoint, AutoModelForMaskGeneration)
    if model.concept_names is None:
        if model.config.num_concepts != len(CONCEPT_VOCABULARY):
            raise ValueError(
                f"`checkpoint` has {model.config.num_concepts} unnamed concepts; the synthetic evaluation needs "
                f"a bank over CONCEPT_VOCABULARY ({len(CONCEPT_VOCABULARY)} names) or named concepts."
            )
        model.config.concept_names = list(CONCEPT_VOCABULARY)
    records: list[dict[str, Any]] = []
    metrics = evaluate_tap(
        model,
        processor,
        tap_eval_scenes(num_samples, seed=seed),
        batch_size=batch_size,
        predictions=records,
        progress=progress,
    )
    write_predictions(output_dir, "tap", records, metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# TAP-v2-Chat


@torch.no_grad()
def generate_tap_chat_answers(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[str]:
    """Greedy TAP-Chat answers, one prompt per image.

    Args:
        model: `TapChatForConditionalGeneration` (eval mode during the call).
        processor: its `TapChatProcessor`.
        images: PIL images.
        prompts: full prompts holding `<image>` once (`caption_prompt()`, `chat_prompt(question)`).
        max_new_tokens: generation budget per answer.
        batch_size: prompts per `generate` call (left-padded).

    Returns:
        The decoded answers (prompt and EOS removed), in order.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("`prompts` must be a list of strings, one per image.")
    if len(prompts) != len(images):
        raise ValueError(f"`prompts` has {len(prompts)} entries for {len(images)} `images`; give one per image.")
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(batch_size, "batch_size")
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(images), batch_size):
            inputs = processor(
                images=[image.convert("RGB") for image in images[start : start + batch_size]],
                text=list(prompts[start : start + batch_size]),
                padding_side="left",
                return_tensors="pt",
            ).to(model.device)
            generated = model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            answers.extend(processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :]))
    finally:
        model.train(was_training)
    return answers


def evaluate_tap_chat(
    model: Any,
    processor: Any,
    scenes: Any,
    *,
    tasks: Sequence[str] = TAP_CHAT_EVAL_TASKS,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    predictions: dict[str, list[dict[str, Any]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Evaluate TAP-v2-Chat with greedy generation: image captions and VQA.

    Args:
        model: `TapChatForConditionalGeneration`.
        processor: its `TapChatProcessor`.
        scenes: a `datasets.Dataset` or list of scene dicts with `image`, `image_caption` and `vqa`.
        tasks: any of `"caption"` (`caption_prompt()` -> CIDEr-D against `image_caption`) and `"vqa"` (every
            question of every scene, `chat_prompt(question)` -> exact match after VQA answer normalisation).
        max_new_tokens: budget for every task; None uses 48 for captions and 4 for VQA answers.
        batch_size: prompts per `generate` call.
        predictions: if a dict is given, it receives per task the samples with their answers.
        progress: optional callback for one-line progress messages.

    Returns:
        `cider` (image-caption CIDEr-D, 0-10 scale) and `vqa_acc` (in [0, 1]) for the requested tasks.
    """
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [task for task in tasks if task not in TAP_CHAT_EVAL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"`tasks` must be a non-empty subset of {TAP_CHAT_EVAL_TASKS}; got {list(tasks)!r}.")
    if max_new_tokens is not None:
        check_positive_int(max_new_tokens, "max_new_tokens")
    needed = ["image"] + (["image_caption"] if "caption" in tasks else []) + (["vqa"] if "vqa" in tasks else [])
    rows = _scene_list(scenes, needed, "tap_eval_scenes(32)")
    report = progress or (lambda message: None)
    metrics: dict[str, float] = {}

    if "caption" in tasks:
        answers = generate_tap_chat_answers(
            model,
            processor,
            [row["image"] for row in rows],
            [caption_prompt()] * len(rows),
            max_new_tokens=max_new_tokens or _CHAT_MAX_NEW_TOKENS["caption"],
            batch_size=batch_size,
        )
        references = [[row["image_caption"]] for row in rows]
        metrics["cider"] = float(load_metric("cider_d").compute(predictions=answers, references=references)["cider_d"])
        if predictions is not None:
            predictions["caption"] = [
                {"scene": index, "reference": reference[0], "prediction": answer}
                for index, (reference, answer) in enumerate(zip(references, answers, strict=True))
            ]
        report(f"TAP-Chat: image-caption CIDEr-D {metrics['cider']:.3f} on {len(rows)} images")

    if "vqa" in tasks:
        samples = [(index, pair["question"], pair["answer"]) for index, row in enumerate(rows) for pair in row["vqa"]]
        if not samples:
            raise ValueError("`scenes` hold no VQA pair; drop 'vqa' from `tasks` or pass scenes with `vqa`.")
        answers = generate_tap_chat_answers(
            model,
            processor,
            [rows[index]["image"] for index, _, _ in samples],
            [chat_prompt(question) for _, question, _ in samples],
            max_new_tokens=max_new_tokens or _CHAT_MAX_NEW_TOKENS["vqa"],
            batch_size=batch_size,
        )
        # One reference answer per question: VQA accuracy's leave-one-out over 10 humans does not apply.
        hits = [
            normalize_vqa_answer(answer) == normalize_vqa_answer(reference)
            for (_, _, reference), answer in zip(samples, answers, strict=True)
        ]
        metrics["vqa_acc"] = float(np.mean(hits))
        if predictions is not None:
            predictions["vqa"] = [
                {"scene": index, "question": question, "reference": reference, "prediction": answer}
                for (index, question, reference), answer in zip(samples, answers, strict=True)
            ]
        report(f"TAP-Chat: VQA exact match {metrics['vqa_acc']:.3f} on {len(samples)} questions")
    return metrics


def evaluate_tap_chat_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    num_samples: int = 64,
    *,
    seed: int = 0,
    tasks: Sequence[str] = TAP_CHAT_EVAL_TASKS,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """`hf-regionmm eval tap_chat CHECKPOINT`: load through `AutoModelForImageTextToText` / `AutoProcessor` and
    evaluate on `num_samples` held-out synthetic scenes (split "test"); writes `metrics.json` and
    `tap_chat_predictions.json` to `output_dir` and returns the metrics of `evaluate_tap_chat`."""
    check_positive_int(num_samples, "num_samples")
    model, processor = load_checkpoint(checkpoint, AutoModelForImageTextToText)
    collected: dict[str, list[dict[str, Any]]] = {}
    metrics = evaluate_tap_chat(
        model,
        processor,
        tap_eval_scenes(num_samples, seed=seed, with_masks=False),
        tasks=tasks,
        batch_size=batch_size,
        predictions=collected,
        progress=progress,
    )
    write_predictions(output_dir, "tap_chat", collected, metrics)
    return metrics
