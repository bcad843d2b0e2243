"""README.md and the model cards stay true: the commands match CI, and every usage example runs on a tiny checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from hf_regionmm.data.synthetic import generate_3d_scenes, generate_point_clouds, generate_scenes
from hf_regionmm.hub.model_card import render_model_card
from hf_regionmm.registry import SystemSpec, get_system, registered_systems

README = Path(__file__).resolve().parents[1] / "README.md"
CI_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"
# README section title -> registered system name.
USAGE_SECTIONS = {
    "Groma": "groma",
    "u-LLaVA": "ullava",
    "TAP-v2": "tap",
    "TAP-Chat": "tap_chat",
    "RegionBLIP": "regionblip",
}


def _section_code(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#{{2,3}} )", text, re.S | re.M)
    assert match, f"README has no '### {title}' section"
    code = re.search(r"```python\n(.*?)```", match.group(1), re.S)
    assert code, f"README section {title!r} has no python example"
    return code.group(1)


def test_readme_test_command_is_what_ci_runs():
    text = README.read_text()
    command = text.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert "pip install" in command and "pytest" in command
    assert "<!-- test-command -->" in CI_SCRIPT.read_text()
    demo = text.split("<!-- demo-command -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert demo.endswith("hf-regionmm demo") and demo.split(" && hf-regionmm")[0] == command.split(" && python")[0]


def test_every_registered_system_family_has_a_usage_section():
    documented = set(USAGE_SECTIONS.values())
    families = {spec.name for spec in registered_systems()}
    assert families <= documented


def _tiny_checkpoint_and_inputs(spec: SystemSpec, folder: Path) -> Path:
    """Save the system's tiny model + processor, and the input files the examples open, under `folder`."""
    checkpoint = folder / "checkpoint"
    spec.main_model_class(spec.tiny_config()).save_pretrained(checkpoint)
    spec.tiny_processor().save_pretrained(checkpoint)
    image = generate_scenes(1, seed=3, image_size_range=(400, 480))[0]["image"]
    image.save(folder / "scene.jpg")
    for index in range(8):
        image.rotate(index * 5).save(folder / f"frame_{index}.jpg")
    np.save(folder / "object.npy", np.asarray(generate_point_clouds(1, num_points=2048)[0]["points"], np.float32))
    np.save(folder / "scene.npy", np.asarray(generate_3d_scenes(1, num_points=2048)[0]["points"], np.float32))
    return checkpoint


def _run(code: str, checkpoint: Path, where: str) -> None:
    code = re.sub(r'from_pretrained\("[^"]+"\)', f'from_pretrained("{checkpoint}")', code)
    exec(compile(code, where, "exec"), {"__name__": "usage_example"})


@pytest.mark.parametrize("title", sorted(USAGE_SECTIONS))
def test_usage_example_runs_on_a_tiny_checkpoint(title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    checkpoint = _tiny_checkpoint_and_inputs(get_system(USAGE_SECTIONS[title]), tmp_path)
    monkeypatch.chdir(tmp_path)
    _run(_section_code(title), checkpoint, f"README.md ### {title}")


CARDED = [spec for spec in registered_systems() if spec.card_template]


@pytest.mark.parametrize("spec", CARDED, ids=[spec.name for spec in CARDED])
def test_model_card_usage_example_runs_on_a_tiny_checkpoint(spec: SystemSpec, tmp_path, monkeypatch):
    checkpoint = _tiny_checkpoint_and_inputs(spec, tmp_path)
    card = render_model_card(spec.card_template, model_id=str(checkpoint))
    usage = card.text.split("## Usage", 1)[1].split("\n## ", 1)[0]
    # A card may document several heads (TAP and TAP-Chat): run the examples that load this system's main class.
    blocks = [b for b in re.findall(r"```python\n(.*?)```", usage, re.S) if spec.main_auto_class in b]
    assert blocks, f"the {spec.card_template} card has no usage example loading {spec.main_auto_class}"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        _run(block, checkpoint, f"hub_cards/{spec.card_template}.md")
