"""RegionBLIP evaluation (CIDEr-D per modality), the checkpoint `eval` hook and the demo's quick mode."""

import json

import pytest
import torch

from hf_regionmm.evaluation import regionblip_eval
from hf_regionmm.evaluation.regionblip_eval import (
    evaluate_regionblip,
    evaluate_regionblip_checkpoint,
    generate_regionblip_captions,
    regionblip_eval_examples,
)
from hf_regionmm.modeling.modeling_regionblip import RegionBlipForConditionalGeneration
from hf_regionmm.registry import get_system
from hf_regionmm.systems.regionblip import tiny_regionblip_config, tiny_regionblip_processor

MODALITIES = ("image_region", "point_cloud", "point_cloud_region")


@pytest.fixture(scope="module")
def processor():
    return tiny_regionblip_processor()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RegionBlipForConditionalGeneration(tiny_regionblip_config()).eval()


@pytest.fixture(scope="module")
def examples():
    return regionblip_eval_examples(4, seed=0, modalities=MODALITIES)


def test_eval_examples_are_held_out_and_cover_the_modalities(examples):
    assert [sum(e["modality"] == m for e in examples) for m in MODALITIES] == [4, 4, 4]
    train = regionblip_eval_examples(4, seed=0, split="train", modalities=("point_cloud",))
    test_clouds = [e["points"] for e in examples if e["modality"] == "point_cloud"]
    assert not any(
        torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a in test_clouds for b in (t["points"] for t in train)
    )


def test_oracle_captions_score_the_maximum_and_wrong_ones_zero(model, processor, examples, monkeypatch):
    monkeypatch.setattr(
        regionblip_eval,
        "generate_regionblip_captions",
        lambda model, processor, rows, **kw: [r["caption"] for r in rows],
    )
    # Distinct references per modality, so that every caption has n-grams with non-zero IDF.
    distinct = []
    for modality in MODALITIES:
        rows = [e for e in examples if e["modality"] == modality]
        seen = {}
        for row in rows:
            seen.setdefault(row["caption"], row)
        distinct += list(seen.values())[:3]
    assert all(sum(r["modality"] == m for r in distinct) >= 2 for m in MODALITIES)
    collected = []
    oracle = evaluate_regionblip(model, processor, distinct, predictions=collected)
    assert set(oracle) == {f"cider_{m}" for m in MODALITIES}
    for modality in MODALITIES:
        # CIDEr-D's maximum: each n-gram order 1-4 a caption has contributes a cosine of 1 (x 10 / 4 orders).
        lengths = [len(r["caption"].split()) for r in distinct if r["modality"] == modality]
        best = sum(10.0 * min(length, 4) / 4 for length in lengths) / len(lengths)
        assert oracle[f"cider_{modality}"] == pytest.approx(best, abs=1e-6) and best > 5
    assert [entry["prediction"] for entry in collected] == [row["caption"] for row in distinct]
    monkeypatch.setattr(
        regionblip_eval, "generate_regionblip_captions", lambda model, processor, rows, **kw: ["zebra"] * len(rows)
    )
    wrong = evaluate_regionblip(model, processor, distinct)
    assert all(value == pytest.approx(0.0, abs=1e-9) for value in wrong.values())


def test_generation_runs_greedy_and_beam_on_every_modality(model, processor, examples):
    rows = [next(e for e in examples if e["modality"] == m) for m in MODALITIES]
    greedy = generate_regionblip_captions(
        model, processor, rows, decoding="greedy", generation_kwargs={"max_new_tokens": 3}
    )
    beam = generate_regionblip_captions(
        model,
        processor,
        rows,
        decoding="beam",
        generation_kwargs={"max_new_tokens": 3, "min_new_tokens": 1, "num_beams": 2},
    )
    assert len(greedy) == len(beam) == 3 and all(isinstance(c, str) for c in greedy + beam)
    # One sample alone gets the caption it gets in a batch: batches hold one modality, prompts are left-padded.
    alone = generate_regionblip_captions(
        model, processor, rows[:1], decoding="greedy", generation_kwargs={"max_new_tokens": 3}
    )
    assert alone == greedy[:1]


def test_bad_evaluation_inputs_fail_clearly(model, processor, examples):
    with pytest.raises(ValueError, match="`modalities`"):
        evaluate_regionblip(model, processor, examples, ["video"])
    with pytest.raises(ValueError, match="lacks"):
        evaluate_regionblip(model, processor, [{"modality": "image_region", "caption": "a cube"}])
    with pytest.raises(ValueError, match="no \\['image'\\] example"):
        evaluate_regionblip(model, processor, examples, ["image"])
    with pytest.raises(ValueError, match="`decoding`"):
        generate_regionblip_captions(model, processor, examples[:1], decoding="nucleus")
    single = [next(e for e in examples if e["modality"] == "point_cloud")]
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_regionblip(model, processor, single, generation_kwargs={"max_new_tokens": 2}, decoding="greedy")


def test_checkpoint_evaluation_loads_through_the_auto_classes(model, processor, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    assert get_system("regionblip").evaluate is evaluate_regionblip_checkpoint
    metrics = evaluate_regionblip_checkpoint(
        checkpoint, tmp_path / "eval", num_samples=2, modalities=("point_cloud",), decoding="greedy",
        generation_kwargs={"max_new_tokens": 3},
    )  # fmt: skip
    assert set(metrics) == {"cider_point_cloud"} and 0.0 <= metrics["cider_point_cloud"] <= 10.0
    predictions = json.loads((tmp_path / "eval" / "regionblip_predictions.json").read_text())
    assert len(predictions) == 2 and {"modality", "references", "prediction"} <= set(predictions[0])
    with pytest.raises(ValueError, match="config.json"):
        evaluate_regionblip_checkpoint(tmp_path / "missing", tmp_path / "eval")


def test_demo_quick_mode_writes_checkpoint_card_pictures_and_metrics(tmp_path):
    messages = []
    metrics = get_system("regionblip").demo(tmp_path, messages.append, quick=True)
    for modality in MODALITIES:
        assert {f"cider_{modality}_before", f"cider_{modality}_after"} <= set(metrics)
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    card = (tmp_path / "checkpoint" / "README.md").read_text()
    assert "unfrozen" in card and "cider_point_cloud_region" in card
    pictures = json.loads((tmp_path / "pictures" / "pictures.json").read_text())
    assert pictures and all((tmp_path / "pictures" / entry["picture"]).is_file() for entry in pictures)
    assert any("unfrozen" in message for message in messages)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["unfrozen_for_the_demo"] == {"freeze_language_model": False, "freeze_qformer": False}
    assert saved["losses"] and {"loss_itc", "loss_itg", "loss_lm", "loss_reg"} <= set(saved["losses"][-1])
