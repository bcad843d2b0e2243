"""Hub publishing against a local Hub server (Hub publishing issue, items 2-6).

`tests/hub_server.py` serves the Hub HTTP API on 127.0.0.1 for the whole module. `huggingface_hub` reads
`HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_DISABLE_XET` when it is imported, so everything that talks to the server through
transformers runs in fresh processes started with that environment. They are batched to keep the file fast: one
process publishes every registered system (plain `push_to_hub`, `hf_regionmm.hub.publish`, remote code, a LoRA
adapter or the system's own per-modality adapters, `hf-regionmm release`) and saves the outputs computed before the push; one fresh process loads everything
back with `hf_regionmm` installed; one loads the remote-code repositories where `hf_regionmm` cannot be imported.
The parametrised tests below then check each system's part of those reports, so a new system is covered as soon as
it is registered. The child functions (`_child_*`) run from their source in the subprocess; they import what they use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hf_regionmm import cli
from hf_regionmm.hub import publish
from hf_regionmm.registry import SystemSpec, registered_systems

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub, git_blob_oid  # noqa: E402

SYSTEMS = registered_systems()
LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj)"
CHILD_TIMEOUT_S = 420


def _ids(specs: list[SystemSpec]) -> list[str]:
    return [spec.name for spec in specs]


def _takes_a_new_lora_on_its_llm(spec: SystemSpec) -> bool:
    """Whether the system has an LLM LoRA can target and no adapters of its own (those are tested with the system)."""
    try:
        # The meta device builds the tiny model without allocating weights: milliseconds at collection.
        with torch.device("meta"):
            model = spec.main_model_class(spec.tiny_config())
    except Exception:  # noqa: BLE001  (a model that cannot be built on meta is built for real)
        model = spec.main_model_class(spec.tiny_config())
    names = [name for name, _ in model.named_modules()]
    has_own_adapters = bool(getattr(model, "peft_config", None)) or any("lora_" in name for name in names)
    return not has_own_adapters and any(re.fullmatch(LORA_TARGETS, name) for name in names)


ADAPTER_SYSTEMS = [spec for spec in SYSTEMS if _takes_a_new_lora_on_its_llm(spec)]
# Systems with one LoRA adapter per modality of their own (RegionBLIP), published with `push_modality_adapters_to_hub`.
MODALITY_ADAPTER_SYSTEMS = [spec for spec in SYSTEMS if hasattr(spec.main_model_class, "save_modality_adapter")]


def _repos(name: str) -> dict[str, str]:
    return {
        "plain": f"org/{name}-tiny",
        "published": f"org/{name}-tiny-published",
        "code": f"org/{name}-tiny-code",
        "interrupted": f"org/{name}-tiny-interrupted",
        "adapter": f"org/{name}-tiny-lora",
        "modality_adapters": f"org/{name}-tiny-modality-lora",
        "release": f"org/{name}-release",
    }


# ---- children: run from source in fresh processes ----------------------------------------------------------------
# `_run_child` sends the source of the helpers below plus one `_child_*` function to a fresh interpreter.


def _flatten(mapping, prefix):
    """Tensors and lists of tensors of `mapping` as flat safetensors entries `prefix/name[/i]` + a layout for lists."""
    import torch

    tensors, layout = {}, {}
    for name, value in mapping.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}/{name}"] = value.detach().contiguous()
        elif isinstance(value, list | tuple) and value and all(isinstance(v, torch.Tensor | None) for v in value):
            layout[f"{prefix}/{name}"] = str(len(value))
            for index, item in enumerate(value):
                if item is not None:
                    tensors[f"{prefix}/{name}/{index}"] = item.detach().contiguous()
    return tensors, layout


def _unflatten(tensors, layout, prefix):
    """Inverse of `_flatten` for one prefix: the model inputs a remote-code process feeds without hf_regionmm."""
    values = {
        key.split("/")[1]: value
        for key, value in tensors.items()
        if key.count("/") == 1 and key.startswith(prefix + "/")
    }
    for key, length in layout.items():
        if key.startswith(prefix + "/"):
            values[key.split("/")[1]] = [tensors.get(f"{key}/{index}") for index in range(int(length))]
    return values


def _compare(model, inputs, reference, prefix):
    """Run `model` and compare its tensor outputs bit for bit with the reference entries under `prefix`."""
    import torch

    with torch.no_grad():
        actual, _ = _flatten(model(**inputs), prefix)
    expected = {key: value for key, value in reference.items() if key.startswith(prefix + "/")}
    return {
        "keys_match": sorted(actual) == sorted(expected),
        "equal": {key: bool(torch.equal(actual[key], value)) for key, value in expected.items() if key in actual},
    }


def _child_publish(plan_path: str) -> None:
    """Publish every system in every way, saving the inputs and outputs computed before the push."""
    import json
    import traceback
    from pathlib import Path

    import numpy as np
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import set_seed

    from hf_regionmm import cli
    from hf_regionmm.data.synthetic import generate_scenes
    from hf_regionmm.hub import publish
    from hf_regionmm.registry import get_system

    plan = json.loads(Path(plan_path).read_text())
    report = {}

    for name, job in plan["systems"].items():
        entry = report[name] = {}
        try:
            spec = get_system(name)
            repos, folder = job["repos"], Path(job["folder"])
            set_seed(0)
            config = spec.tiny_config()
            model = spec.main_model_class(config).eval()
            processor = spec.tiny_processor()
            inputs = spec.example_inputs(processor, config)
            reference, layout = _flatten(inputs, "input")
            with torch.no_grad():
                outputs, output_layout = _flatten(model(**inputs), "output")
            reference.update(outputs)
            layout.update(output_layout)
            entry["inputs_not_saved"] = sorted(set(inputs) - {key.split("/")[1] for key in [*reference, *layout]})

            # What the remote-code process feeds the processor parts: a synthetic picture and a phrase.
            image = generate_scenes(1, seed=3, image_size_range=(96, 96), with_masks=False)[0]["image"]
            reference["raw_image"] = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
            if getattr(processor, "image_processor", None) is not None:
                pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
                reference["image_processor/pixel_values"] = pixels.contiguous()
            if getattr(processor, "tokenizer", None) is not None:
                reference["tokenizer/input_ids"] = torch.tensor(processor.tokenizer("a red circle")["input_ids"])

            # 1. Plain transformers pushes.
            model.push_to_hub(repos["plain"])
            processor.push_to_hub(repos["plain"])

            # 2. hf_regionmm's publication: card, one commit; then re-published sharded into the same repo.
            publish.push_to_hub(model, processor, repos["published"], eval_results={"smoke": 1.0})
            sizes = [p.numel() * p.element_size() for p in model.state_dict().values()]
            entry["max_shard_size"] = max(sum(sizes) // 3, max(sizes))
            publish.push_to_hub(model, processor, repos["published"], max_shard_size=entry["max_shard_size"])

            # 3. Remote code, and the same publication failing at its commit.
            publish.push_to_hub_with_code(model, processor, repos["code"])
            try:
                publish.push_to_hub_with_code(model, processor, repos["interrupted"])
                entry["interrupted_error"] = None
            except Exception as error:  # noqa: BLE001
                entry["interrupted_error"] = type(error).__name__

            # 4. `hf-regionmm release` of a saved checkpoint, with code.
            checkpoint = folder / "checkpoint"
            model.save_pretrained(checkpoint)
            processor.save_pretrained(checkpoint)
            eval_json = folder / "eval.json"
            eval_json.write_text(json.dumps({"metrics": job["release_metrics"]}))
            entry["release_exit_code"] = cli.main(
                ["release", name, str(checkpoint), repos["release"], "--with-code", "--eval-json", str(eval_json)]
            )

            # 5. A short LoRA fine-tune of the LLM, published as a PEFT adapter of the plain repo.
            if job["lora"]:
                model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=job["lora_targets"]))
                lora_parameters = [p for n, p in model.named_parameters() if "lora_" in n]
                entry["lora_parameters"] = sum(p.numel() for p in lora_parameters)
                optimizer = torch.optim.SGD(lora_parameters, lr=0.5)
                model.train()
                for _ in range(2):
                    model(**inputs).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
                model.eval()
                with torch.no_grad():
                    adapted, adapted_layout = _flatten(model(**inputs), "adapted")
                reference.update(adapted)
                layout.update(adapted_layout)
                publish.push_adapter_to_hub(model, repos["adapter"], base_model=repos["plain"])

            # 6. The system's own per-modality LoRA: the example inputs are image-region ones, so perturbing that
            #    modality's adapters changes the outputs; all modalities go to one repo on top of the plain one.
            if job["modality_adapters"]:
                generator = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for parameter_name, parameter in model.named_parameters():
                        if ".lora_B.image_region." in parameter_name:
                            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
                    adapted, adapted_layout = _flatten(model(**inputs), "modality_adapted")
                reference.update(adapted)
                layout.update(adapted_layout)
                commit = publish.push_modality_adapters_to_hub(
                    model, repos["modality_adapters"], base_model=repos["plain"]
                )
                entry["modality_adapters_commit"] = commit.oid

            save_file(reference, str(folder / "reference.safetensors"), metadata=layout)
        except Exception:  # noqa: BLE001  (reported per system; the other systems still run)
            entry["error"] = traceback.format_exc()
    Path(plan["report"]).write_text(json.dumps(report))


def _child_load_with_library(plan_path: str) -> None:
    """Load every published repo back in a fresh process through the Auto classes and compare with the reference."""
    import json
    import traceback
    from pathlib import Path

    import torch
    from huggingface_hub import HfApi, ModelCard, snapshot_download
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    import hf_regionmm  # noqa: F401
    from hf_regionmm.registry import get_system

    plan = json.loads(Path(plan_path).read_text())
    api = HfApi()
    report = {}

    def card_summary(repo_id):
        card = ModelCard.load(repo_id)
        card.validate()  # the server's /api/validate-yaml, as on the Hub
        data = card.data
        return {
            "library_name": data.library_name,
            "tags": data.tags or [],
            "eval": {r.metric_type: r.metric_value for r in (data.eval_results or [])},
            "text": card.text,
        }

    for name, job in plan["systems"].items():
        entry = report[name] = {}
        try:
            spec = get_system(name)
            repos = job["repos"]
            reference_path = str(Path(job["folder"]) / "reference.safetensors")
            reference = load_file(reference_path)
            with safe_open(reference_path, "pt") as handle:
                layout = handle.metadata() or {}
            reference_inputs = _unflatten(reference, layout, "input")

            # Plain push: Auto classes, processor round trip, outputs, card.
            model = spec.auto_model_class.from_pretrained(repos["plain"]).eval()
            processor = AutoProcessor.from_pretrained(repos["plain"])
            entry["plain_classes"] = [type(model).__name__, type(processor).__name__]
            inputs = spec.example_inputs(processor, model.config)
            entry["plain_inputs_equal"] = {
                key: bool(torch.equal(inputs[key], value))
                for key, value in reference_inputs.items()
                if isinstance(value, torch.Tensor)
            }
            entry["plain"] = _compare(model, inputs, reference, "output")
            entry["plain_card"] = card_summary(repos["plain"])

            # hf_regionmm publication, re-published sharded.
            sharded = spec.auto_model_class.from_pretrained(repos["published"]).eval()
            entry["published"] = _compare(sharded, inputs, reference, "output")
            entry["published_card"] = card_summary(repos["published"])
            info = api.model_info(repos["published"])
            entry["published_files"] = sorted(s.rfilename for s in info.siblings)
            entry["published_lfs"] = sorted(s.rfilename for s in info.siblings if s.lfs is not None)
            snapshot = Path(snapshot_download(repos["published"]))
            index = json.loads((snapshot / "model.safetensors.index.json").read_text())
            entry["index_shards"] = sorted(set(index["weight_map"].values()))
            entry["snapshot_files"] = sorted(p.name for p in snapshot.iterdir())

            # The code repo, loaded where hf_regionmm IS installed: the library's own classes win.
            with_library = spec.auto_model_class.from_pretrained(repos["code"]).eval()
            entry["code_repo_class_module"] = type(with_library).__module__
            entry["code_card"] = card_summary(repos["code"])

            # Release.
            released = spec.auto_model_class.from_pretrained(repos["release"]).eval()
            entry["release"] = _compare(released, inputs, reference, "output")
            entry["release_card"] = card_summary(repos["release"])
            entry["release_files"] = sorted(api.list_repo_files(repos["release"]))

            # Adapter: from the adapter repo alone (base resolved from adapter_config.json), and load_adapter.
            if job["lora"]:
                entry["adapter_files"] = sorted(api.list_repo_files(repos["adapter"]))
                adapter_config = Path(api.hf_hub_download(repos["adapter"], "adapter_config.json"))
                entry["adapter_base"] = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
                entry["adapter_card"] = card_summary(repos["adapter"])
                adapted = spec.auto_model_class.from_pretrained(repos["adapter"]).eval()
                entry["adapter_from_repo"] = _compare(adapted, inputs, reference, "adapted")
                model.load_adapter(repos["adapter"])
                entry["adapter_loaded_on_base"] = _compare(model.eval(), inputs, reference, "adapted")
                entry["adapter_changes_outputs"] = not torch.equal(
                    reference["adapted/logits"], reference["output/logits"]
                )

            # Per-modality adapters: every modality onto a fresh base, then only image_region at the pushed commit.
            if job["modality_adapters"]:
                from hf_regionmm.hub import publish

                repo = repos["modality_adapters"]
                entry["modality_adapter_files"] = sorted(api.list_repo_files(repo))
                entry["modality_adapter_bases"] = {
                    path: json.loads(Path(api.hf_hub_download(repo, path)).read_text())["base_model_name_or_path"]
                    for path in entry["modality_adapter_files"]
                    if path.endswith("adapter_config.json")
                }
                entry["modality_adapter_card"] = card_summary(repo)
                base = spec.auto_model_class.from_pretrained(repos["plain"]).eval()
                entry["modality_base"] = _compare(base, inputs, reference, "output")
                entry["modalities_loaded"] = publish.load_modality_adapters_from_hub(base, repo)
                entry["modality_adapters"] = _compare(base, inputs, reference, "modality_adapted")
                entry["modality_adapters_revision"] = api.model_info(repo).sha
                only_region = spec.auto_model_class.from_pretrained(repos["plain"]).eval()
                entry["modalities_loaded_at_revision"] = publish.load_modality_adapters_from_hub(
                    only_region, repo, ["image_region"], revision=entry["modality_adapters_revision"]
                )
                entry["modality_adapters_at_revision"] = _compare(only_region, inputs, reference, "modality_adapted")
                entry["modality_adapters_change_outputs"] = not torch.equal(
                    reference["modality_adapted/logits"], reference["output/logits"]
                )
        except Exception:  # noqa: BLE001
            entry["error"] = traceback.format_exc()
    Path(plan["report"]).write_text(json.dumps(report))


def _child_load_remote_code(plan_path: str) -> None:
    """Load the remote-code repos with `trust_remote_code=True` in a process that cannot import hf_regionmm."""
    import json
    import sys
    import traceback
    from pathlib import Path

    try:
        import hf_regionmm  # noqa: F401

        library_importable = True
    except ImportError:
        library_importable = False

    import numpy as np
    import PIL.Image
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    plan = json.loads(Path(plan_path).read_text())
    report = {"library_importable": library_importable}

    for name, job in plan["systems"].items():
        entry = report[name] = {}
        try:
            repos = job["repos"]
            auto_class = getattr(transformers, job["main_auto_class"])
            reference_path = str(Path(job["folder"]) / "reference.safetensors")
            reference = load_file(reference_path)
            with safe_open(reference_path, "pt") as handle:
                layout = handle.metadata() or {}
            inputs = _unflatten(reference, layout, "input")
            for kind in ("code", "release"):
                model = auto_class.from_pretrained(repos[kind], trust_remote_code=True).eval()
                entry[kind] = {
                    "module": type(model).__module__,
                    "class": type(model).__name__,
                    **_compare(model, inputs, reference, "output"),
                }
            processor = AutoProcessor.from_pretrained(repos["code"], trust_remote_code=True)
            entry["processor"] = {"module": type(processor).__module__, "class": type(processor).__name__}
            if "image_processor/pixel_values" in reference:
                image = PIL.Image.fromarray(np.asarray(reference["raw_image"]))
                pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
                entry["image_processor_module"] = type(processor.image_processor).__module__
                entry["pixel_values_equal"] = bool(torch.equal(pixels, reference["image_processor/pixel_values"]))
            if "tokenizer/input_ids" in reference:
                ids = torch.tensor(processor.tokenizer("a red circle")["input_ids"])
                entry["token_ids_equal"] = bool(torch.equal(ids, reference["tokenizer/input_ids"]))
            try:
                auto_class.from_pretrained(repos["code"], trust_remote_code=False)
                entry["refused_without_trust"] = False
            except ValueError as error:
                entry["refused_without_trust"] = "trust_remote_code" in str(error)
        except Exception:  # noqa: BLE001
            entry["error"] = traceback.format_exc()
    report["library_modules_loaded"] = sorted(
        name for name in sys.modules if name == "hf_regionmm" or name.startswith("hf_regionmm.")
    )
    Path(plan["report"]).write_text(json.dumps(report))


# Installed before anything else runs: the editable install's finder (a `.pth` meta-path hook) and any sys.path entry
# would otherwise find hf_regionmm, so a finder at the front of sys.meta_path refuses it outright.
_BLOCK_LIBRARY = """
import importlib.abc, sys
class _BlockHfRegionmm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_regionmm" or name.startswith("hf_regionmm."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the remote-code test)", name=name)
        return None
sys.meta_path.insert(0, _BlockHfRegionmm())
"""


def _run_children(
    jobs: list[tuple[Any, bool]], plan: dict[str, Any], workdir: Path, env: dict[str, str]
) -> list[dict[str, Any]]:
    """Run `(child_function, block_library)` jobs in concurrent fresh interpreters; return their reports in order."""
    helpers = "\n".join(inspect.getsource(helper) for helper in (_flatten, _unflatten, _compare))
    running = []
    for function, block_library in jobs:
        name = function.__name__
        plan_path, report_path = workdir / f"{name}.plan.json", workdir / f"{name}.report.json"
        plan_path.write_text(json.dumps({**plan, "report": str(report_path)}))
        code = (_BLOCK_LIBRARY if block_library else "") + helpers + "\n" + inspect.getsource(function)
        code += f"\n{name}({str(plan_path)!r})\n"
        log = (workdir / f"{name}.log").open("w")
        # cwd is a scratch folder, so the repository root is not on sys.path of the child.
        process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=workdir, stdout=log, stderr=log)
        running.append((name, process, report_path, log))
    returncodes = []
    for _, process, _, log in running:
        try:
            returncodes.append(process.wait(timeout=CHILD_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            process.kill()
            returncodes.append(process.wait())
        log.close()
    reports = []
    for (name, _, report_path, _), returncode in zip(running, returncodes, strict=True):
        if returncode != 0 or not report_path.is_file():
            output = (workdir / f"{name}.log").read_text()
            raise AssertionError(f"{name} exited with {returncode}:\n{output[-8000:]}")
        reports.append(json.loads(report_path.read_text()))
    return reports


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub():
    server = LocalHub(fail_commits_for=[_repos(spec.name)["interrupted"] for spec in SYSTEMS])
    with server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def child_env(hub: LocalHub, workdir: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environment.pop("TRANSFORMERS_OFFLINE", None)
    environment.pop("PYTHONPATH", None)
    environment.update(hub.client_environment(str(workdir / "hf_home")))
    environment.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""})
    return environment


@pytest.fixture(scope="module")
def plan(workdir: Path) -> dict[str, Any]:
    systems = {}
    for spec in SYSTEMS:
        folder = workdir / spec.name
        folder.mkdir(exist_ok=True)
        systems[spec.name] = {
            "repos": _repos(spec.name),
            "folder": str(folder),
            "main_auto_class": spec.main_auto_class,
            "lora": spec in ADAPTER_SYSTEMS,
            "lora_targets": LORA_TARGETS,
            "modality_adapters": spec in MODALITY_ADAPTER_SYSTEMS,
            "release_metrics": {"rec_acc@0.5": 0.625, "ar": 0.5},
        }
    return {"systems": systems}


@pytest.fixture(scope="module")
def published(plan, workdir, child_env) -> dict[str, Any]:
    return _run_children([(_child_publish, False)], plan, workdir, child_env)[0]


@pytest.fixture(scope="module")
def reloaded(published, plan, workdir, child_env) -> tuple[dict[str, Any], dict[str, Any]]:
    # The two loading processes only read the server, so they run side by side.
    jobs = [(_child_load_with_library, False), (_child_load_remote_code, True)]
    library_report, remote_report = _run_children(jobs, plan, workdir, child_env)
    return library_report, remote_report


@pytest.fixture(scope="module")
def loaded(reloaded) -> dict[str, Any]:
    return reloaded[0]


@pytest.fixture(scope="module")
def loaded_remote(reloaded) -> dict[str, Any]:
    return reloaded[1]


def _entry(report: dict[str, Any], name: str) -> dict[str, Any]:
    entry = report[name]
    assert "error" not in entry, entry["error"]
    return entry


def _all_equal(comparison: dict[str, Any]) -> None:
    assert comparison["keys_match"], comparison
    assert comparison["equal"] and all(comparison["equal"].values()), comparison["equal"]


# ---- the local Hub itself (in-process client pointed at it explicitly) -----------------------------------------


@pytest.fixture
def api(hub: LocalHub, monkeypatch) -> HfApi:
    # This process imported huggingface_hub long ago: pass the endpoint explicitly and make sure an offline setting
    # or an installed hf_xet (which the local Hub does not speak) does not get in the way.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    return HfApi(endpoint=hub.endpoint, token=hub.token)


def test_local_hub_commits_regular_and_lfs_files_and_serves_them(api: HfApi, hub: LocalHub, tmp_path: Path):
    repo_id = api.create_repo("unit/files").repo_id
    assert repo_id == "unit/files"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("unit/files")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("unit/files", exist_ok=True).repo_id == "unit/files"

    weights = bytes(range(256)) * 40
    api.create_commit(
        repo_id,
        [
            CommitOperationAdd(path_in_repo="config.json", path_or_fileobj=b'{"a": 1}'),
            CommitOperationAdd(path_in_repo="sub/model.safetensors", path_or_fileobj=weights),
        ],
        commit_message="add files",
    )
    info = api.model_info(repo_id)
    siblings = {s.rfilename: s for s in info.siblings}
    assert sorted(siblings) == [".gitattributes", "config.json", "sub/model.safetensors"]
    assert siblings["config.json"].lfs is None and siblings["config.json"].blob_id == git_blob_oid(b'{"a": 1}')
    assert siblings["sub/model.safetensors"].lfs.size == len(weights)
    assert info.sha == hub.commits(repo_id)[-1]["oid"]
    assert sorted(api.list_repo_files(repo_id)) == sorted(siblings)

    downloaded = hf_hub_download(repo_id, "sub/model.safetensors", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert Path(downloaded).read_bytes() == weights
    config = hf_hub_download(repo_id, "config.json", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert json.loads(Path(config).read_text()) == {"a": 1}

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json", endpoint=hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="nope", endpoint=hub.endpoint, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("unit/does-not-exist")


def test_local_hub_commits_are_atomic_and_checked(api: HfApi, hub: LocalHub):
    repo_id = api.create_repo("unit/atomic").repo_id
    first = api.create_commit(
        repo_id, [CommitOperationAdd(path_in_repo="a.txt", path_or_fileobj=b"one")], commit_message="one"
    )
    before = hub.files(repo_id)

    # A commit prepared against an older head is refused (parent_commit), and changes nothing.
    api.create_commit(
        repo_id, [CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"two")], commit_message="two"
    )
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo="c.txt", path_or_fileobj=b"three")],
            commit_message="stale",
            parent_commit=first.oid,
        )
    assert stale.value.response.status_code == 412
    # Deleting a missing file fails the whole commit: the addition next to it is not applied either.
    with pytest.raises(EntryNotFoundError):
        api.create_commit(
            repo_id,
            [
                CommitOperationAdd(path_in_repo="d.txt", path_or_fileobj=b"four"),
                CommitOperationDelete(path_in_repo="not-there.txt"),
            ],
            commit_message="half",
        )
    assert sorted(hub.files(repo_id)) == sorted([*before, "b.txt"])
    assert [c["summary"] for c in hub.commits(repo_id)] == ["initial commit", "one", "two"]

    # README metadata is validated before anything is uploaded, as on the Hub.
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=b"---\ntags: 3\n---\n# x\n")],
            commit_message="bad card",
        )
    # Writes need the token.
    with pytest.raises(HfHubHTTPError) as unauthorized:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo("unit/other")
    assert unauthorized.value.response.status_code == 401


# ---- round trips through the server, one batch of fresh processes for all systems --------------------------------


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_plain_push_to_hub_round_trip(spec: SystemSpec, published, loaded, hub: LocalHub):
    _entry(published, spec.name)
    entry = _entry(loaded, spec.name)
    assert entry["plain_classes"] == [spec.main_model_class.__name__, spec.processor_class.__name__]
    assert entry["plain_inputs_equal"] and all(entry["plain_inputs_equal"].values()), entry["plain_inputs_equal"]
    _all_equal(entry["plain"])
    # A plain transformers push publishes the system's card (modeling/model_card_hook.py), not transformers' generic
    # one, and the processor's push after it keeps that card; it passes the Hub's metadata validation.
    card = entry["plain_card"]
    assert card["library_name"] == "hf_regionmm" and spec.name in card["tags"]
    assert f"org/{spec.name}-tiny" in card["text"] and "automatically generated" not in card["text"]
    files = hub.files(_repos(spec.name)["plain"])
    assert "README.md" in files and "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".ckpt"))]


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_published_repo_has_card_and_sharded_safetensors(spec: SystemSpec, published, loaded, hub: LocalHub):
    _entry(published, spec.name)
    entry = _entry(loaded, spec.name)
    _all_equal(entry["published"])
    card = entry["published_card"]
    assert card["library_name"] == "hf_regionmm"
    assert {spec.name, "hf_regionmm", "transformers"} <= set(card["tags"])
    assert f"org/{spec.name}-tiny-published" in card["text"]

    files = entry["published_files"]
    shards = [name for name in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)]
    assert len(shards) >= 2 and "model.safetensors.index.json" in files, files
    assert entry["index_shards"] == sorted(shards)
    # The single-file weights of the first publication were deleted by the sharded one, in the same commit.
    assert "model.safetensors" not in files
    assert sorted(entry["published_lfs"]) == sorted(shards)
    assert set(files) - {".gitattributes"} <= set(entry["snapshot_files"])
    commits = hub.commits(_repos(spec.name)["published"])
    assert len(commits) == 3 and commits[1]["files"] != commits[2]["files"]


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_publication_is_one_commit_and_a_failed_one_leaves_nothing(spec: SystemSpec, published, hub: LocalHub):
    entry = _entry(published, spec.name)
    repos = _repos(spec.name)
    code_commits = hub.commits(repos["code"])
    assert [c["summary"] for c in code_commits][0] == "initial commit" and len(code_commits) == 2
    published_files = code_commits[1]["files"]
    assert {"config.json", "README.md", "processor_config.json", "model.safetensors"} <= set(published_files)
    assert any(name.startswith("modeling_") for name in published_files)

    # The interrupted publication got as far as its commit (after the upload-mode negotiation and LFS step) and
    # failed there: the repository still shows only what it was created with.
    assert entry["interrupted_error"] == "HfHubHTTPError"
    calls = [path for method, path in hub.requests if method == "POST" and f"/{repos['interrupted']}" in path]
    assert any("/preupload/" in path for path in calls) and any("/commit/" in path for path in calls), calls
    assert [c["files"] for c in hub.commits(repos["interrupted"])] == [[".gitattributes"]]
    # The weights themselves sit in the LFS store, unreferenced by any commit of that repository.
    weights = hub.files(repos["code"])["model.safetensors"]
    assert hashlib.sha256(weights).hexdigest() in hub.lfs_objects()


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_remote_code_loads_where_hf_regionmm_is_not_importable(spec: SystemSpec, published, loaded_remote):
    _entry(published, spec.name)
    assert loaded_remote["library_importable"] is False
    assert loaded_remote["library_modules_loaded"] == []
    entry = _entry(loaded_remote, spec.name)
    for kind in ("code", "release"):
        assert entry[kind]["module"].startswith("transformers_modules."), entry[kind]
        assert entry[kind]["class"] == spec.main_model_class.__name__
        _all_equal(entry[kind])
    assert entry["processor"]["module"].startswith("transformers_modules.")
    assert entry["processor"]["class"] == spec.processor_class.__name__
    assert "pixel_values_equal" in entry or "token_ids_equal" in entry
    if "pixel_values_equal" in entry:
        ours = all(cls.__module__.startswith("hf_regionmm.") for cls in spec.image_processor_classes.values())
        assert entry["image_processor_module"].startswith("transformers_modules." if ours else "transformers.models.")
        assert entry["pixel_values_equal"]
    if "token_ids_equal" in entry:
        assert entry["token_ids_equal"]
    assert entry["refused_without_trust"]


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_code_repo_card_and_library_classes(spec: SystemSpec, loaded, hub: LocalHub):
    entry = _entry(loaded, spec.name)
    # With hf_regionmm installed, the registered classes are used even though the repo carries code.
    assert entry["code_repo_class_module"].startswith("hf_regionmm.")
    assert "custom_code" in entry["code_card"]["tags"]
    assert "trust_remote_code=True" in entry["code_card"]["text"]
    code_files = hub.files(_repos(spec.name)["code"])
    config = json.loads(code_files["config.json"])
    assert set(config["auto_map"]) == {"AutoConfig", *spec.model_classes}
    for reference in config["auto_map"].values():
        assert f"{reference.split('.')[0]}.py" in code_files


@pytest.mark.parametrize("spec", ADAPTER_SYSTEMS, ids=_ids(ADAPTER_SYSTEMS))
def test_lora_adapter_pushes_as_peft_adapter_and_loads_on_the_base_repo(spec: SystemSpec, published, loaded):
    assert "groma" in _ids(ADAPTER_SYSTEMS)
    assert _entry(published, spec.name)["lora_parameters"] > 0
    entry = _entry(loaded, spec.name)
    repos = _repos(spec.name)
    # transformers writes generation_config.json next to the adapter; no base weights or config travel with it.
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(entry["adapter_files"])
    assert not {"config.json", "model.safetensors"} & set(entry["adapter_files"]), entry["adapter_files"]
    assert entry["adapter_base"] == repos["plain"]
    assert entry["adapter_card"]["library_name"] == "peft"
    assert entry["adapter_changes_outputs"]
    _all_equal(entry["adapter_from_repo"])
    _all_equal(entry["adapter_loaded_on_base"])


@pytest.mark.parametrize("spec", MODALITY_ADAPTER_SYSTEMS, ids=_ids(MODALITY_ADAPTER_SYSTEMS))
def test_modality_adapters_push_in_one_commit_and_load_on_the_base_repo(
    spec: SystemSpec, published, loaded, hub: LocalHub
):
    assert "regionblip" in _ids(MODALITY_ADAPTER_SYSTEMS)
    commit = _entry(published, spec.name)["modality_adapters_commit"]
    entry = _entry(loaded, spec.name)
    repos = _repos(spec.name)
    modalities = ["image", "image_region", "point_cloud", "point_cloud_region"]
    adapter_files = [
        f"{modality}/{part}/{name}"
        for modality in modalities
        for part in ("qformer", "language_model")
        for name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    assert sorted(entry["modality_adapter_files"]) == sorted([".gitattributes", "README.md", *adapter_files])
    assert entry["modality_adapter_bases"] == {
        path: repos["plain"] for path in adapter_files if path.endswith("adapter_config.json")
    }
    card = entry["modality_adapter_card"]
    assert card["library_name"] == "peft" and "peft" in card["tags"] and spec.name in card["tags"]
    assert repos["plain"] in card["text"] and "| `image_region` | `image_region/qformer/` |" in card["text"]
    # One commit carries every modality, and it is the one the loader pinned.
    commits = hub.commits(repos["modality_adapters"])
    assert len(commits) == 2 and commits[1]["oid"] == commit == entry["modality_adapters_revision"]
    assert commits[1]["files"] == sorted(entry["modality_adapter_files"])

    # The plain base repo gives the unperturbed outputs; the adapters from the Hub give the perturbed ones exactly.
    _all_equal(entry["modality_base"])
    assert entry["modality_adapters_change_outputs"]
    assert entry["modalities_loaded"] == modalities
    _all_equal(entry["modality_adapters"])
    assert entry["modalities_loaded_at_revision"] == ["image_region"]
    _all_equal(entry["modality_adapters_at_revision"])


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_release_command_publishes_evaluated_card_and_code_in_one_commit(
    spec: SystemSpec, published, loaded, hub: LocalHub
):
    assert _entry(published, spec.name)["release_exit_code"] == 0
    entry = _entry(loaded, spec.name)
    _all_equal(entry["release"])
    assert entry["release_card"]["eval"] == {"rec_acc@0.5": 0.625, "ar": 0.5}
    assert "| rec_acc@0.5 | 0.6250 |" in entry["release_card"]["text"]
    files = entry["release_files"]
    config_file = f"{spec.config_class.__module__.rsplit('.', 1)[-1]}.py"
    assert {"README.md", "model.safetensors", config_file} <= set(files), files
    commits = hub.commits(_repos(spec.name)["release"])
    assert len(commits) == 2 and commits[1]["files"] == sorted(files)


def test_clients_used_no_endpoint_the_local_hub_lacks(published, loaded, loaded_remote, hub: LocalHub):
    assert hub.unhandled_requests == []


# ---- in-process checks: no network involved ----------------------------------------------------------------------


def _tiny(spec: SystemSpec):
    torch.manual_seed(0)
    config = spec.tiny_config()
    return spec.main_model_class(config).eval(), spec.tiny_processor()


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_save_with_code_checks_the_code_and_leaves_no_global_state(spec: SystemSpec, tmp_path: Path):
    model, processor = _tiny(spec)
    folder = publish.save_with_code(model, processor, tmp_path / "with-code", model_id="org/x")
    checked = publish.check_remote_code(folder)
    defining_files = {
        f"{cls.__module__.rsplit('.', 1)[-1]}.py" for cls in (spec.config_class, *spec.model_classes.values())
    }
    assert defining_files <= set(checked), (defining_files, checked)
    assert "custom_code" in (folder / "README.md").read_text()

    # register_for_auto_class was undone: a plain save afterwards carries no code and no auto_map.
    assert spec.config_class._auto_class is None and type(model)._auto_class is None
    assert getattr(model.config, "auto_map", None) is None
    plain = tmp_path / "plain"
    publish.save_pretrained(model, processor, plain, eval_results={"ar": 0.25})
    assert not list(plain.glob("*.py"))
    assert "auto_map" not in json.loads((plain / "config.json").read_text())
    assert "auto_map" not in (plain / "processor_config.json").read_text()
    card = (plain / "README.md").read_text()
    assert "library_name: hf_regionmm" in card and "| ar | 0.2500 |" in card and "custom_code" not in card


def test_check_remote_code_names_the_offending_import(tmp_path: Path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "box_ops.py").write_text("import torch\n\ndef area(b):\n    return b\n")
    (good / "modeling_x.py").write_text("from .box_ops import area\n\nclass XModel:\n    pass\n")
    (good / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.XModel"}}))
    assert publish.check_remote_code(good) == ["box_ops.py", "modeling_x.py"]

    cases = {
        "from ..common import area\n": r"modeling_x\.py:1 imports from a parent package",
        "from .missing import area\n": r"imports `\.missing`, but missing\.py is not in",
        "from hf_regionmm.modeling import box_ops\n": r"imports `hf_regionmm\.modeling`; remote code must not",
        "import hf_regionmm\n": r"imports `hf_regionmm`",
    }
    for source, message in cases.items():
        (good / "modeling_x.py").write_text(source + "\nclass XModel:\n    pass\n")
        with pytest.raises(ValueError, match=message):
            publish.check_remote_code(good)
    (good / "modeling_x.py").write_text("class Other:\n    pass\n")
    with pytest.raises(ValueError, match=r"auto_map\['AutoModel'\] = 'modeling_x.XModel'"):
        publish.check_remote_code(good)
    with pytest.raises(ValueError, match="holds no .py files"):
        publish.check_remote_code(tmp_path)


def test_adapter_and_system_errors_are_clear(tmp_path: Path):
    model, _ = _tiny(SYSTEMS[0])
    with pytest.raises(ValueError, match="`model` has no adapter"):
        publish.save_adapter(model, tmp_path, base_model="org/base")
    with pytest.raises(TypeError, match="`model` must be a transformers PreTrainedModel"):
        publish.save_pretrained(object(), None, tmp_path)
    with pytest.raises(ValueError, match="`repo_id` must be a repository id"):
        publish.push_to_hub(model, None, "")


@pytest.mark.parametrize("spec", MODALITY_ADAPTER_SYSTEMS, ids=_ids(MODALITY_ADAPTER_SYSTEMS))
def test_modality_adapters_round_trip_a_folder_and_refuse_bad_requests(spec: SystemSpec, tmp_path: Path):
    trained, _ = _tiny(spec)
    fresh, _ = _tiny(spec)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if ".lora_" in name and ".point_cloud." in name:
                parameter.add_(1.0)
    folder = publish.save_modality_adapters(
        trained, tmp_path / "adapters", base_model="org/base", modalities="point_cloud"
    )
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md",
        *(
            f"point_cloud/{part}/{name}"
            for part in ("language_model", "qformer")
            for name in ("adapter_config.json", "adapter_model.safetensors")
        ),
    ]
    config = json.loads((folder / "point_cloud" / "qformer" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base" and config["peft_type"] == "LORA"
    assert "base_model: org/base" in (folder / "README.md").read_text()

    before = {name: value.clone() for name, value in fresh.state_dict().items()}
    assert publish.load_modality_adapters_from_hub(fresh, folder) == ["point_cloud"]
    point_cloud_lora = {n: p for n, p in trained.state_dict().items() if ".lora_" in n and ".point_cloud." in n}
    assert point_cloud_lora
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in point_cloud_lora.items())
    # Exactly the point-cloud LoRA weights changed; every other weight of the base is as it was.
    changed = {name for name, value in loaded.items() if not torch.equal(value, before[name])}
    assert changed == set(point_cloud_lora)

    with pytest.raises(ValueError, match=r"`modalities` \['image_region'\] are not among the modality adapters in"):
        publish.load_modality_adapters_from_hub(fresh, folder, ["image_region"])
    with pytest.raises(ValueError, match=r"`modalities` \['video'\] are not among the model's modality adapters"):
        publish.push_modality_adapters_to_hub(trained, "org/x", base_model="org/base", modalities=["image", "video"])
    with pytest.raises(ValueError, match="`modalities` is empty"):
        publish.save_modality_adapters(trained, tmp_path / "none", base_model="org/base", modalities=[])
    with pytest.raises(ValueError, match="`base_model` must be the repository id"):
        publish.save_modality_adapters(trained, tmp_path / "none", base_model="")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no modality adapters"):
        publish.load_modality_adapters_from_hub(fresh, tmp_path / "empty")

    other = next(spec for spec in SYSTEMS if spec not in MODALITY_ADAPTER_SYSTEMS)
    plain_model, _ = _tiny(other)
    with pytest.raises(ValueError, match=r"`model` \(\w+\) has no modality adapters"):
        publish.push_modality_adapters_to_hub(plain_model, "org/x", base_model="org/base")
    with pytest.raises(TypeError, match="`model` must be a transformers PreTrainedModel"):
        publish.load_modality_adapters_from_hub(object(), folder)


@pytest.fixture
def release_spy(monkeypatch) -> list:
    """Records `push_to_hub` calls of `release`, so a refusal test can show that nothing was pushed."""
    calls: list = []
    monkeypatch.setattr(publish, "push_to_hub", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def _checkpoint(folder: Path, *weights: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name in weights:
        (folder / name).write_bytes(b"\0" * 8)
    return folder


@pytest.mark.parametrize("spec", SYSTEMS, ids=_ids(SYSTEMS))
def test_release_refuses_pickled_weights(spec: SystemSpec, tmp_path: Path, release_spy, capsys):
    for weights in ("pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"):
        checkpoint = _checkpoint(tmp_path / weights, "model.safetensors", weights)
        assert cli.main(["release", spec.name, str(checkpoint), "org/x", "--eval-json", "unused.json"]) == 2
        error = capsys.readouterr().err
        assert f"non-safetensors weights ['{weights}']" in error and "save_pretrained" in error
    # `release` is the one command that does not switch the process to offline mode.
    assert "HF_HUB_OFFLINE" not in os.environ
    assert release_spy == []


def test_release_refuses_when_evaluation_fails(tmp_path: Path, release_spy, capsys, monkeypatch):
    spec = SYSTEMS[0]
    checkpoint = _checkpoint(tmp_path / "ckpt", "model.safetensors")
    for metrics, message in [
        ({"rec_acc@0.5": float("nan")}, r"failed: non-finite or non-numeric metrics"),
        ({}, r"produced no metrics"),
    ]:
        eval_json = tmp_path / "eval.json"
        eval_json.write_text(json.dumps({"metrics": metrics}))
        assert cli.main(["release", spec.name, str(checkpoint), "org/x", "--eval-json", str(eval_json)]) == 2
        assert re.search(message, capsys.readouterr().err)

    def failing_evaluation(checkpoint: str, output_dir: Path, **options: Any) -> dict[str, float]:
        raise RuntimeError("proposer produced no boxes")

    for evaluate, message in [
        (None, r"has no evaluation routine; pass `--eval-json`"),
        (failing_evaluation, r"Evaluation of .* failed \(RuntimeError: proposer produced no boxes\)"),
        (lambda checkpoint, output_dir, **options: {"ar": math.inf}, r"non-finite"),
    ]:
        patched = dataclasses.replace(spec, evaluate=evaluate)
        monkeypatch.setattr(publish, "get_system", lambda name, patched=patched: patched)
        assert cli.main(["release", spec.name, str(checkpoint), "org/x"]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert cli.main(["release", spec.name, str(tmp_path / "nowhere"), "org/x"]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert release_spy == []
