"""`hf-regionmm train/eval --data FORMAT`: training and evaluation on real-format files (the fixtures of
tests/fixtures/), and `train --model DIR` chaining the paper's stages (Groma: det -> instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_regionmm import cli
from hf_regionmm.data.formats import DATA_FORMATS, load_data_format

FIXTURES = Path(__file__).parent / "fixtures"
COCO = [
    f"instances_path={FIXTURES / 'coco' / 'instances_val2017.json'}",
    f"images_dir={FIXTURES / 'coco' / 'val2017'}",
]
REFCOCO = [
    f"refs_path={FIXTURES / 'refcoco' / 'refs(unc).p'}",
    f"instances_path={FIXTURES / 'refcoco' / 'instances.json'}",
    f"images_dir={FIXTURES / 'refcoco' / 'images'}",
    "split=train",
]
VISUAL_GENOME = [
    f"region_descriptions_path={FIXTURES / 'visual_genome' / 'region_descriptions.json'}",
    f"images_dir={FIXTURES / 'visual_genome' / 'images'}",
    f"image_data_path={FIXTURES / 'visual_genome' / 'image_data.json'}",
]


def _data_arguments(name: str, options: list[str]) -> list[str]:
    return ["--data", name, *[argument for option in options for argument in ("--data-option", option)]]


def _train(output: Path, stage: str, data: list[str], *extra: str) -> None:
    argv = ["train", "groma", "--stage", stage, "--max-steps", "2", "--batch-size", "2", "--output-dir", str(output)]
    assert cli.main([*argv, *data, *extra]) == 0


def _weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {name: value for name, value in load_file(folder / "model.safetensors").items() if name.startswith(prefix)}


def test_groma_det_on_coco_then_instruct_on_refcoco_from_the_det_checkpoint(tmp_path: Path):
    det, instruct = tmp_path / "det", tmp_path / "instruct"
    _train(det, "det", _data_arguments("coco", COCO))
    _train(instruct, "instruct", _data_arguments("refcoco", REFCOCO), "--model", str(det))

    # instruct started from the det checkpoint: the proposer (frozen in instruct) is det's, bit for bit, while the
    # region encoder (trained in instruct) moved.
    det_proposer, instruct_proposer = _weights(det, "model.proposer."), _weights(instruct, "model.proposer.")
    assert det_proposer and det_proposer.keys() == instruct_proposer.keys()
    assert all(torch.equal(det_proposer[name], instruct_proposer[name]) for name in det_proposer)
    det_encoder, instruct_encoder = _weights(det, "model.region_encoder."), _weights(instruct, "model.region_encoder.")
    assert any(not torch.equal(det_encoder[name], instruct_encoder[name]) for name in det_encoder)
    # A fresh tiny model (no --model) has another proposer: det did train it.
    fresh = tmp_path / "fresh"
    _train(fresh, "instruct", _data_arguments("refcoco", REFCOCO))
    fresh_proposer = _weights(fresh, "model.proposer.")
    assert any(not torch.equal(fresh_proposer[name], det_proposer[name]) for name in det_proposer)


def test_groma_eval_runs_the_tasks_the_data_has(tmp_path: Path):
    checkpoint = tmp_path / "checkpoint"
    _train(checkpoint, "instruct", [])
    refcoco_scenes = load_data_format("refcoco", REFCOCO)
    argv = ["eval", "groma", str(checkpoint), "--output-dir", str(tmp_path / "refcoco")]
    assert cli.main([*argv, *_data_arguments("refcoco", REFCOCO)]) == 0
    metrics = json.loads((tmp_path / "refcoco" / "metrics.json").read_text())["metrics"]
    assert {"rec_acc@0.5", "ar", "region_caption_cider_d"} <= set(metrics)
    predictions = json.loads((tmp_path / "refcoco" / "groma_predictions.json").read_text())
    expressions = [e["text"] for scene in refcoco_scenes for e in scene["referring_expressions"]]
    assert [sample["expression"] for sample in predictions["rec"]] == expressions

    # Visual Genome has region descriptions only: region captioning runs, REC and grounding do not.
    argv = ["eval", "groma", str(checkpoint), "--output-dir", str(tmp_path / "vg")]
    assert cli.main([*argv, *_data_arguments("visual_genome", VISUAL_GENOME)]) == 0
    metrics = json.loads((tmp_path / "vg" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"region_caption_cider_d"}


def test_data_options_are_converted_and_checked():
    assert len(load_data_format("coco", COCO)) == 3
    assert len(load_data_format("coco", [*COCO, "max_images=1", "with_masks=false"])) == 1
    assert "masks" not in load_data_format("coco", [*COCO, "with_masks=false"]).column_names
    with pytest.raises(ValueError, match="`--data nope` is not a known data format"):
        load_data_format("nope", [])
    with pytest.raises(ValueError, match=r"`--data-option colour` is not an option of `--data coco`"):
        load_data_format("coco", [*COCO, "colour=red"])
    with pytest.raises(ValueError, match=r"`--data coco` needs --data-option images_dir=\.\.\."):
        load_data_format("coco", COCO[:1])
    with pytest.raises(ValueError, match="`--data-option max_images` takes an integer"):
        load_data_format("coco", [*COCO, "max_images=many"])
    with pytest.raises(ValueError, match="`--data-option with_masks` takes true or false"):
        load_data_format("coco", [*COCO, "with_masks=maybe"])
    with pytest.raises(ValueError, match="given twice"):
        load_data_format("coco", [*COCO, COCO[0]])
    assert set(DATA_FORMATS) >= {"coco", "refcoco", "visual_genome", "flickr30k_entities"}


def test_bad_command_lines_fail_with_a_named_error(tmp_path: Path, capsys):
    output = ["--output-dir", str(tmp_path / "out")]
    assert cli.main(["train", "groma", *output, "--data-option", "a=b"]) == 2
    assert "`--data-option` needs `--data FORMAT`" in capsys.readouterr().err
    assert cli.main(["train", "groma", *output, "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "`--model`" in error and "config.json" in error
    # A system without a real-data recipe says so.
    assert cli.main(["train", "tap", *output, *_data_arguments("coco", COCO)]) == 2
    assert "does not train on real-format data yet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "groma", *output, "--data", "nope"])
    assert not (tmp_path / "out").exists()


def test_train_takes_the_accelerator_unless_told_cpu(tmp_path: Path, monkeypatch, capsys):
    # `build_tiny_trainer` pins the CPU for the library's own tiny runs; the command line leaves the device to Trainer
    # (a GPU when there is one) and pins the CPU only with --cpu.
    from hf_regionmm.trainers import tiny_training

    built = []
    original = tiny_training.build_tiny_trainer

    def recording(*args, **kwargs):
        trainer = original(*args, **kwargs)
        built.append(trainer)
        return trainer

    monkeypatch.setattr(tiny_training, "build_tiny_trainer", recording)
    argv = ["train", "groma", "--stage", "det", "--max-steps", "1", "--batch-size", "2", "--num-samples", "2"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "default")]) == 0
    assert cli.main([*argv, "--output-dir", str(tmp_path / "cpu"), "--cpu"]) == 0
    assert [trainer.args.use_cpu for trainer in built] == [False, True]
    assert built[1].args.device.type == "cpu"
    assert f"training on {built[0].args.device}" in capsys.readouterr().out
