"""CLI plumbing, model-card rendering and the bench harness (foundation issue, items 5 and 6)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from hf_regionmm import cli
from hf_regionmm.hub.model_card import available_card_templates, render_model_card, write_model_card

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import compare, write_results  # noqa: E402


def test_every_card_template_renders_with_model_index():
    assert "groma" in available_card_templates()
    for system in available_card_templates():
        card = render_model_card(system, model_id=f"org/{system}-tiny", eval_results={"rec_acc@0.5": 0.625})
        parsed = ModelCard(str(card))
        assert parsed.data.library_name == "hf_regionmm"
        assert "transformers" in parsed.data.tags
        result = parsed.data.eval_results[0]
        assert (result.metric_type, result.metric_value) == ("rec_acc@0.5", 0.625)
        assert f"org/{system}-tiny" in card.text and "| rec_acc@0.5 | 0.6250 |" in card.text


def test_card_command_writes_readme_from_eval_json(tmp_path: Path):
    checkpoint = tmp_path / "groma-tiny"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"metrics": {"ar": 0.5, "note": "not a number"}}))
    assert cli.main(["card", "groma", str(checkpoint), "--eval-json", str(eval_json), "--model-id", "org/g"]) == 0
    front_matter = (checkpoint / "README.md").read_text().split("---")[1]
    metadata = yaml.safe_load(front_matter)
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5


def test_card_errors_name_the_argument(tmp_path: Path):
    with pytest.raises(ValueError, match="`directory`"):
        write_model_card(tmp_path, "groma")
    with pytest.raises(ValueError, match="No model-card template for 'nope'"):
        render_model_card("nope", model_id="x")
    with pytest.raises(TypeError, match=r"`eval_results\['a'\]`"):
        render_model_card("groma", model_id="x", eval_results={"a": "high"})


def test_cli_reports_unknown_system_cleanly(capsys):
    assert cli.main(["eval", "no-such-system", "ckpt"]) == 2
    assert "Unknown system 'no-such-system'" in capsys.readouterr().err


def test_bench_compare_measures_a_known_ratio(tmp_path: Path):
    import time

    result = compare(
        "sleep", lambda: time.sleep(0.002), lambda: time.sleep(0.004), ours_label="2ms", peer_label="4ms", repeats=5
    )
    assert 0.3 < result.ratio < 0.8
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\noutro\n")
    table = write_results([result], tmp_path / "out", readme)
    text = readme.read_text()
    assert "old" not in text and "| sleep | 2ms | 4ms |" in text and text.endswith("outro\n")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["comparisons"][0]["name"] == "sleep"
    assert table in text


def test_convert_options_are_checked_against_the_converter_signature():
    def converter(source: str, destination: str, *, blip2: str | None = None, model_type: str | None = None) -> None:
        raise AssertionError("not called")

    assert cli._converter_options(converter, ["blip2=some/dir", "model_type=vit-l"]) == {
        "blip2": "some/dir",
        "model_type": "vit-l",
    }
    assert cli._converter_options(converter, []) == {}
    with pytest.raises(ValueError, match=r"`--option colour` is not an option of this converter; it takes \['blip2'"):
        cli._converter_options(converter, ["colour=red"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        cli._converter_options(converter, ["blip2"])
