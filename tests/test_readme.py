"""README.md stays true: its commands match CI, and each system's usage example runs on a tiny checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from hf_regionmm.data.synthetic import generate_point_clouds, generate_scenes
from hf_regionmm.registry import get_system, registered_systems

README = Path(__file__).resolve().parents[1] / "README.md"
CI_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"
# README section title -> registered system name.
USAGE_SECTIONS = {"Groma": "groma", "u-LLaVA": "ullava", "TAP-v2": "tap", "RegionBLIP": "regionblip"}


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
    families = {spec.name for spec in registered_systems()} - {"tap_chat"}  # TAP-Chat is described under TAP-v2
    assert families <= documented


@pytest.mark.parametrize("title", sorted(USAGE_SECTIONS))
def test_usage_example_runs_on_a_tiny_checkpoint(title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = get_system(USAGE_SECTIONS[title])
    checkpoint = tmp_path / "checkpoint"
    spec.main_model_class(spec.tiny_config()).save_pretrained(checkpoint)
    spec.tiny_processor().save_pretrained(checkpoint)
    generate_scenes(1, seed=3, image_size_range=(256, 320))[0]["image"].save(tmp_path / "scene.jpg")
    np.save(tmp_path / "object.npy", np.asarray(generate_point_clouds(1, num_points=2048)[0]["points"], np.float32))
    code = re.sub(r'from_pretrained\("[^"]+"\)', f'from_pretrained("{checkpoint}")', _section_code(title))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md ### {title}", "exec"), {"__name__": "readme_example"})
