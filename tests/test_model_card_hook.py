"""Plain `model.save_pretrained` writes the system's model card (Hub publishing issue, item 1).

The push path (`model.push_to_hub` replacing transformers' generic card) runs against the local Hub server in
tests/test_hub.py::test_plain_push_to_hub_round_trip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_regionmm.modeling.model_card_hook import ModelCardHookMixin
from hf_regionmm.registry import SystemSpec, registered_systems

SYSTEMS = registered_systems()


@pytest.mark.parametrize("spec", SYSTEMS, ids=[spec.name for spec in SYSTEMS])
def test_every_registered_model_class_carries_the_card_writer(spec: SystemSpec):
    for model_class in spec.model_classes.values():
        assert issubclass(model_class, ModelCardHookMixin), model_class
        assert model_class.model_card_writer is not None, model_class


def _tiny_model(name: str):
    spec = next(spec for spec in SYSTEMS if spec.name == name)
    torch.manual_seed(0)
    return spec, spec.main_model_class(spec.tiny_config())


def test_save_pretrained_writes_the_system_card_and_keeps_an_existing_readme(tmp_path: Path):
    spec, model = _tiny_model("groma")
    model.save_pretrained(tmp_path / "fresh")
    card = ModelCard.load(tmp_path / "fresh" / "README.md")
    assert card.data.library_name == "hf_regionmm"
    assert "groma" in card.data.tags
    assert "AutoProcessor.from_pretrained" in card.text and "fresh" in card.text

    own = tmp_path / "own"
    own.mkdir()
    (own / "README.md").write_text("my notes\n")
    model.save_pretrained(own)
    assert (own / "README.md").read_text() == "my notes\n"
    assert (own / "model.safetensors").is_file()


def test_save_pretrained_off_the_main_process_writes_no_card(tmp_path: Path):
    _, model = _tiny_model("groma")
    model.save_pretrained(tmp_path, is_main_process=False)
    assert not (tmp_path / "README.md").exists()


def test_classes_without_a_writer_behave_like_transformers(tmp_path: Path, monkeypatch):
    spec, model = _tiny_model("groma")
    monkeypatch.setattr(type(model), "model_card_writer", None)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()
    assert (tmp_path / "config.json").is_file()
