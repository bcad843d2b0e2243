"""Groma training data: per-epoch variation of `GromaTrainingDataset` and `GromaTrainer` driving it.

A scene that comes back in a later epoch must show another task and another expression / box (else a multi-epoch run
repeats the same examples), while a given (seed, epoch, index) must always give the same example (reproducible runs,
resumable training). The trainer has to pass the epoch on itself: accelerate forwards it to the sampler only.
"""

from __future__ import annotations

import pytest
import torch

from hf_regionmm.data.synthetic import generate_scenes
from hf_regionmm.modeling.modeling_groma import GromaForConditionalGeneration
from hf_regionmm.registry import get_system
from hf_regionmm.systems.groma import tiny_groma_config, tiny_groma_processor
from hf_regionmm.trainers.groma import (
    GROMA_TASKS,
    MAX_REC_TURNS,
    GromaCollator,
    GromaTrainingDataset,
    groma_tasks_of_scene,
)
from hf_regionmm.trainers.tiny_training import build_tiny_trainer


@pytest.fixture(scope="module")
def scenes():
    # Many objects per scene, so that each scene offers several expressions, boxes and categories to choose from.
    return generate_scenes(12, seed=3, split="train", min_objects=3, max_objects=4, with_masks=False)


def _signature(example: dict) -> tuple:
    return (example["task"], example["query"], example["answer"], str(example["boxes"]), str(example["ground_boxes"]))


def _epoch(dataset: GromaTrainingDataset, epoch: int) -> list[tuple]:
    dataset.set_epoch(epoch)
    return [_signature(dataset[index]) for index in range(len(dataset))]


def test_task_of_a_sample_rotates_with_the_epoch(scenes):
    dataset = GromaTrainingDataset(scenes, tasks=GROMA_TASKS, seed=0)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        assert [dataset[index]["task"] for index in range(len(dataset))] == [
            GROMA_TASKS[(index + epoch) % len(GROMA_TASKS)] for index in range(len(dataset))
        ]


def test_two_epochs_choose_differently_and_each_epoch_is_reproducible(scenes):
    dataset = GromaTrainingDataset(scenes, tasks=("rec",), seed=0)
    first, second = _epoch(dataset, 0), _epoch(dataset, 1)
    # REC only: the task is fixed, so every difference is another expression of the same scene.
    assert sum(a != b for a, b in zip(first, second, strict=True)) >= len(scenes) // 3
    # (seed, epoch, index) fixes the example: the same epoch again, and a fresh data set, give the same examples.
    assert _epoch(dataset, 0) == first
    assert _epoch(GromaTrainingDataset(scenes, tasks=("rec",), seed=0), 1) == second
    fresh = GromaTrainingDataset(scenes, tasks=("rec",), seed=0)
    fresh.set_epoch(1)
    assert _signature(fresh[5]) == second[5]
    # Another seed draws other expressions.
    assert _epoch(GromaTrainingDataset(scenes, tasks=("rec",), seed=1), 0) != first


def test_region_caption_box_changes_with_the_epoch(scenes):
    dataset = GromaTrainingDataset(scenes, tasks=("region_caption",), seed=0)
    boxes = [[sample[3] for sample in _epoch(dataset, epoch)] for epoch in range(4)]
    changed = sum(len({boxes[epoch][index] for epoch in range(4)}) > 1 for index in range(len(scenes)))
    assert changed >= len(scenes) // 2


def test_bad_epoch_and_tasks_are_named(scenes):
    dataset = GromaTrainingDataset(scenes)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="`epoch` must be an integer >= 0"):
            dataset.set_epoch(bad)
    with pytest.raises(ValueError, match="`tasks`"):
        GromaTrainingDataset(scenes, tasks="rec")
    with pytest.raises(ValueError, match="`tasks` has unknown entries"):
        GromaTrainingDataset(scenes, tasks=("rec", "vqa"))


class _RecordingDataset(GromaTrainingDataset):
    """Records the epoch every fetched example was drawn in."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen_epochs: list[int] = []

    def __getitem__(self, index: int) -> dict:
        self.seen_epochs.append(self.epoch)
        return super().__getitem__(index)


def test_trainer_sets_the_epoch_of_its_training_set(tmp_path, scenes):
    # Detection examples keep the run cheap (no LLM); 4 scenes at batch 2 (unshuffled order not needed: only the
    # epoch of each fetch is checked) are 2 steps per epoch, so 5 steps span epochs 0, 1 and the first step of 2.
    dataset = _RecordingDataset(scenes.select(range(4)), tasks=("detection",), seed=0)
    trainer = build_tiny_trainer(
        get_system("groma"), tmp_path, max_steps=5, batch_size=2, stage="det", train_dataset=dataset
    )
    trainer.train()
    # accelerate's loader fetches one batch ahead, so epoch 2 may be read further than the one step trained on it.
    assert dataset.seen_epochs[:8] == [0] * 4 + [1] * 4
    assert len(dataset.seen_epochs) >= 10 and set(dataset.seen_epochs[8:]) == {2}


def test_multi_turn_rec_supervises_every_expression_of_the_scene(scenes):
    dataset = GromaTrainingDataset(scenes, tasks=("multi_turn_rec", "rec"), seed=0)
    multi, single = dataset[0], dataset[1]
    scene = scenes[0]
    turns = min(len(scene["referring_expressions"]), MAX_REC_TURNS)
    assert multi["task"] == "multi_turn_rec" and multi["answer"] is None and turns >= 2
    assert multi["query"].count("<ground_box>") == len(multi["ground_boxes"]) == turns
    # Each turn asks one of the scene's expressions (none twice) and its ground box is that expression's object.
    asked = [e for e in scene["referring_expressions"] if f"<p>{e['text']}</p>" in multi["query"]]
    assert len(asked) == turns
    assert sorted(map(str, multi["ground_boxes"])) == sorted(
        str(list(scene["boxes"][e["object_index"]])) for e in asked
    )

    processor = tiny_groma_processor()
    batch = GromaCollator(processor)([multi, single])
    model = GromaForConditionalGeneration(tiny_groma_config()).eval()
    with torch.no_grad():
        outputs = model(**batch)
    index_ids = set(model.config.region_index_token_ids)
    supervised = [[token for token in row.tolist() if token in index_ids] for row in outputs.labels]
    # One `<rK>` target per turn in the conversation, one in the single-turn sample; the loss covers both.
    assert [len(row) for row in supervised] == [turns, 1]
    assert torch.isfinite(outputs.loss)

    with pytest.raises(ValueError, match="multi_turn_rec"):
        GromaTrainingDataset(scenes.map(lambda row: {"referring_expressions": []}), tasks=("multi_turn_rec",))[0]


def test_a_scene_without_a_tasks_annotations_gets_the_next_task_it_has(scenes):
    # Visual-Genome-like scene: boxes and region captions only.
    row = dict(scenes[0])
    row.update(referring_expressions=[], categories=[], grounded_caption="")
    assert groma_tasks_of_scene(row) == ("region_caption", "detection")
    dataset = GromaTrainingDataset([row, row], tasks=GROMA_TASKS, seed=0)
    for epoch in range(len(GROMA_TASKS)):
        dataset.set_epoch(epoch)
        assert {dataset[index]["task"] for index in range(2)} == {"region_caption"}
    with pytest.raises(ValueError, match="has annotations for"):
        GromaTrainingDataset([row], tasks=("rec", "multi_grounding"), seed=0)[0]
