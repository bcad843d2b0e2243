"""u-LLaVA evaluation (`hf_regionmm.evaluation.ullava_eval`) and the demo hook (`hf_regionmm.systems.ullava_demo`).

The metrics are checked with oracles: `model.predict` is replaced by a function that returns, for each query in the
order `evaluate_ullava` asks them, a hand-made mask and box (the ground truth, a cropped ground truth, another object,
nothing), so the expected cIoU / gIoU / Prec@0.5 are known exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import hf_regionmm  # noqa: F401  (registers u-LLaVA)
from hf_regionmm.data.synthetic import decode_masks
from hf_regionmm.evaluation.ullava_eval import (
    ULLAVA_EVAL_TASKS,
    evaluate_ullava,
    evaluate_ullava_checkpoint,
    generate_ullava_answers,
    ullava_eval_samples,
    ullava_eval_scenes,
)
from hf_regionmm.modeling.modeling_ullava import ULlavaForConditionalGeneration, ULlavaPrediction
from hf_regionmm.processing.image_processing_ullava import pad_to_square_offsets
from hf_regionmm.registry import get_system
from hf_regionmm.systems.ullava import tiny_ullava_config, tiny_ullava_processor
from hf_regionmm.systems.ullava_demo import QUICK_RECIPE, ullava_demo


@pytest.fixture(scope="module")
def processor():
    return tiny_ullava_processor()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ULlavaForConditionalGeneration(tiny_ullava_config()).eval()


@pytest.fixture(scope="module")
def scenes():
    return ullava_eval_scenes(3, seed=0)


def _normalized(box: list[float], height: int, width: int) -> torch.Tensor:
    """Pixel xyxy of the original image -> normalized xyxy of the white-padded square (the model's box frame)."""
    left, top = pad_to_square_offsets(height, width)
    side = max(height, width)
    return (torch.tensor(box, dtype=torch.float32) + torch.tensor([left, top, left, top], dtype=torch.float32)) / side


def _install_oracle(monkeypatch, model, answers: list[tuple[np.ndarray | None, list[float] | None]]) -> list[int]:
    """Replace `model.predict`: the k-th query gets `answers[k]` = (mask at the original size or None, pixel box or
    None). Returns a list that records the batch sizes predict was called with."""
    queue = list(answers)
    calls: list[int] = []

    def predict(sequences, pixel_values=None, sam_pixel_values=None, image_sizes=None, attention_mask=None, **kw):
        batch = sequences.shape[0]
        calls.append(batch)
        mask_logits, boxes, rec_boxes = [], [], []
        for row in range(batch):
            mask, box = queue.pop(0)
            height, width = (int(v) for v in image_sizes[row])
            if mask is None:
                mask_logits.append(torch.zeros(0, height, width))
            else:
                assert mask.shape == (height, width)
                mask_logits.append(torch.where(torch.as_tensor(mask), 10.0, -10.0)[None].float())
            if box is None:
                boxes.append(torch.zeros(0, 4))
                rec_boxes.append(None)
            else:
                normalized = _normalized(box, height, width)
                boxes.append(normalized[None])
                rec_boxes.append(normalized)
        return ULlavaPrediction(
            masks=[logits > 0 for logits in mask_logits], mask_logits=mask_logits, boxes=boxes, rec_boxes=rec_boxes
        )

    monkeypatch.setattr(model, "predict", predict)
    return calls


def _oracle_answers(samples, mask_fn, box_fn):
    answers = []
    for task in ULLAVA_EVAL_TASKS:
        for sample in samples[task]:
            if task == "rec":
                answers.append((None, box_fn(sample)))
            else:
                answers.append((mask_fn(sample), None))
    return answers


def test_samples_cover_every_object_with_an_expression_and_the_salient_object(scenes):
    samples = ullava_eval_samples(scenes)
    locate = ullava_eval_samples(scenes, ("rec",), rec_query="locate")["rec"]
    rows = [scenes[index] for index in range(len(scenes))]
    expected_objects = sum(len({e["object_index"] for e in row["referring_expressions"]}) for row in rows)
    assert len(samples["res"]) == len(samples["rec"]) == expected_objects
    assert len(samples["salient"]) == len(rows)
    for sample in samples["salient"]:
        row = rows[sample["scene"]]
        assert sample["object_index"] == row["salient_index"]
        # The salient object is the largest visible one.
        assert sample["mask"].sum() == decode_masks(row).sum(axis=(1, 2)).max()
    for res, rec, box_only in zip(samples["res"], samples["rec"], locate, strict=True):
        row = rows[res["scene"]]
        assert res["query"] == f"Can you segment and locate the {res['expression']} in this image?"
        # The paper's combined REC asks for mask and box (the fused box is scored); "locate" asks for the box only.
        assert rec["query"] == res["query"]
        assert box_only["query"] == f"Please locate the {rec['expression']} in this image."
        assert box_only["box"] == rec["box"]
        assert not res["expression"].startswith("the ")
        # The ground-truth box is the box of the ground-truth mask (pixel-edge convention).
        ys, xs = np.nonzero(res["mask"])
        assert rec["box"] == [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
        assert res["mask"].shape == (row["height"], row["width"])


def test_perfect_oracle_scores_one(monkeypatch, model, processor, scenes):
    samples = ullava_eval_samples(scenes)
    calls = _install_oracle(
        monkeypatch, model, _oracle_answers(samples, lambda s: s["mask"], lambda s: list(s["box"]))
    )
    predictions: dict = {}
    metrics = evaluate_ullava(model, processor, scenes, batch_size=4, predictions=predictions)
    assert metrics["ciou"] == pytest.approx(1.0) and metrics["giou"] == pytest.approx(1.0)
    assert metrics["prec@0.5"] == pytest.approx(1.0)
    assert metrics["salient_ciou"] == pytest.approx(1.0) and metrics["salient_giou"] == pytest.approx(1.0)
    assert metrics["res_no_mask_rate"] == 0.0 and metrics["rec_no_box_rate"] == 0.0
    # Batches of at most 4 queries, every query asked exactly once.
    assert max(calls) <= 4 and sum(calls) == sum(len(v) for v in samples.values())
    assert len(predictions["rec"]) == len(samples["rec"])
    for entry, sample in zip(predictions["rec"], samples["rec"], strict=True):
        assert entry["predicted_box"] == pytest.approx(sample["box"], abs=1e-3)
    json.dumps(predictions)


def test_cropped_masks_give_the_hand_computed_ciou_and_giou(monkeypatch, model, processor, scenes):
    samples = ullava_eval_samples(scenes, ("res",))

    def top_half(sample):
        rows = np.nonzero(sample["mask"].any(axis=1))[0]
        cut = (rows.min() + rows.max() + 1) // 2
        cropped = sample["mask"].copy()
        cropped[cut:] = False
        return cropped

    _install_oracle(monkeypatch, model, [(top_half(s), None) for s in samples["res"]])
    metrics = evaluate_ullava(model, processor, scenes, tasks=("res",), batch_size=8)
    kept = [int(top_half(s).sum()) for s in samples["res"]]
    total = [int(s["mask"].sum()) for s in samples["res"]]
    # A prediction inside the ground truth: intersection = kept pixels, union = ground-truth pixels.
    assert metrics["ciou"] == pytest.approx(sum(kept) / sum(total))
    assert metrics["giou"] == pytest.approx(np.mean([k / t for k, t in zip(kept, total, strict=True)]))
    assert 0.2 < metrics["ciou"] < 0.8
    assert set(metrics) == {"ciou", "giou", "res_no_mask_rate"}


def test_wrong_oracle_scores_zero(monkeypatch, model, processor, scenes):
    rows = [scenes[index] for index in range(len(scenes))]
    samples = ullava_eval_samples(scenes)

    def other_object(sample):
        # Instance masks of a scene never overlap, so another object's mask has IoU 0.
        masks = decode_masks(rows[sample["scene"]])
        return masks[(sample["object_index"] + 1) % len(masks)]

    def far_box(sample):
        x1, y1, x2, y2 = sample["box"]
        row = rows[sample["scene"]]
        # A box entirely in the margin of the image that the object leaves free.
        if x1 >= 4:
            return [0.0, 0.0, x1 / 2, float(row["height"])]
        return [(x2 + row["width"]) / 2, 0.0, float(row["width"]), float(row["height"])]

    _install_oracle(monkeypatch, model, _oracle_answers(samples, other_object, far_box))
    metrics = evaluate_ullava(model, processor, scenes, batch_size=16)
    assert metrics["ciou"] == 0.0 and metrics["giou"] == 0.0
    assert metrics["salient_ciou"] == 0.0
    assert metrics["prec@0.5"] == 0.0


def test_answers_without_seg_or_loc_count_as_misses(monkeypatch, model, processor, scenes):
    samples = ullava_eval_samples(scenes, ("res", "rec"))
    _install_oracle(monkeypatch, model, [(None, None)] * (len(samples["res"]) + len(samples["rec"])))
    metrics = evaluate_ullava(model, processor, scenes, tasks=("res", "rec"))
    assert metrics == {"ciou": 0.0, "giou": 0.0, "res_no_mask_rate": 1.0, "prec@0.5": 0.0, "rec_no_box_rate": 1.0}


def test_real_generation_path_gives_masks_at_the_original_size(model, processor, scenes):
    rows = [scenes[index] for index in range(2)]
    answers = generate_ullava_answers(
        model,
        processor,
        [row["image"] for row in rows],
        ["Find the salient object in the image."] * 2,
        max_new_tokens=4,
        batch_size=1,
    )
    assert len(answers) == 2
    for answer, row in zip(answers, rows, strict=True):
        assert isinstance(answer.text, str)
        assert answer.mask is None or answer.mask.shape == (row["height"], row["width"])
        for box in answer.boxes:
            assert 0 <= box[0] <= box[2] <= row["width"] and 0 <= box[1] <= box[3] <= row["height"]
    assert model.training is False


def test_bad_inputs_raise_clear_errors(model, processor, scenes):
    with pytest.raises(ValueError, match="`tasks`"):
        evaluate_ullava(model, processor, scenes, tasks=("vqa",))
    with pytest.raises(ValueError, match="`batch_size`"):
        evaluate_ullava(model, processor, scenes, batch_size=0)
    with pytest.raises(ValueError, match="`rec_query`"):
        evaluate_ullava(model, processor, scenes, tasks=("rec",), rec_query="detect")
    with pytest.raises(TypeError, match="`scenes`"):
        evaluate_ullava(model, processor, scenes[0])
    without_masks = ullava_eval_scenes(1, with_masks=False)
    with pytest.raises(ValueError, match=r"lacks \['masks'\]"):
        evaluate_ullava(model, processor, without_masks, tasks=("res",))
    with pytest.raises(ValueError, match="`queries` has 1 entries for 2 `images`"):
        generate_ullava_answers(model, processor, [scenes[0]["image"]] * 2, ["x"])


def test_checkpoint_evaluation_through_the_auto_classes(tmp_path, model, processor):
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    metrics = evaluate_ullava_checkpoint(checkpoint, tmp_path / "eval", num_samples=2)
    assert {"ciou", "giou", "prec@0.5", "salient_ciou"} <= set(metrics)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    saved = json.loads((tmp_path / "eval" / "ullava_predictions.json").read_text())
    assert set(saved) == set(ULLAVA_EVAL_TASKS) and len(saved["salient"]) == 2
    assert get_system("ullava").evaluate is evaluate_ullava_checkpoint
    with pytest.raises(ValueError, match="config.json"):
        evaluate_ullava_checkpoint(tmp_path / "missing", tmp_path / "eval")


def test_quick_demo_writes_checkpoint_card_and_pictures(tmp_path):
    messages: list[str] = []
    metrics = ullava_demo(tmp_path, messages.append, quick=True)
    for name in ("ciou", "giou", "prec@0.5", "locate_prec@0.5", "salient_ciou"):
        assert 0.0 <= metrics[f"{name}_before"] <= 1.0 and 0.0 <= metrics[f"{name}_after"] <= 1.0
    assert all(math.isfinite(value) for value in metrics.values())
    checkpoint = tmp_path / "checkpoint"
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    card = (checkpoint / "README.md").read_text()
    assert "ullava-tiny-demo" in card and "ciou" in card and f"{metrics['ciou_after']:.4f}" in card
    pictures = json.loads((tmp_path / "pictures" / "pictures.json").read_text())
    assert len(pictures) == QUICK_RECIPE.num_pictures
    for entry in pictures:
        assert (tmp_path / "pictures" / entry["picture"]).is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["ciou_after"] == metrics["ciou_after"]
    assert set(saved["losses"]) == {"align", "instruct"}
    assert any("instruct" in message for message in messages)
    assert get_system("ullava").demo is ullava_demo
