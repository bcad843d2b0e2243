"""Groma evaluation on scenes in the synthetic schema: REC, multi-object grounding and region captioning.

The three benchmarks of the Groma paper (Sec. 4.2), with the released prompt formats and the metrics of
`hf_regionmm.evaluation`:

| task | prompt | prediction | metric |
|---|---|---|---|
| REC (Table 2, RefCOCO/+/g) | `rec_prompt(expression)` | box of the first valid `<rK>` (`post_process_rec`) | `rec_accuracy`: acc@0.5 (IoU > 0.5), mIoU, no-box rate; the same acc@0.5 of the first slot and of the best slot |
| multi-object grounding (Table 3, LVIS-Ground) | `multi_grounding_prompt(plural)` for every category of a scene | every box of the answer, in order | `as_many_recall`: AR@[.5:.95], AR50, AR75, pooled per category |
| region captioning (Table 4, Visual Genome) | `region_caption_prompt()` with the ground-truth box as the user box | the decoded caption | `cider_d` |

Generation is greedy. Predicted boxes and references are compared in absolute pixel xyxy of the ORIGINAL image:
`<rK>` indexes the regions `model.get_regions(pixel_values)` returns (normalized xyxy of the resized input), which
the processor scales back with `image_sizes`.

Scenes are dicts (or `datasets.Dataset` rows) with at least `image` (PIL), `boxes` (n, 4) absolute pixel xyxy,
`categories` (n names), `referring_expressions` (`{"text", "object_index"}` dicts) and `region_captions` (n strings),
the schema of `hf_regionmm.data.synthetic.generate_scenes` and of the real-format loaders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from ..data.synthetic import SHAPE_PLURALS, SHAPES, generate_scenes
from ..modeling.box_ops import box_iou
from ..processing.processing_groma import multi_grounding_prompt, rec_prompt, region_caption_prompt
from ..trainers.groma import groma_tasks_of_scene
from . import load_metric
from .checkpoint_eval import check_positive_int, load_checkpoint, write_predictions

__all__ = [
    "GROMA_EVAL_SCENES",
    "GROMA_EVAL_TASKS",
    "GromaAnswer",
    "evaluate_groma",
    "evaluate_groma_checkpoint",
    "evaluable_tasks",
    "generate_groma_answers",
    "groma_eval_scenes",
    "rec_accuracy_by_kind",
]

GROMA_EVAL_TASKS = ("rec", "multi_grounding", "region_caption")

# The scene distribution the tiny Groma demo trains on; held-out evaluation draws the same kind of scene from the
# "test" split (which never shares a scene with "train").
GROMA_EVAL_SCENES: dict[str, Any] = {
    "image_size_range": (112, 192),
    "min_objects": 2,
    "max_objects": 4,
    "with_masks": False,
}

# Answer lengths in tokens: REC "<roi><rK></roi></s>"; grounding one `<rK>` per slot at most; captions are short
# phrases ("A medium purple star").
_DEFAULT_MAX_NEW_TOKENS = {"rec": 6, "region_caption": 16}
_REQUIRED_SCENE_KEYS = {
    "rec": ("image", "boxes", "referring_expressions"),
    "multi_grounding": ("image", "boxes", "categories"),
    "region_caption": ("image", "boxes", "region_captions"),
}


@dataclass
class GromaAnswer:
    """One greedy answer of Groma.

    Args:
        text: the decoded answer with Groma's tokens kept (`"<roi><r2></roi>"`), prompt and `</s>` removed.
        plain_text: the same answer without Groma's tokens (`post_process_image_text_to_text`), e.g. a caption.
        grounding: `post_process_grounding` of the answer: `[{"phrase", "boxes" (pixel xyxy of the original image),
            "region_indices"}]`, one entry per `<roi>...</roi>` span.
        rec_box: the box of the first valid `<rK>` (pixel xyxy of the original image), None if there is none.
        region_boxes: `(M, 4)` float, the model's region slots in pixel xyxy of the original image (filled slots
            only), for inspection and pictures.
    """

    text: str
    plain_text: str
    grounding: list[dict[str, Any]]
    rec_box: list[float] | None
    region_boxes: list[list[float]] = field(default_factory=list)


def groma_eval_scenes(num_samples: int = 64, seed: int = 0, split: str = "test", **overrides: Any) -> Any:
    """Held-out synthetic scenes for evaluation: `generate_scenes(num_samples, split="test", **GROMA_EVAL_SCENES)`."""
    return generate_scenes(num_samples, seed=seed, split=split, **{**GROMA_EVAL_SCENES, **overrides})


def _check_images(images: Any) -> list[Image.Image]:
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise TypeError("`images` must be a list of PIL images, one per query.")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"`images[{index}]` must be a PIL.Image.Image; got {type(image).__name__}.")
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def generate_groma_answers(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    queries: Sequence[str],
    *,
    boxes: Sequence[Sequence[Sequence[float]]] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[GromaAnswer]:
    """Greedy Groma answers to one query per image, with the answers' boxes in pixels of the original image.

    Args:
        model: a `GromaForConditionalGeneration` (switched to eval mode for the call, then restored).
        processor: the matching `GromaProcessor`.
        images: one PIL image per query.
        queries: bare user queries (`rec_prompt("the red circle")`, ...), wrapped into the released conversation by
            the processor.
        boxes: optional user boxes per image, absolute pixel xyxy of the original image (one per `<refer_box>` of
            the query; `[]` for none).
        max_new_tokens: generation budget per answer.
        batch_size: queries per `generate` call (prompts are left-padded).

    Returns:
        One `GromaAnswer` per query, in order.
    """
    images = _check_images(images)
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise TypeError("`queries` must be a list of strings, one per image.")
    if len(queries) != len(images):
        raise ValueError(f"`queries` has {len(queries)} entries for {len(images)} `images`; give one query per image.")
    if boxes is not None and len(boxes) != len(images):
        raise ValueError(f"`boxes` has {len(boxes)} entries for {len(images)} `images`; give one list per image.")
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(batch_size, "batch_size")

    was_training = model.training
    model.eval()
    answers: list[GromaAnswer] = []
    try:
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            batch_boxes = None if boxes is None else [list(image_boxes) for image_boxes in boxes[start:stop]]
            if batch_boxes is not None and not any(batch_boxes):
                batch_boxes = None
            inputs = processor(
                images=images[start:stop],
                text=list(queries[start:stop]),
                boxes=batch_boxes,
                padding_side="left",
                return_tensors="pt",
            ).to(model.device)
            # Without user boxes, `<rK>` indexes exactly these regions: generation selects them the same way.
            regions = model.get_regions(
                inputs["pixel_values"], inputs.get("refer_boxes"), inputs.get("refer_boxes_mask")
            )
            generated = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            prompt_length = inputs["input_ids"].shape[1]
            new_tokens = generated[:, prompt_length:]
            # `skip_prompt=0`: the ids hold the answer only, and the first `</s>` ends it (the rest is padding).
            texts = processor.post_process_image_text_to_text(new_tokens, skip_special_tokens=False, skip_prompt=0)
            plain_texts = processor.post_process_image_text_to_text(new_tokens, skip_prompt=0)
            groundings = processor.post_process_grounding(
                new_tokens, regions.region_boxes, regions.region_mask, inputs["image_sizes"], skip_prompt=0
            )
            rec_boxes = processor.post_process_rec(
                new_tokens, regions.region_boxes, regions.region_mask, inputs["image_sizes"], skip_prompt=0
            )
            rows = zip(texts, plain_texts, groundings, rec_boxes, strict=True)
            for row, (text, plain_text, grounding, rec_box) in enumerate(rows):
                height, width = (int(v) for v in inputs["image_sizes"][row].tolist())
                scale = torch.tensor([width, height, width, height], dtype=torch.float32)
                slots = regions.region_boxes[row][regions.region_mask[row]].float().cpu() * scale
                answers.append(
                    GromaAnswer(
                        text=text.strip(),
                        plain_text=plain_text,
                        grounding=grounding,
                        rec_box=rec_box,
                        region_boxes=slots.tolist(),
                    )
                )
    finally:
        model.train(was_training)
    return answers


def _scene_list(scenes: Any, tasks: Sequence[str]) -> list[Mapping[str, Any]]:
    if isinstance(scenes, Mapping) or not hasattr(scenes, "__len__") or not hasattr(scenes, "__getitem__"):
        raise TypeError(
            "`scenes` must be a list of scene dicts or a datasets.Dataset (e.g. `groma_eval_scenes(64)`); got "
            f"{type(scenes).__name__}."
        )
    rows = [scenes[index] for index in range(len(scenes))]
    if not rows:
        raise ValueError("`scenes` is empty; pass at least one scene (e.g. `groma_eval_scenes(64)`).")
    needed = sorted({key for task in tasks for key in _REQUIRED_SCENE_KEYS[task]})
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"`scenes[{index}]` must be a dict in the synthetic scene schema; got {type(row).__name__}."
            )
        missing = [key for key in needed if key not in row]
        if missing:
            raise ValueError(
                f"`scenes[{index}]` lacks {missing}, which the tasks {list(tasks)} need; pass scenes in the schema of "
                "`hf_regionmm.data.synthetic.generate_scenes`."
            )
    return rows


def rec_accuracy_by_kind(rec_predictions: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """REC acc@0.5 per expression kind, from `evaluate_groma(..., predictions=...)["rec"]`.

    The kinds are the data's (synthetic: `attribute`, `relation`, `ordinal`; RefCOCO: its data set name); samples
    without one count as `unknown`. The rule is `rec_accuracy`'s (IoU strictly above 0.5), kinds in order of
    appearance.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for sample in rec_predictions:
        groups.setdefault(sample.get("kind") or "unknown", []).append(sample)
    metric = load_metric("rec_accuracy")
    return {
        kind: float(
            metric.compute(
                predictions=[sample["prediction"] for sample in samples],
                references=[sample["reference"] for sample in samples],
            )["accuracy"]
        )
        for kind, samples in groups.items()
    }


def _reference_choices(
    answers: Sequence[GromaAnswer], references: Sequence[Sequence[float]]
) -> tuple[list[list[float] | None], list[list[float] | None]]:
    """Per REC sample, the box of the first region slot (`<r0>`: the proposer's top-scoring region in the default
    deterministic order) and of the slot overlapping the reference most (a perfect choice among the same regions);
    None where the model had no region. Both are scored like the answers, so `rec_acc@0.5` reads between them."""
    first, best = [], []
    for answer, reference in zip(answers, references, strict=True):
        if not answer.region_boxes:
            first.append(None)
            best.append(None)
            continue
        overlaps = box_iou(
            torch.tensor(answer.region_boxes, dtype=torch.float32),
            torch.tensor([reference], dtype=torch.float32),
            validate=False,
        )[:, 0]
        first.append(answer.region_boxes[0])
        best.append(answer.region_boxes[int(overlaps.argmax())])
    return first, best


def evaluable_tasks(scenes: Any) -> tuple[str, ...]:
    """The tasks of `GROMA_EVAL_TASKS` that at least one scene has annotations for (real-format data fills only some
    columns of the scene schema: RefCOCO expressions, COCO categories, Visual Genome region descriptions); the same
    rules as training (`groma_tasks_of_scene`)."""
    offered = {task for index in range(len(scenes)) for task in groma_tasks_of_scene(scenes[index])}
    return tuple(task for task in GROMA_EVAL_TASKS if task in offered)


def _plural(category: str) -> str:
    return SHAPE_PLURALS.get(category, category + "s")


def _category_id(category: str, known: dict[str, int]) -> int:
    # Synthetic shapes keep their fixed ids; other names (real-format loaders) get ids in order of appearance.
    if category in SHAPES:
        return SHAPES.index(category)
    return known.setdefault(category, len(SHAPES) + len(known))


def evaluate_groma(
    model: Any,
    processor: Any,
    scenes: Any,
    *,
    tasks: Sequence[str] = GROMA_EVAL_TASKS,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    predictions: dict[str, list[dict[str, Any]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Evaluate a Groma model on scenes with greedy generation (see the module docstring for the protocol).

    Args:
        model: `GromaForConditionalGeneration` (any device; eval mode during the call).
        processor: its `GromaProcessor`.
        scenes: a `datasets.Dataset` or a list of scene dicts (synthetic schema, boxes in absolute pixel xyxy).
        tasks: any of `"rec"` (every referring expression of every scene), `"multi_grounding"` (every category of
            every scene) and `"region_caption"` (every object of every scene, its ground-truth box given as the user
            box).
        max_new_tokens: generation budget for every task; None uses per-task defaults (REC 6, grounding
            `max_region_num + 4`, captions 16).
        batch_size: prompts per `generate` call.
        predictions: if a dict is given, it receives per task the list of samples with their predictions
            (JSON-serialisable), e.g. to save them or draw pictures.
        progress: optional callback for one-line progress messages.

    Returns:
        `rec_acc@0.5`, `rec_miou`, `rec_no_box_rate` (REC; IoU strictly above 0.5 as Groma's eval_rec.py) with two
        reference points on the same region slots, `rec_first_region_acc@0.5` (always answering `<r0>`, the
        proposer's top-scoring region) and `rec_best_region_acc@0.5` (always the slot that overlaps the reference
        most: the ceiling the proposals set), `ar`,
        `ar50`, `ar75` (multi-object grounding, AS-MANY protocol) and `region_caption_cider_d` (pycocoevalcap
        scale, 0-10), for the requested tasks. Floats.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    unknown = [task for task in tasks if task not in GROMA_EVAL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"`tasks` must be a non-empty subset of {GROMA_EVAL_TASKS}; got {list(tasks)!r}.")
    if max_new_tokens is not None:
        check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(batch_size, "batch_size")
    rows = _scene_list(scenes, tasks)
    report = progress or (lambda message: None)
    metrics: dict[str, float] = {}

    def budget(task: str) -> int:
        if max_new_tokens is not None:
            return max_new_tokens
        if task == "multi_grounding":
            return processor.max_region_num + 4
        return _DEFAULT_MAX_NEW_TOKENS[task]

    if "rec" in tasks:
        samples = [
            (index, expression["text"], list(row["boxes"][expression["object_index"]]), expression.get("kind"))
            for index, row in enumerate(rows)
            for expression in row["referring_expressions"]
        ]
        answers = generate_groma_answers(
            model,
            processor,
            [rows[index]["image"] for index, _, _, _ in samples],
            [rec_prompt(text) for _, text, _, _ in samples],
            max_new_tokens=budget("rec"),
            batch_size=batch_size,
        )
        references = [box for _, _, box, _ in samples]
        rec_metric = load_metric("rec_accuracy")
        result = rec_metric.compute(predictions=[answer.rec_box for answer in answers], references=references)
        first_region, best_region = _reference_choices(answers, references)
        metrics.update(
            {
                "rec_acc@0.5": float(result["accuracy"]),
                "rec_miou": float(result["miou"]),
                "rec_no_box_rate": float(result["no_box_rate"]),
                "rec_first_region_acc@0.5": float(
                    rec_metric.compute(predictions=first_region, references=references)["accuracy"]
                ),
                "rec_best_region_acc@0.5": float(
                    rec_metric.compute(predictions=best_region, references=references)["accuracy"]
                ),
            }
        )
        if predictions is not None:
            predictions["rec"] = [
                {
                    "scene": index,
                    "expression": text,
                    "kind": kind,
                    "reference": box,
                    "prediction": answer.rec_box,
                    "answer": answer.text,
                }
                for (index, text, box, kind), answer in zip(samples, answers, strict=True)
            ]
        report(f"REC: acc@0.5 {metrics['rec_acc@0.5']:.3f} on {len(samples)} expressions")

    if "multi_grounding" in tasks:
        known: dict[str, int] = {}
        samples = []
        for index, row in enumerate(rows):
            for category in sorted(set(row["categories"])):
                truth = [
                    list(box) for box, name in zip(row["boxes"], row["categories"], strict=True) if name == category
                ]
                samples.append((index, category, truth))
        answers = generate_groma_answers(
            model,
            processor,
            [rows[index]["image"] for index, _, _ in samples],
            [multi_grounding_prompt(_plural(category)) for _, category, _ in samples],
            max_new_tokens=budget("multi_grounding"),
            batch_size=batch_size,
        )
        predicted = [[box for entry in answer.grounding for box in entry["boxes"]] for answer in answers]
        result = load_metric("as_many_recall").compute(
            predictions=predicted,
            references=[
                {"boxes": truth, "category_id": _category_id(category, known)} for _, category, truth in samples
            ],
        )
        metrics.update({"ar": float(result["ar"]), "ar50": float(result["ar_50"]), "ar75": float(result["ar_75"])})
        if predictions is not None:
            predictions["multi_grounding"] = [
                {
                    "scene": index,
                    "category": category,
                    "references": truth,
                    "predictions": boxes,
                    "answer": answer.text,
                }
                for (index, category, truth), boxes, answer in zip(samples, predicted, answers, strict=True)
            ]
        report(f"multi-object grounding: AR {metrics['ar']:.3f} on {len(samples)} queries")

    if "region_caption" in tasks:
        samples = [
            (index, list(box), caption)
            for index, row in enumerate(rows)
            for box, caption in zip(row["boxes"], row["region_captions"], strict=True)
        ]
        answers = generate_groma_answers(
            model,
            processor,
            [rows[index]["image"] for index, _, _ in samples],
            [region_caption_prompt()] * len(samples),
            boxes=[[box] for _, box, _ in samples],
            max_new_tokens=budget("region_caption"),
            batch_size=batch_size,
        )
        captions = [answer.plain_text for answer in answers]
        result = load_metric("cider_d").compute(
            predictions=captions, references=[[caption] for _, _, caption in samples]
        )
        metrics["region_caption_cider_d"] = float(result["cider_d"])
        if predictions is not None:
            predictions["region_caption"] = [
                {"scene": index, "box": box, "reference": caption, "prediction": predicted_caption}
                for (index, box, caption), predicted_caption in zip(samples, captions, strict=True)
            ]
        report(f"region captioning: CIDEr-D {metrics['region_caption_cider_d']:.3f} on {len(samples)} regions")
    return metrics


def evaluate_groma_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    num_samples: int = 64,
    *,
    seed: int = 0,
    tasks: Sequence[str] = GROMA_EVAL_TASKS,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
    scenes: Any = None,
) -> dict[str, float]:
    """`hf-regionmm eval groma CHECKPOINT`: load a checkpoint through the Auto classes and evaluate it on
    `num_samples` held-out synthetic scenes (`groma_eval_scenes`, split "test"), or on the first `num_samples` of
    `scenes` (e.g. a real-format loader's output: `hf-regionmm eval groma CHECKPOINT --data refcoco ...`), where
    only the `tasks` the scenes have annotations for run (`evaluable_tasks`).

    Writes `groma_predictions.json` (every sample with its prediction) to `output_dir` and returns the metrics of
    `evaluate_groma`.
    """
    check_positive_int(num_samples, "num_samples")
    if scenes is not None:
        scenes = [scenes[index] for index in range(min(num_samples, len(scenes)))]
        offered = evaluable_tasks(scenes)
        tasks = tuple(task for task in tasks if task in offered)
        if not tasks:
            raise ValueError(
                f"`scenes` have annotations for none of the Groma evaluation tasks {list(GROMA_EVAL_TASKS)}: REC needs "
                "referring expressions (RefCOCO), multi-object grounding categories (COCO), region captioning region "
                "descriptions (Visual Genome)."
            )
    model, processor = load_checkpoint(checkpoint, AutoModelForImageTextToText)
    if scenes is None:
        scenes = groma_eval_scenes(num_samples, seed=seed)
    collected: dict[str, list[dict[str, Any]]] = {}
    metrics = evaluate_groma(
        model, processor, scenes, tasks=tasks, batch_size=batch_size, predictions=collected, progress=progress
    )
    write_predictions(output_dir, "groma", collected)
    return metrics
