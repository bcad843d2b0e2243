"""Groma training: the three stages of the paper (Table 10), task mixing on region data, and the collator.

| stage | trains (paper: RP / RE, VLP / RE, VLP, LLM) | lr | weight decay |
|---|---|---|---|
| `det` detection pretraining | region proposer (DINOv2 frozen) | 2e-4 | 1e-4 |
| `align` alignment pretraining | region encoder, vision-language projector, Groma's new-token embeddings/head | 1e-4 | 0 |
| `instruct` instruction finetuning | the same + the LLM | 1e-5 | 0 |

The new-token embeddings (`<roi>`, `<r0>`... ) and their output head train whenever the projector does: they are
new, and the released layout keeps them apart from the frozen LLM vocabulary precisely so they can.

Examples are built from scenes in the synthetic schema (`hf_regionmm.data.synthetic.scene_features`, which the
real-format loaders also produce): REC, region captioning, multi-instance grounding and grounded captioning, in the
released prompt formats (`GromaProcessor.rec_prompt`, ...), with `<ground_box>` placeholders that the model resolves
to the best-matching region slot. `multi_turn_rec` (not in the default mix) puts a scene's referring expressions
into one conversation, every answer supervised (the released multi-turn format with `<sep>` pairs), as RefCOCO-style
data with several expressions per image is usually packed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ..processing.processing_groma import (
    EOS_TOKEN,
    SEP_TOKEN,
    build_prompt,
    grounded_caption_prompt,
    multi_grounding_answer,
    multi_grounding_prompt,
    rec_answer,
    rec_prompt,
    region_caption_answer,
    region_caption_prompt,
)
from .region_trainer import RegionTrainer, TrainingStage

__all__ = [
    "GROMA_ANNOTATION_COLUMNS",
    "GROMA_EXTRA_TASKS",
    "GROMA_STAGES",
    "GROMA_TASKS",
    "GromaCollator",
    "GromaTrainer",
    "GromaTrainingDataset",
    "groma_examples_from_scene",
    "groma_tasks_of_scene",
]

_LANGUAGE_SIDE = (
    "model.region_encoder.",
    "model.multi_modal_projector.",
    "model.new_token_embeddings.",
    "extra_lm_head.",
)

GROMA_STAGES: tuple[TrainingStage, ...] = (
    TrainingStage(
        name="det",
        trainable=("model.proposer.",),
        learning_rate=2e-4,
        weight_decay=1e-4,
        description="detection pretraining: class-agnostic proposer on frozen DINOv2 (Hungarian set loss)",
    ),
    TrainingStage(
        name="align",
        trainable=_LANGUAGE_SIDE,
        learning_rate=1e-4,
        description="alignment pretraining: region encoder + projector (+ new tokens), LLM and perceiver frozen",
    ),
    TrainingStage(
        name="instruct",
        trainable=(*_LANGUAGE_SIDE, "model.language_model.", "lm_head."),
        learning_rate=1e-5,
        description="instruction finetuning: region encoder + projector + LLM, perceiver frozen",
    ),
)

GROMA_TASKS = ("rec", "region_caption", "multi_grounding", "grounded_caption")
# Tasks a dataset may ask for beyond the default mix: several REC turns per sample, and detection (the `det` stage).
GROMA_EXTRA_TASKS = ("multi_turn_rec", "detection")
MAX_REC_TURNS = 8
_REGION_TOKEN_RE = re.compile(r"<r(\d+)>")


def _grounded_answer(grounded_text: str, boxes: Sequence[Sequence[float]]) -> tuple[str, list[list[float]]]:
    """Replace each `<rK>` (K indexes the scene's boxes) by `<ground_box>` and list the boxes in order of appearance."""
    order = [int(k) for k in _REGION_TOKEN_RE.findall(grounded_text)]
    if any(k >= len(boxes) for k in order):
        raise ValueError(f"grounded text names region {max(order)} but the scene has {len(boxes)} boxes.")
    return _REGION_TOKEN_RE.sub("<ground_box>", grounded_text), [list(boxes[k]) for k in order]


def groma_examples_from_scene(scene: dict[str, Any], task: str, rng: random.Random) -> dict[str, Any]:
    """One training example of `task` from a scene in the synthetic schema.

    Returns `{"image", "query", "answer", "boxes" (user boxes, pixel xyxy), "ground_boxes" (pixel xyxy), "task"}`;
    for `multi_turn_rec` the query is the whole conversation with `<sep>`-marked answers and `answer` is None.
    """
    boxes = scene["boxes"]
    example: dict[str, Any] = {"image": scene["image"], "boxes": [], "ground_boxes": [], "task": task}
    if task == "rec":
        expression = rng.choice(scene["referring_expressions"])
        example.update(query=rec_prompt(expression["text"]), answer=rec_answer())
        example["ground_boxes"] = [list(boxes[expression["object_index"]])]
    elif task == "region_caption":
        index = rng.randrange(len(boxes))
        example.update(query=region_caption_prompt(), answer=region_caption_answer(scene["region_captions"][index]))
        example["boxes"] = [list(boxes[index])]
    elif task == "multi_grounding":
        categories = sorted(set(scene["categories"]))
        category = rng.choice(categories)
        indices = [i for i, c in enumerate(scene["categories"]) if c == category]
        example.update(query=multi_grounding_prompt(category + "s"), answer=multi_grounding_answer(len(indices)))
        example["ground_boxes"] = [list(boxes[i]) for i in indices]
    elif task == "grounded_caption":
        answer, ground_boxes = _grounded_answer(scene["grounded_caption"], boxes)
        example.update(query=grounded_caption_prompt(), answer=answer, ground_boxes=ground_boxes)
    elif task == "multi_turn_rec":
        expressions = list(scene["referring_expressions"])
        if not expressions:
            raise ValueError("`multi_turn_rec` needs a scene with referring expressions; this scene has none.")
        rng.shuffle(expressions)
        expressions = expressions[:MAX_REC_TURNS]
        # The whole conversation is the text; each answer sits between `<sep>` markers, so the processor supervises
        # every turn (the example's `answer` is None).
        answer = f"{SEP_TOKEN}{rec_answer()}{SEP_TOKEN}"
        turns = [(rec_prompt(expression["text"]), answer) for expression in expressions]
        text = f"{build_prompt(turns[-1][0], history=turns[:-1])} {turns[-1][1]}{EOS_TOKEN}"
        example.update(query=text, answer=None)
        example["ground_boxes"] = [list(boxes[expression["object_index"]]) for expression in expressions]
    else:
        raise ValueError(f"Unknown Groma task {task!r}; choose one of {(*GROMA_TASKS, *GROMA_EXTRA_TASKS)}.")
    return example


# The scene columns `groma_tasks_of_scene` reads (no image: callers may select just these to skip decoding).
GROMA_ANNOTATION_COLUMNS = ("boxes", "referring_expressions", "region_captions", "categories", "grounded_caption")


def groma_tasks_of_scene(scene: dict[str, Any]) -> tuple[str, ...]:
    """The tasks (of `GROMA_TASKS` + `GROMA_EXTRA_TASKS`) a scene has annotations for: real-format data fills only
    some columns (RefCOCO: expressions; COCO: boxes and categories; Visual Genome: region captions; Flickr30k
    Entities: grounded captions). A missing column counts as empty."""

    def count(key: str) -> int:
        value = scene.get(key)
        return 0 if value is None else len(value)

    num_boxes = count("boxes")
    has_boxes = num_boxes > 0
    available = {
        "rec": has_boxes and count("referring_expressions") > 0,
        "region_caption": has_boxes and count("region_captions") == num_boxes,
        "multi_grounding": has_boxes and count("categories") == num_boxes,
        "grounded_caption": has_boxes and count("grounded_caption") > 0,
        "multi_turn_rec": has_boxes and count("referring_expressions") > 0,
        "detection": has_boxes,
    }
    return tuple(task for task, present in available.items() if present)


class GromaTrainingDataset(torch.utils.data.Dataset):
    """Groma training examples over a scene data set, varied per epoch: in epoch `e`, sample i is task
    `tasks[(i + e) % len(tasks)]` of scene i (or, when the scene lacks that task's annotations, the next task in
    `tasks` it has: `groma_tasks_of_scene`).

    Deterministic: the choice inside a task (which expression, which box, which category) is seeded by
    `(seed, epoch, i)`, so a scene that comes back in a later epoch shows another task and another expression, and a
    given `(seed, epoch, i)` always gives the same example. `set_epoch(e)` selects the epoch, as `datasets` and
    samplers do; `GromaTrainer` calls it at the start of every training epoch. For the `det` stage, pass
    `tasks=("detection",)`: examples are then `{"image", "detection_boxes"}` (pixel xyxy).
    """

    def __init__(self, scenes: Any, tasks: Sequence[str] = GROMA_TASKS, seed: int = 0) -> None:
        if not tasks or isinstance(tasks, str):
            raise ValueError(f"`tasks` must be a non-empty sequence of task names, e.g. {GROMA_TASKS}; got {tasks!r}.")
        unknown = set(tasks) - {*GROMA_TASKS, *GROMA_EXTRA_TASKS}
        if unknown:
            raise ValueError(
                f"`tasks` has unknown entries {sorted(unknown)}; use {(*GROMA_TASKS, *GROMA_EXTRA_TASKS)}."
            )
        self.scenes = scenes
        self.tasks = tuple(tasks)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose tasks and choices `__getitem__` returns (an integer >= 0)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`epoch` must be an integer >= 0; got {epoch!r}.")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scenes[index]
        # The scheduled task, or the next one in `tasks` the scene has annotations for (real-format data sets fill
        # only some columns).
        offered = groma_tasks_of_scene(scene)
        first = (index + self.epoch) % len(self.tasks)
        rotation = self.tasks[first:] + self.tasks[:first]
        task = next((candidate for candidate in rotation if candidate in offered), None)
        if task is None:
            raise ValueError(
                f"Scene {index} ({scene.get('scene_id', '?')}) has annotations for {list(offered) or 'no task'} but "
                f"the data set trains {list(self.tasks)}; pick tasks the data provides (see groma_tasks_of_scene)."
            )
        if task == "detection":
            return {"image": scene["image"], "detection_boxes": [list(b) for b in scene["boxes"]], "task": task}
        # A string seed hashes deterministically (random.Random uses SHA-512 for str), unlike Python's hash().
        return groma_examples_from_scene(scene, task, random.Random(f"{self.seed}/{self.epoch}/{index}"))


class _DatasetEpochCallback(TrainerCallback):
    """Call `train_dataset.set_epoch(epoch)` at the start of every epoch.

    `Trainer` forwards the epoch to the sampler only (accelerate's `DataLoaderShard.set_epoch` skips the data set when
    the sampler takes it), so without this every epoch would repeat the same examples. The iterator of an epoch (and
    non-persistent workers, which copy the data set) is created after `on_epoch_begin`, so the new epoch is seen.
    `state.epoch` is the float progress; it equals the finished epoch count at an epoch's start, also after resuming.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(int(state.epoch or 0))


class GromaCollator:
    """Batch Groma examples through the processor (mixed tasks: some samples with user boxes, some with targets).

    Text examples -> `pixel_values, input_ids, attention_mask, labels, image_sizes` (+ `refer_boxes*` and
    `ground_boxes*` when any sample has them). Detection examples -> `pixel_values` + `detection_targets`
    (`[{"boxes": (n, 4) normalized cxcywh}]`). A batch must not mix the two kinds.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        kinds = {"detection_boxes" in example for example in examples}
        if len(kinds) != 1:
            raise ValueError("A Groma batch mixes detection and text examples; keep the `det` stage separate.")
        images = [example["image"].convert("RGB") for example in examples]
        if kinds == {True}:
            batch = self.processor.image_processor(images, return_tensors="pt")
            targets = []
            for example, image in zip(examples, images, strict=True):
                width, height = image.size
                boxes = torch.tensor(example["detection_boxes"], dtype=torch.float32).reshape(-1, 4)
                boxes = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
                cxcywh = torch.stack(
                    [
                        (boxes[:, 0] + boxes[:, 2]) / 2,
                        (boxes[:, 1] + boxes[:, 3]) / 2,
                        boxes[:, 2] - boxes[:, 0],
                        boxes[:, 3] - boxes[:, 1],
                    ],
                    dim=-1,
                )
                targets.append({"boxes": cxcywh.clamp(0.0, 1.0)})
            return {"pixel_values": batch["pixel_values"], "detection_targets": targets}
        has_boxes = any(example["boxes"] for example in examples)
        has_ground = any(example["ground_boxes"] for example in examples)
        batch = self.processor(
            images=images,
            text=[example["query"] for example in examples],
            answers=[example["answer"] for example in examples],
            boxes=[example["boxes"] for example in examples] if has_boxes else None,
            ground_boxes=[example["ground_boxes"] for example in examples] if has_ground else None,
            return_tensors="pt",
        )
        return dict(batch)


class GromaTrainer(RegionTrainer):
    """`RegionTrainer` for Groma: freezes the model according to the paper stage it trains.

    `stage=`: `"det"`, `"align"` or `"instruct"` (default; see the module docstring). The stage's learning rate and
    weight decay are the paper's; `hf-regionmm train groma --stage S` puts them into the `TrainingArguments`.
    `stages=` overrides the stage table (to experiment). `self.stage_parameter_counts` holds
    `{"trainable": n, "frozen": m}` after freezing. A training set with `set_epoch` (`GromaTrainingDataset`) gets
    the epoch number at the start of every epoch.
    """

    stages = GROMA_STAGES
    default_stage = "instruct"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(_DatasetEpochCallback(self))
