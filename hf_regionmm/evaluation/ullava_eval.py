"""u-LLaVA evaluation on scenes in the synthetic schema: referring segmentation, REC and salient segmentation.

The benchmarks of the u-LLaVA paper (Sec. 4, Tables 4-6 and 8), with the released prompt formats and the metrics of
`hf_regionmm.evaluation`:

| task | prompt | prediction | metric |
|---|---|---|---|
| RES (Tables 4/5, RefCOCO/+/g) | `res_prompt(expression)` | mask of the first generated `[SEG]` | `mask_iou`: cIoU, gIoU |
| REC (Table 6, RefCOCO/+/g) | `res_prompt(expression)` (default `rec_query="segment_and_locate"`) or `rec_prompt(expression)` (`"locate"`) | one box per answer, fused by `config.rec_fusion` from the first `[LOC]` box and the first `[SEG]` mask's box (`predict().rec_boxes`) | `box_precision`: Prec@0.5 |
| salient segmentation (Table 8) | `salient_prompt()` | mask of the first generated `[SEG]` | `mask_iou` against the scene's `salient_index` object |

REC follows the paper's combined inference (Sec. 4.5, Fig. 2: "all intermediate results ..., including the output of
the region decoder and the generated mask"): the query is the released segment-and-locate instruction (RefCOCO is
trained with those templates), so the answer carries both `[SEG]` and `[LOC]` and `config.rec_fusion` picks or
averages their boxes. `rec_query="locate"` asks the box-only instruction instead (`[LOC]` alone; no mask to fuse).

Generation is greedy; `model.predict` re-reads the generated sequences and runs the mask and box heads on their
`[SEG]` / `[LOC]` tokens. Predicted masks are compared at the ORIGINAL image size with the ground-truth masks of
`decode_masks`; boxes in absolute pixel xyxy of the original image. An answer without `[SEG]` counts as an empty mask,
one without a box as a REC miss.

Scenes are dicts (or `datasets.Dataset` rows) with `image` (PIL), `height`, `width`, `masks` (RLE, see
`hf_regionmm.data.synthetic.decode_masks`), `boxes` (n, 4) absolute pixel xyxy, `referring_expressions`
(`{"text", "object_index"}`) and `salient_index`: the schema of `generate_scenes(with_masks=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from ..data.synthetic import decode_masks, generate_scenes
from ..processing.processing_ullava import rec_prompt, res_prompt, salient_prompt
from . import load_metric
from .checkpoint_eval import check_positive_int, load_checkpoint, write_predictions

__all__ = [
    "ULLAVA_EVAL_SCENES",
    "REC_QUERIES",
    "ULLAVA_EVAL_TASKS",
    "ULlavaAnswer",
    "evaluate_ullava",
    "evaluate_ullava_checkpoint",
    "generate_ullava_answers",
    "ullava_eval_samples",
    "ullava_eval_scenes",
]

ULLAVA_EVAL_TASKS = ("res", "rec", "salient")
REC_QUERIES = ("segment_and_locate", "locate")

# The scene distribution the tiny u-LLaVA trains on (`hf_regionmm.systems.ullava.build_training_dataset`); held-out
# evaluation draws the same kind of scene from the "test" split (which never shares a scene with "train").
ULLAVA_EVAL_SCENES: dict[str, Any] = {
    "image_size_range": (64, 112),
    "min_objects": 2,
    "max_objects": 4,
    "with_masks": True,
}

# The longest expected answer, "sure . mask : [SEG] ; location : [LOC] ; [tag] medium red circle [/tag] . </s>", is 17
# word-level tokens; the salient answer's explanation is not needed for its mask.
_DEFAULT_MAX_NEW_TOKENS = 20
_REQUIRED_SCENE_KEYS = {
    "res": ("image", "height", "width", "masks", "referring_expressions"),
    "rec": ("image", "boxes", "referring_expressions"),
    "salient": ("image", "height", "width", "masks", "salient_index"),
}


@dataclass
class ULlavaAnswer:
    """One greedy u-LLaVA answer with what its heads decoded.

    Args:
        text: the decoded answer with u-LLaVA's tokens kept (`"sure . mask : [SEG] ; location : [LOC] ; ..."`),
            prompt and `</s>` removed.
        tags: the `[tag]...[/tag]` phrases of the answer.
        mask: `(H, W)` bool numpy mask of the first `[SEG]` at the original image size, None without `[SEG]`.
        boxes: pixel xyxy boxes of the original image, one per generated `[LOC]`, in order.
        rec_box: the fused REC box (`config.rec_fusion`), pixel xyxy of the original image, None if there is none.
    """

    text: str
    tags: list[str]
    mask: np.ndarray | None
    boxes: list[list[float]]
    rec_box: list[float] | None


def ullava_eval_scenes(num_samples: int = 64, seed: int = 0, split: str = "test", **overrides: Any) -> Any:
    """Held-out synthetic scenes with masks: `generate_scenes(num_samples, split="test", **ULLAVA_EVAL_SCENES)`."""
    return generate_scenes(num_samples, seed=seed, split=split, **{**ULLAVA_EVAL_SCENES, **overrides})


def _check_images(images: Any) -> list[Image.Image]:
    if isinstance(images, Image.Image) or not isinstance(images, Sequence):
        raise TypeError("`images` must be a list of PIL images, one per query.")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"`images[{index}]` must be a PIL.Image.Image; got {type(image).__name__}.")
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def generate_ullava_answers(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image],
    queries: Sequence[str],
    *,
    max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
) -> list[ULlavaAnswer]:
    """Greedy u-LLaVA answers to one query per image, with their masks and boxes in pixels of the original image.

    Args:
        model: a `ULlavaForConditionalGeneration` (switched to eval mode for the call, then restored).
        processor: the matching `ULlavaProcessor`.
        images: one PIL image per query.
        queries: bare user queries (`res_prompt("red circle")`, ...), wrapped into the released conversation by the
            processor.
        max_new_tokens: generation budget per answer.
        batch_size: queries per `generate` call (prompts are left-padded).

    Returns:
        One `ULlavaAnswer` per query, in order.
    """
    images = _check_images(images)
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise TypeError("`queries` must be a list of strings, one per image.")
    if len(queries) != len(images):
        raise ValueError(f"`queries` has {len(queries)} entries for {len(images)} `images`; give one query per image.")
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(batch_size, "batch_size")

    was_training = model.training
    model.eval()
    answers: list[ULlavaAnswer] = []
    try:
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            inputs = processor(
                images=images[start:stop], text=list(queries[start:stop]), padding_side="left", return_tensors="pt"
            ).to(model.device)
            # SAM is only needed by `predict`; generation reads the CLIP branch.
            generate_inputs = {key: value for key, value in inputs.items() if key != "sam_pixel_values"}
            generated = model.generate(
                **generate_inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            prediction = model.predict(
                generated,
                pixel_values=inputs["pixel_values"],
                sam_pixel_values=inputs["sam_pixel_values"],
                image_sizes=inputs["image_sizes"],
                attention_mask=inputs["attention_mask"],
            )
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            # `skip_prompt=True` on the answer ids alone: no "ASSISTANT:" to find, and the text ends at the first </s>.
            texts = processor.post_process_image_text_to_text(new_tokens, skip_special_tokens=False, skip_prompt=True)
            tags = processor.post_process_tags(new_tokens, skip_prompt=True)
            masks = processor.post_process_segmentation(prediction.mask_logits, inputs["image_sizes"])
            boxes = processor.post_process_grounding(prediction.boxes, inputs["image_sizes"])
            rec_boxes = processor.post_process_grounding(prediction.rec_boxes, inputs["image_sizes"])
            for row in range(len(texts)):
                answers.append(
                    ULlavaAnswer(
                        text=texts[row].strip(),
                        tags=tags[row],
                        mask=masks[row][0].cpu().numpy() if masks[row].shape[0] else None,
                        boxes=boxes[row],
                        rec_box=rec_boxes[row][0] if rec_boxes[row] else None,
                    )
                )
    finally:
        model.train(was_training)
    return answers


def _scene_list(scenes: Any, tasks: Sequence[str]) -> list[Mapping[str, Any]]:
    if isinstance(scenes, Mapping) or not hasattr(scenes, "__len__") or not hasattr(scenes, "__getitem__"):
        raise TypeError(
            "`scenes` must be a list of scene dicts or a datasets.Dataset (e.g. `ullava_eval_scenes(64)`); got "
            f"{type(scenes).__name__}."
        )
    rows = [scenes[index] for index in range(len(scenes))]
    if not rows:
        raise ValueError("`scenes` is empty; pass at least one scene (e.g. `ullava_eval_scenes(64)`).")
    needed = sorted({key for task in tasks for key in _REQUIRED_SCENE_KEYS[task]})
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"`scenes[{index}]` must be a dict in the synthetic scene schema; got {type(row).__name__}."
            )
        missing = [key for key in needed if key not in row or row[key] is None]
        if missing:
            raise ValueError(
                f"`scenes[{index}]` lacks {missing}, which the tasks {list(tasks)} need; pass scenes in the schema of "
                "`hf_regionmm.data.synthetic.generate_scenes(with_masks=True)`."
            )
    return rows


def ullava_eval_samples(
    scenes: Any, tasks: Sequence[str] = ULLAVA_EVAL_TASKS, rec_query: str = "segment_and_locate"
) -> dict[str, list[dict[str, Any]]]:
    """The evaluation queries of each task, with their ground truth.

    RES and REC ask about every object that has a referring expression, once, with its first expression (the
    expression's leading "the" dropped: the templates say "the {}" already); salient asks once per scene. REC asks
    `res_prompt` (`rec_query="segment_and_locate"`, the paper's combined REC) or `rec_prompt` (`"locate"`).

    Returns:
        task -> list of `{"scene": index, "query": str, "expression": str | None, "object_index": int,
        "mask": (H, W) bool numpy (RES, salient) / "box": pixel xyxy list (REC)}`.
    """
    tasks = _check_tasks(tasks)
    if rec_query not in REC_QUERIES:
        raise ValueError(f"`rec_query` must be one of {REC_QUERIES}; got {rec_query!r}.")
    rec_template = res_prompt if rec_query == "segment_and_locate" else rec_prompt
    rows = _scene_list(scenes, tasks)
    samples: dict[str, list[dict[str, Any]]] = {task: [] for task in tasks}
    for index, row in enumerate(rows):
        object_masks = decode_masks(row) if ("res" in tasks or "salient" in tasks) else None
        first_expression: dict[int, str] = {}
        for expression in row["referring_expressions"]:
            first_expression.setdefault(int(expression["object_index"]), expression["text"].removeprefix("the "))
        for object_index, text in sorted(first_expression.items()):
            if "res" in tasks:
                samples["res"].append(
                    {
                        "scene": index,
                        "query": res_prompt(text),
                        "expression": text,
                        "object_index": object_index,
                        "mask": object_masks[object_index],
                    }
                )
            if "rec" in tasks:
                samples["rec"].append(
                    {
                        "scene": index,
                        "query": rec_template(text),
                        "expression": text,
                        "object_index": object_index,
                        "box": [float(v) for v in row["boxes"][object_index]],
                    }
                )
        if "salient" in tasks:
            salient_index = int(row["salient_index"])
            samples["salient"].append(
                {
                    "scene": index,
                    "query": salient_prompt(),
                    "expression": None,
                    "object_index": salient_index,
                    "mask": object_masks[salient_index],
                }
            )
    return samples


def _check_tasks(tasks: Any) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    unknown = [task for task in tasks if task not in ULLAVA_EVAL_TASKS]
    if unknown or not tasks:
        raise ValueError(f"`tasks` must be a non-empty subset of {ULLAVA_EVAL_TASKS}; got {list(tasks)!r}.")
    return tasks


def _mask_metrics(answers: list[ULlavaAnswer], samples: list[dict[str, Any]]) -> dict[str, float]:
    predictions = [
        answer.mask if answer.mask is not None else np.zeros_like(sample["mask"])
        for answer, sample in zip(answers, samples, strict=True)
    ]
    result = load_metric("mask_iou").compute(
        predictions=predictions, references=[sample["mask"] for sample in samples]
    )
    no_mask = sum(answer.mask is None for answer in answers) / len(answers)
    return {"ciou": float(result["ciou"]), "giou": float(result["giou"]), "no_mask_rate": float(no_mask)}


def evaluate_ullava(
    model: Any,
    processor: Any,
    scenes: Any,
    *,
    tasks: Sequence[str] = ULLAVA_EVAL_TASKS,
    max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    rec_query: str = "segment_and_locate",
    predictions: dict[str, list[dict[str, Any]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Evaluate a u-LLaVA model on scenes with greedy generation (see the module docstring for the protocol).

    Args:
        model: `ULlavaForConditionalGeneration` (any device; eval mode during the call).
        processor: its `ULlavaProcessor`.
        scenes: a `datasets.Dataset` or a list of scene dicts (synthetic schema with masks).
        tasks: any of `"res"`, `"rec"` (every object with a referring expression, once) and `"salient"` (once per
            scene).
        max_new_tokens: generation budget per answer.
        batch_size: prompts per `generate` call.
        rec_query: `"segment_and_locate"` (the paper's combined REC: mask + box answer, fused by
            `config.rec_fusion`) or `"locate"` (box-only instruction, the `[LOC]` box alone).
        predictions: if a dict is given, it receives per task the list of samples with their predictions
            (JSON-serialisable; masks as pixel counts and the predicted box), e.g. to save them.
        progress: optional callback for one-line progress messages.

    Returns:
        Floats, for the requested tasks: `ciou`, `giou`, `res_no_mask_rate` (RES), `prec@0.5`, `rec_no_box_rate`
        (REC, Prec@0.5 with IoU >= 0.5 against the ground-truth pixel box), `salient_ciou`, `salient_giou`,
        `salient_no_mask_rate`.
    """
    tasks = _check_tasks(tasks)
    check_positive_int(max_new_tokens, "max_new_tokens")
    check_positive_int(batch_size, "batch_size")
    samples = ullava_eval_samples(scenes, tasks, rec_query)
    rows = _scene_list(scenes, tasks)
    report = progress or (lambda message: None)
    metrics: dict[str, float] = {}

    for task in tasks:
        task_samples = samples[task]
        if not task_samples:
            raise ValueError(
                f"`scenes` give no {task!r} sample (no object has a referring expression); pass scenes with "
                "`referring_expressions`."
            )
        answers = generate_ullava_answers(
            model,
            processor,
            [rows[sample["scene"]]["image"] for sample in task_samples],
            [sample["query"] for sample in task_samples],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        if task in ("res", "salient"):
            result = _mask_metrics(answers, task_samples)
            if task == "res":
                metrics.update(ciou=result["ciou"], giou=result["giou"], res_no_mask_rate=result["no_mask_rate"])
            else:
                metrics.update(
                    salient_ciou=result["ciou"],
                    salient_giou=result["giou"],
                    salient_no_mask_rate=result["no_mask_rate"],
                )
            report(f"{task}: cIoU {result['ciou']:.3f}, gIoU {result['giou']:.3f} on {len(task_samples)} queries")
        else:
            result = load_metric("box_precision").compute(
                predictions=[answer.rec_box for answer in answers],
                references=[sample["box"] for sample in task_samples],
            )
            metrics["prec@0.5"] = float(result["precision@0.5"])
            metrics["rec_no_box_rate"] = float(sum(answer.rec_box is None for answer in answers) / len(answers))
            report(f"rec: Prec@0.5 {metrics['prec@0.5']:.3f} on {len(task_samples)} queries")
        if predictions is not None:
            predictions[task] = [
                {
                    "scene": sample["scene"],
                    "query": sample["query"],
                    "object_index": sample["object_index"],
                    "answer": answer.text,
                    "tags": answer.tags,
                    "predicted_box": answer.rec_box,
                    **(
                        {"reference_box": sample["box"]}
                        if "box" in sample
                        else {
                            "reference_mask_pixels": int(sample["mask"].sum()),
                            "predicted_mask_pixels": None if answer.mask is None else int(answer.mask.sum()),
                            "mask_intersection": None
                            if answer.mask is None
                            else int((answer.mask & sample["mask"]).sum()),
                        }
                    ),
                }
                for sample, answer in zip(task_samples, answers, strict=True)
            ]
    return metrics


def evaluate_ullava_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    num_samples: int = 64,
    *,
    seed: int = 0,
    tasks: Sequence[str] = ULLAVA_EVAL_TASKS,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """`hf-regionmm eval ullava CHECKPOINT`: load a checkpoint through the Auto classes and evaluate it on
    `num_samples` held-out synthetic scenes (`ullava_eval_scenes`, split "test").

    Writes `ullava_predictions.json` (every sample with its prediction) to `output_dir` and returns the metrics of
    `evaluate_ullava`.
    """
    check_positive_int(num_samples, "num_samples")
    model, processor = load_checkpoint(checkpoint, AutoModelForImageTextToText)
    scenes = ullava_eval_scenes(num_samples, seed=seed)
    collected: dict[str, list[dict[str, Any]]] = {}
    metrics = evaluate_ullava(
        model, processor, scenes, tasks=tasks, batch_size=batch_size, predictions=collected, progress=progress
    )
    write_predictions(output_dir, "ullava", collected)
    return metrics
