"""The shared contract every registered system meets (foundation issue, item 3).

Parametrised over `hf_regionmm.registry.registered_systems()`: a system issue that registers a spec is covered here
without touching this file. Each test builds the system's tiny config, so the whole file stays CPU-fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, set_seed

import hf_regionmm
from hf_regionmm.registry import SystemSpec, registered_systems
from hf_regionmm.trainers.tiny_training import build_tiny_trainer

SYSTEMS = registered_systems()
TRAINABLE_SYSTEMS = [spec for spec in SYSTEMS if spec.training is not None]
REPO_ROOT = Path(__file__).resolve().parents[1]


def _ids(specs: list[SystemSpec]) -> list[str]:
    return [spec.name for spec in specs]


def _build(spec: SystemSpec, seed: int = 0):
    set_seed(seed)
    config = spec.tiny_config()
    model = spec.main_model_class(config)
    model.eval()
    return config, model, spec.tiny_processor()


def _tensor_items(outputs) -> dict[str, torch.Tensor]:
    return {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor)}


def test_registry_is_not_empty():
    assert SYSTEMS, "import hf_regionmm registered no system"


def test_import_registers_every_model_type_in_a_fresh_process():
    # A fresh interpreter proves that `import hf_regionmm` alone does the registration (no test-side side effects).
    code = (
        "import json, hf_regionmm, transformers\n"
        "from hf_regionmm.registry import registered_systems\n"
        "out = {}\n"
        "for s in registered_systems():\n"
        "    for c in (s.config_class, *s.extra_configs):\n"
        "        out[c.model_type] = type(transformers.AutoConfig.for_model(c.model_type)).__name__\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    resolved = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {c.model_type: c.__name__ for s in SYSTEMS for c in (s.config_class, *s.extra_configs)}
    assert resolved == expected


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_auto_classes_resolve(spec: SystemSpec):
    config = spec.tiny_config()
    assert isinstance(AutoConfig.for_model(spec.config_class.model_type), spec.config_class)
    for auto_name, model_class in spec.model_classes.items():
        auto_class = getattr(__import__("transformers"), auto_name)
        assert auto_class._model_mapping[spec.config_class] is model_class
    assert hf_regionmm.__version__
    assert config.model_type == spec.config_class.model_type


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_save_and_reload_through_auto_classes(spec: SystemSpec, tmp_path: Path):
    config, model, processor = _build(spec)
    inputs = spec.example_inputs(processor, config)
    with torch.no_grad():
        expected = _tensor_items(model(**inputs))

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    weight_files = sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    assert weight_files and all(name.endswith(".safetensors") for name in weight_files), weight_files

    reloaded = spec.auto_model_class.from_pretrained(tmp_path)
    assert type(reloaded) is spec.main_model_class
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded_processor) is type(processor)

    reloaded_inputs = spec.example_inputs(reloaded_processor, reloaded.config)
    assert inputs.keys() == reloaded_inputs.keys()
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(reloaded_inputs[key], value, rtol=0, atol=0, msg=f"processor output {key}")
    with torch.no_grad():
        actual = _tensor_items(reloaded(**reloaded_inputs))
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"model output {key}")

    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is spec.model_classes.get("AutoModel", spec.main_model_class)


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_gradients_reach_every_trainable_parameter(spec: SystemSpec):
    config, model, processor = _build(spec)
    model.train()
    outputs = model(**spec.example_inputs(processor, config))
    assert outputs.loss is not None and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    missing = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
        and not any(pattern in name for pattern in spec.frozen_parameter_patterns)
        and (parameter.grad is None or not torch.isfinite(parameter.grad).all())
    ]
    assert not missing, f"no finite gradient reached {missing}"


@pytest.mark.parametrize("spec", [s for s in SYSTEMS if s.generates], ids=_ids([s for s in SYSTEMS if s.generates]))
def test_generate_with_and_without_cache_agree(spec: SystemSpec):
    config, model, processor = _build(spec)
    inputs = spec.generation_inputs(processor, config)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert cached.shape[1] > prompt_length
    torch.testing.assert_close(cached, uncached)


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_bad_inputs_raise_clear_errors(spec: SystemSpec):
    cases = spec.bad_inputs()
    assert cases, f"{spec.name} declares no bad-input cases"
    config, model, processor = _build(spec)
    for case in cases:
        with pytest.raises(case.error, match=case.match):
            case.call(model, processor)


# ---- training: resume equals an uninterrupted run; two CPU processes equal one at the same global batch ----------


def _train_losses(
    spec: SystemSpec,
    output_dir: Path,
    *,
    max_steps: int,
    save_steps: int | None = None,
    resume_from: str | None = None,
) -> dict[int, float]:
    trainer = build_tiny_trainer(spec, output_dir, max_steps=max_steps, save_steps=save_steps)
    trainer.train(resume_from_checkpoint=resume_from)
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("spec", TRAINABLE_SYSTEMS, ids=_ids(TRAINABLE_SYSTEMS))
def test_resume_from_checkpoint_matches_uninterrupted_run(spec: SystemSpec, tmp_path: Path):
    uninterrupted = _train_losses(spec, tmp_path / "full", max_steps=4)
    _train_losses(spec, tmp_path / "interrupted", max_steps=4, save_steps=2)
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() or any(checkpoint.glob("*.safetensors"))
    resumed = _train_losses(spec, tmp_path / "interrupted", max_steps=4, resume_from=str(checkpoint))
    assert sorted(uninterrupted) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), (step, resumed, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("spec", TRAINABLE_SYSTEMS[:1], ids=_ids(TRAINABLE_SYSTEMS[:1]))
def test_two_cpu_processes_match_one_process_at_the_same_global_batch(spec: SystemSpec, tmp_path: Path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless MPI is installed (accelerate routes --cpu
    # to its simple launcher; MULTI_CPU needs torchrun's or MPI's rank variables). The torchrun launcher with the
    # Trainer's use_cpu=True gives the real thing: two CPU processes, gloo, DistributedDataParallel.
    script = REPO_ROOT / "tests" / "accelerate_train_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    single = tmp_path / "single.json"
    subprocess.run(
        [sys.executable, str(script), "--system", spec.name, "--batch-size", "2", "--output", str(single)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    double = tmp_path / "double.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29517",
            str(script),
            "--system",
            spec.name,
            "--batch-size",
            "1",
            "--output",
            str(double),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    one, two = json.loads(single.read_text()), json.loads(double.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-5)
    assert one["terms"] and two["terms"].keys() == one["terms"].keys()
    for name, values in one["terms"].items():
        assert two["terms"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
