"""Publishing checkpoints to the Hugging Face Hub: weights, processor, model card and (opt-in) remote code in one commit.

`model.save_pretrained` / `model.push_to_hub` are transformers' calls; through `modeling/model_card_hook.py` they write
the system's card without results. The functions here are what this library adds on top, and what users call to
publish a system properly (results in the card, processor, one commit, remote code, adapters):

- `save_pretrained(model, processor, directory)` writes model + processor + the system's filled-in model card
  (`hub_cards/<system>.md`); `save_with_code` also ships the system's flat `modeling/` and `processing/` files with an
  `auto_map`, so the folder loads with `trust_remote_code=True` where `hf_regionmm` is not installed.
- `push_to_hub(model, processor, repo_id)` / `push_to_hub_with_code(...)` prepare that folder in a temporary
  directory and publish it as ONE commit (`create_commit`), replacing stale weight shards and code files in the same
  commit, so an interrupted upload leaves nothing half-published.
- `save_adapter` / `push_adapter_to_hub` publish a LoRA fine-tune as a PEFT adapter whose
  `base_model_name_or_path` names the base repo, so `AutoModel*.from_pretrained(adapter_repo)` loads base + adapter.
- `save_modality_adapters` / `push_modality_adapters_to_hub` / `load_modality_adapters_from_hub` do the same for
  RegionBLIP's per-modality LoRA (one Q-Former + one LLM PEFT adapter per modality, `<modality>/qformer/`,
  `<modality>/language_model/`), published in one commit on top of a base repo and loaded into a base model.
- `release(system, checkpoint, repo_id)` is `hf-regionmm release`: evaluate, fill the card, push, refusing to publish
  when evaluation fails or the folder holds pickled weights.

Why functions and not more in a `save_pretrained` override: the model classes live in `modeling/`, which must import
nothing from `hf_regionmm` (it ships as remote code); the hook there only calls the card writer the registry gives it.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants
from transformers import AutoProcessor, PreTrainedModel, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import get_relative_import_files

from ..registry import SystemSpec, get_system, registered_systems
from .model_card import render_model_card

__all__ = [
    "PICKLE_WEIGHT_PATTERNS",
    "check_remote_code",
    "check_safetensors_only",
    "find_system",
    "load_modality_adapters_from_hub",
    "push_adapter_to_hub",
    "push_modality_adapters_to_hub",
    "push_to_hub",
    "push_to_hub_with_code",
    "release",
    "save_adapter",
    "save_modality_adapters",
    "save_pretrained",
    "save_with_code",
]

# Weight formats that unpickle arbitrary code on load; a release must carry safetensors only.
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# Files a publication replaces as a whole: left-over shards or code of an earlier push would be loaded with the new ones.
_REPLACED_ON_PUSH = ("*.safetensors", "*.safetensors.index.json", "*.py", *PICKLE_WEIGHT_PATTERNS, "*.bin.index.json")
_MIN_TRANSFORMERS = "5.23"
_MISSING = object()


# ---- which system a model belongs to ----------------------------------------------------------------------------


def find_system(model_or_config: PreTrainedModel | transformers.PreTrainedConfig) -> SystemSpec:
    """The registered `SystemSpec` whose config `model_type` matches the model's (or config's)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for spec in registered_systems():
        if spec.config_class.model_type == model_type:
            return spec
    known = sorted(spec.config_class.model_type for spec in registered_systems())
    raise ValueError(
        f"`model` has model_type {model_type!r}, which no registered system uses ({known}); "
        "pass a model built from one of hf_regionmm's configs."
    )


def _card_template(spec: SystemSpec) -> str:
    if not spec.card_template:
        raise ValueError(f"System {spec.name!r} has no `card_template`; add hub_cards/{spec.name}.md and name it.")
    return spec.card_template.removesuffix(".md")


# ---- remote code ------------------------------------------------------------------------------------------------


def _auto_class_of_attribute(attribute: Any) -> str | None:
    """Auto class that loads a processor attribute of this library (None for transformers' own classes)."""
    if not type(attribute).__module__.startswith("hf_regionmm."):
        return None
    from transformers.feature_extraction_utils import FeatureExtractionMixin
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    if isinstance(attribute, BaseVideoProcessor):
        return "AutoVideoProcessor"
    if isinstance(attribute, ImageProcessingMixin):
        return "AutoImageProcessor"
    if isinstance(attribute, PreTrainedTokenizerBase):
        return "AutoTokenizer"
    if isinstance(attribute, FeatureExtractionMixin):
        return "AutoFeatureExtractor"
    raise TypeError(f"Cannot publish processor attribute of type {type(attribute).__name__} as remote code.")


@contextlib.contextmanager
def _registered_for_auto_classes(spec: SystemSpec, model: PreTrainedModel, processor: Any) -> Iterator[None]:
    """`register_for_auto_class` the system's classes for one save, then undo it.

    `register_for_auto_class` sets a class attribute, so leaving it in place would make every later
    `save_pretrained` in this process copy code; the model config's `auto_map` is restored for the same reason.
    """
    registrations: list[tuple[type, str]] = [(spec.config_class, "AutoConfig")]
    registrations.append((type(model), _model_auto_class(spec, model)))
    if processor is not None:
        registrations.append((type(processor), "AutoProcessor"))
        for name in processor.get_attributes():
            attribute = getattr(processor, name)
            auto_class = _auto_class_of_attribute(attribute)
            if auto_class is not None:
                registrations.append((type(attribute), auto_class))
    previous = [(cls, cls.__dict__.get("_auto_class", _MISSING)) for cls, _ in registrations]
    previous_auto_map = model.config.__dict__.get("auto_map", _MISSING)
    # `custom_object_save` also writes `auto_map` onto the processor and its attributes in memory.
    processor_parts = (
        [] if processor is None else [processor, *(getattr(processor, n) for n in processor.get_attributes())]
    )
    previous_part_maps = [(part, part.__dict__.get("auto_map", _MISSING)) for part in processor_parts]
    try:
        for cls, auto_class in registrations:
            cls.register_for_auto_class(auto_class)
        # Every head of the system is served, not only the one being saved (hf_conventions §9).
        model.config.auto_map = {
            **(previous_auto_map if isinstance(previous_auto_map, dict) else {}),
            **{name: _class_reference(cls) for name, cls in spec.model_classes.items()},
        }
        yield
    finally:
        for cls, value in reversed(previous):
            if value is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(cls, "_auto_class")
            else:
                cls._auto_class = value
        if previous_auto_map is _MISSING:
            model.config.__dict__.pop("auto_map", None)
        else:
            model.config.auto_map = previous_auto_map
        for part, value in previous_part_maps:
            if value is _MISSING:
                part.__dict__.pop("auto_map", None)
            else:
                part.auto_map = value


def _model_auto_class(spec: SystemSpec, model: PreTrainedModel) -> str:
    for auto_name, model_class in spec.model_classes.items():
        if type(model) is model_class:
            return auto_name
    raise ValueError(
        f"`model` is a {type(model).__name__}, which system {spec.name!r} does not register "
        f"({sorted(cls.__name__ for cls in spec.model_classes.values())}); publish one of those classes."
    )


def _class_reference(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def _copy_module_files(classes: Sequence[type], directory: Path) -> None:
    """Copy the files defining `classes` and, recursively, their sibling imports (what `custom_object_save` does)."""
    for cls in classes:
        module_file = Path(sys.modules[cls.__module__].__file__)
        for path in (str(module_file), *get_relative_import_files(module_file)):
            destination = directory / Path(path).name
            if not destination.exists():
                shutil.copyfile(path, destination)


def check_remote_code(directory: str | Path) -> list[str]:
    """Check that the code in a saved folder loads on its own; returns the checked file names.

    Every `.py` file may import only siblings of the same folder (`from .box_ops import x`, which must exist there)
    and installed packages; `hf_regionmm` itself and parent-relative imports (`from ..x`) are errors, because the
    Hub's dynamic-module loader copies sibling files only. Every `auto_map` entry of `config.json`,
    `processor_config.json`, `preprocessor_config.json` and `tokenizer_config.json` must name a class defined in
    one of the files. Raises `ValueError` naming the file and the import otherwise.
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.py"))
    if not files:
        raise ValueError(f"`directory` {directory} holds no .py files; save it with `save_with_code` first.")
    defined: dict[str, set[str]] = {}
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        defined[path.stem] = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:
                    raise ValueError(
                        f"{path.name}:{node.lineno} imports from a parent package (`from {'.' * node.level}"
                        f"{node.module or ''} import ...`); remote code may import siblings only. Move the code into "
                        "the same flat folder."
                    )
                siblings = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
                for sibling in siblings:
                    if not (directory / f"{sibling}.py").is_file():
                        raise ValueError(
                            f"{path.name}:{node.lineno} imports `.{sibling}`, but {sibling}.py is not in {directory}; "
                            "use `from .module import name` so transformers copies the file."
                        )
                continue
            else:
                continue
            for name in names:
                if name.split(".")[0] == "hf_regionmm":
                    raise ValueError(
                        f"{path.name}:{node.lineno} imports `{name}`; remote code must not need hf_regionmm. "
                        "Import a sibling module of modeling/ or processing/ instead."
                    )
    for config_name in ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        config_path = directory / config_name
        if config_path.is_file():
            _check_auto_map(json.loads(config_path.read_text()), config_name, defined)
    return [path.name for path in files]


def _check_auto_map(config: Any, config_name: str, defined: Mapping[str, set[str]]) -> None:
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        if key == "auto_map" and isinstance(value, dict):
            for auto_class, reference in value.items():
                for item in reference if isinstance(reference, list | tuple) else [reference]:
                    if item is None:
                        continue
                    module, _, class_name = str(item).split("--")[-1].rpartition(".")
                    if class_name not in defined.get(module, set()):
                        raise ValueError(
                            f"{config_name}: auto_map[{auto_class!r}] = {item!r}, but no {module}.py defining "
                            f"class {class_name} was saved."
                        )
        elif isinstance(value, dict):
            _check_auto_map(value, config_name, defined)


def check_safetensors_only(directory: str | Path) -> None:
    """Raise `ValueError` if `directory` (recursively) holds pickled weights (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`...)."""
    directory = Path(directory)
    found = sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in PICKLE_WEIGHT_PATTERNS)
    )
    if found:
        raise ValueError(
            f"{directory} holds non-safetensors weights {found}; they unpickle arbitrary code on load and are not "
            "published. Re-save the checkpoint with `save_pretrained` (safetensors) and remove those files."
        )


# ---- saving -----------------------------------------------------------------------------------------------------


def _remote_code_section(spec: SystemSpec, model_id: str) -> str:
    heads = "\n".join(f"| `{auto_name}` | `{cls.__name__}` |" for auto_name, cls in sorted(spec.model_classes.items()))
    return f"""
## Loading without `hf_regionmm` (remote code)

This repository carries the system's code (`configuration_*.py`, `modeling_*.py`, `processing_*.py`,
`image_processing_*.py` and their sibling modules), so it loads with transformers >= {_MIN_TRANSFORMERS} alone.
Read the code before you trust it:

```python
from transformers import {spec.main_auto_class}, AutoProcessor

model = {spec.main_auto_class}.from_pretrained("{model_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)
```

| Auto class | loads |
|---|---|
{heads}
"""


def save_pretrained(
    model: PreTrainedModel,
    processor: Any,
    directory: str | Path,
    *,
    model_id: str | None = None,
    with_code: bool = False,
    max_shard_size: int | str = "5GB",
    eval_results: Mapping[str, float] | None = None,
    **card_kwargs: Any,
) -> Path:
    """Save a system's model, processor and filled-in model card (README.md) to `directory`.

    Args:
        model: a model of a registered system (e.g. `GromaForConditionalGeneration`).
        processor: its processor (`GromaProcessor`), or None for a model-only folder.
        directory: output folder (created if needed).
        model_id: the repository id the card describes (default: the folder name).
        with_code: also copy the system's `modeling/` and `processing/` files and write `auto_map` entries for the
            config, every registered head, the processor and its image processor, so the folder loads with
            `trust_remote_code=True` without `hf_regionmm`; the copied files are checked with `check_remote_code`.
        max_shard_size: largest safetensors shard (`"5GB"`, `"400KB"`, or bytes); larger models are sharded with a
            `model.safetensors.index.json`.
        eval_results: metric name -> value for the card's `model-index` and evaluation table.
        card_kwargs: passed to `render_model_card` (`eval_dataset`, `base_model`, `datasets`, `license`, `tags`, ...).

    Returns the folder. Weights are always safetensors.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}.")
    spec = find_system(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_id = model_id or directory.resolve().name
    if with_code:
        with _registered_for_auto_classes(spec, model, processor):
            _copy_module_files(list(spec.model_classes.values()), directory)
            model.save_pretrained(directory, max_shard_size=max_shard_size)
            if processor is not None:
                processor.save_pretrained(directory)
        check_remote_code(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(directory)
    check_safetensors_only(directory)
    tags = [spec.name, *(card_kwargs.pop("tags", None) or [])]
    if with_code:
        tags.append("custom_code")
    card = render_model_card(
        _card_template(spec), model_id=model_id, eval_results=eval_results, tags=tags, **card_kwargs
    )
    text = str(card)
    if with_code:
        text = text.rstrip("\n") + "\n" + _remote_code_section(spec, model_id)
    (directory / "README.md").write_text(text, encoding="utf-8")
    return directory


def save_with_code(model: PreTrainedModel, processor: Any, directory: str | Path, **kwargs: Any) -> Path:
    """`save_pretrained(..., with_code=True)`: the folder also loads with `trust_remote_code=True` alone."""
    return save_pretrained(model, processor, directory, with_code=True, **kwargs)


# ---- pushing ----------------------------------------------------------------------------------------------------


def _commit_folder(
    api: HfApi,
    folder: Path,
    repo_id: str,
    *,
    commit_message: str,
    commit_description: str | None,
    revision: str | None,
    create_pr: bool,
) -> CommitInfo:
    """Publish every file of `folder` and delete stale weights/code of the repo, all in one `create_commit`.

    `upload_folder` is not used: with `hf_xet` installed it may split a large folder into several commits.
    The commit is pinned to the head it was prepared against, so a concurrent push makes it fail instead of mixing.
    """
    new_files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    info = api.repo_info(repo_id, revision=revision)
    remote_files = [sibling.rfilename for sibling in info.siblings or []]
    stale = [
        name
        for name in remote_files
        if name not in new_files and any(fnmatch.fnmatch(name.rsplit("/", 1)[-1], p) for p in _REPLACED_ON_PUSH)
    ]
    operations = [CommitOperationDelete(path_in_repo=name) for name in stale]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in new_files]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        parent_commit=None if create_pr else info.sha,
    )


def push_to_hub(
    model: PreTrainedModel,
    processor: Any,
    repo_id: str,
    *,
    with_code: bool = False,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    max_shard_size: int | str = "5GB",
    eval_results: Mapping[str, float] | None = None,
    **card_kwargs: Any,
) -> CommitInfo:
    """Publish model + processor + model card (+ code with `with_code=True`) to `repo_id` in one commit.

    The repository is created if needed. The folder is prepared by `save_pretrained` in a temporary directory;
    safetensors shards, index files and `.py` files of an earlier publication that the new one does not contain are
    deleted in the same commit. Returns the `CommitInfo` (its `oid` is the new commit).
    """
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise ValueError("`repo_id` must be a repository id such as 'org/groma-tiny'.")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_regionmm_publish_") as tmp:
        folder = save_pretrained(
            model,
            processor,
            tmp,
            model_id=repo_id,
            with_code=with_code,
            max_shard_size=max_shard_size,
            eval_results=eval_results,
            **card_kwargs,
        )
        spec = find_system(model)
        return _commit_folder(
            api,
            folder,
            repo_id,
            commit_message=commit_message
            or f"Publish {spec.name} model, processor and card" + (" with remote code" if with_code else ""),
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def push_to_hub_with_code(model: PreTrainedModel, processor: Any, repo_id: str, **kwargs: Any) -> CommitInfo:
    """`push_to_hub(..., with_code=True)`: the repository also loads with `trust_remote_code=True` alone."""
    return push_to_hub(model, processor, repo_id, with_code=True, **kwargs)


# ---- adapters ---------------------------------------------------------------------------------------------------


def save_adapter(
    model: PreTrainedModel,
    directory: str | Path,
    *,
    base_model: str,
    adapter_name: str | None = None,
    model_id: str | None = None,
) -> Path:
    """Save one LoRA adapter of `model` as a PEFT adapter folder with a card.

    Args:
        model: a model with adapters added through transformers' PEFT integration (`model.add_adapter(...)`).
        directory: output folder: `adapter_config.json`, `adapter_model.safetensors`, `README.md`.
        base_model: repository id (or path) of the base checkpoint; written to `base_model_name_or_path`, so
            `AutoModel*.from_pretrained(directory)` loads that base and applies the adapter.
        adapter_name: which adapter (default: the only active one).
        model_id: the adapter's repository id shown in the card (default: the folder name).
    """
    peft_config = getattr(model, "peft_config", None)
    if not getattr(model, "_hf_peft_config_loaded", False) or not peft_config:
        raise ValueError("`model` has no adapter; add one with `model.add_adapter(LoraConfig(...))` first.")
    if not isinstance(base_model, str) or not base_model:
        raise ValueError("`base_model` must be the repository id of the base checkpoint, e.g. 'org/groma-tiny'.")
    active = list(model.active_adapters())
    if adapter_name is None:
        if len(active) != 1:
            raise ValueError(f"`model` has active adapters {active}; pass `adapter_name` to choose one.")
        adapter_name = active[0]
    if adapter_name not in peft_config:
        raise ValueError(f"`adapter_name` {adapter_name!r} is not one of the model's adapters {sorted(peft_config)}.")
    spec = find_system(model)
    directory = Path(directory)
    model_id = model_id or directory.resolve().name
    config = peft_config[adapter_name]
    previous_base = config.base_model_name_or_path
    config.base_model_name_or_path = base_model
    try:
        model.set_adapter(adapter_name)
        model.save_pretrained(directory)
    finally:
        config.base_model_name_or_path = previous_base
        if active:
            model.set_adapter(active if len(active) > 1 else active[0])
    check_safetensors_only(directory)
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=sorted({"hf_regionmm", "region-level", "lora", "peft", spec.name}),
        pipeline_tag="image-text-to-text",
    )
    card = ModelCard(
        f"---\n{card_data.to_yaml()}\n---\n\n# {model_id}: LoRA adapter for `{base_model}`\n\n"
        f"A `{config.peft_type}` adapter (r={getattr(config, 'r', '?')}) for the {spec.name} checkpoint "
        f"[`{base_model}`]. transformers loads the base and applies the adapter in one call:\n\n"
        f"```python\nimport hf_regionmm\nfrom transformers import {spec.main_auto_class}\n\n"
        f'model = {spec.main_auto_class}.from_pretrained("{model_id}")\n```\n'
    )
    card.save(directory / "README.md")
    return directory


def push_adapter_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    base_model: str,
    adapter_name: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Publish one adapter of `model` (see `save_adapter`) to `repo_id` in one commit."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_regionmm_adapter_") as tmp:
        folder = save_adapter(model, tmp, base_model=base_model, adapter_name=adapter_name, model_id=repo_id)
        return _commit_folder(
            api,
            folder,
            repo_id,
            commit_message=commit_message or f"Publish LoRA adapter for {base_model}",
            commit_description=None,
            revision=None,
            create_pr=False,
        )


# ---- per-modality adapters (RegionBLIP) -------------------------------------------------------------------------

# The two PEFT adapters `save_modality_adapter` writes per modality: one for the modality's Q-Former, one for the LLM.
_MODALITY_ADAPTER_PARTS = ("qformer", "language_model")


def _modality_adapter_names(model: Any) -> list[str]:
    """The model's modality adapters in creation order (RegionBLIP: image, image_region, point_cloud, ...)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}.")
    if not callable(getattr(model, "save_modality_adapter", None)):
        raise ValueError(
            f"`model` ({type(model).__name__}) has no modality adapters: it lacks `save_modality_adapter` / "
            "`load_modality_adapter`. Pass a RegionBLIP model; publish a single LoRA with `push_adapter_to_hub`."
        )
    names = dict.fromkeys(
        name for module in model.modules() if isinstance(module, LoraLayer) for name in module.lora_A
    )
    if not names:
        raise ValueError(f"`model` ({type(model).__name__}) has no modality adapters: it holds no LoRA layers.")
    return list(names)


def _chosen_modalities(modalities: Sequence[str] | str | None, available: Sequence[str], where: str) -> list[str]:
    if modalities is None:
        return list(available)
    if isinstance(modalities, str):
        modalities = [modalities]
    chosen = list(dict.fromkeys(modalities))
    if not chosen:
        raise ValueError(f"`modalities` is empty; pass None for all of {list(available)} or some of them.")
    unknown = [modality for modality in chosen if modality not in available]
    if unknown:
        raise ValueError(f"`modalities` {unknown} are not among the {where} {list(available)}; pass some of those.")
    return chosen


def _modality_adapter_card(spec: SystemSpec, model_id: str, base_model: str, modalities: Sequence[str]) -> ModelCard:
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        tags=sorted({"hf_regionmm", "region-level", "lora", "peft", spec.name}),
        pipeline_tag="image-text-to-text",
    )
    rows = "\n".join(
        f"| `{modality}` | `{modality}/qformer/` | `{modality}/language_model/` |" for modality in modalities
    )
    return ModelCard(
        f"---\n{card_data.to_yaml()}\n---\n\n# {model_id}: per-modality LoRA adapters for `{base_model}`\n\n"
        f"{spec.name} keeps one LoRA adapter per modality in its Q-Former and in its LLM. Each folder below is a "
        f"plain PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`, `base_model_name_or_path` = "
        f"`{base_model}`).\n\n| modality | Q-Former adapter | LLM adapter |\n|---|---|---|\n{rows}\n\n"
        f"```python\nimport hf_regionmm\nfrom hf_regionmm.hub import publish\nfrom transformers import "
        f'{spec.main_auto_class}\n\nmodel = {spec.main_auto_class}.from_pretrained("{base_model}")\n'
        f'publish.load_modality_adapters_from_hub(model, "{model_id}")\n```\n'
    )


def save_modality_adapters(
    model: PreTrainedModel,
    directory: str | Path,
    *,
    base_model: str,
    modalities: Sequence[str] | str | None = None,
    model_id: str | None = None,
) -> Path:
    """Save a RegionBLIP model's per-modality LoRA adapters as PEFT adapter folders with a card.

    Args:
        model: a model with `save_modality_adapter(directory, modality)` (`RegionBlipForConditionalGeneration` or
            `RegionBlipModel`).
        directory: output folder; gets `<modality>/qformer/` and `<modality>/language_model/` (each
            `adapter_config.json` + `adapter_model.safetensors`) per modality and a `README.md` (library_name peft).
        base_model: repository id (or path) of the base checkpoint the adapters apply to; written to every
            `adapter_config.json` as `base_model_name_or_path` and to the card's `base_model`.
        modalities: which adapters (default: all of the model's, e.g. image, image_region, point_cloud,
            point_cloud_region).
        model_id: the adapters' repository id shown in the card (default: the folder name).

    Returns the folder.
    """
    available = _modality_adapter_names(model)
    chosen = _chosen_modalities(modalities, available, "model's modality adapters")
    if not isinstance(base_model, str) or not base_model:
        raise ValueError("`base_model` must be the repository id of the base checkpoint, e.g. 'org/regionblip-tiny'.")
    spec = find_system(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_id = model_id or directory.resolve().name
    for modality in chosen:
        model.save_modality_adapter(directory / modality, modality)
        for part in _MODALITY_ADAPTER_PARTS:
            # Rewritten on disk rather than on the live peft configs, which the model keeps using.
            config_path = directory / modality / part / "adapter_config.json"
            adapter_config = json.loads(config_path.read_text())
            adapter_config["base_model_name_or_path"] = base_model
            config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    check_safetensors_only(directory)
    _modality_adapter_card(spec, model_id, base_model, chosen).save(directory / "README.md")
    return directory


def push_modality_adapters_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    base_model: str,
    modalities: Sequence[str] | str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
) -> CommitInfo:
    """Publish a RegionBLIP model's per-modality LoRA adapters (see `save_modality_adapters`) in one commit.

    The repository then holds `<modality>/qformer/` and `<modality>/language_model/` PEFT adapters on top of
    `base_model` and a card. Like `push_to_hub`, a push replaces the adapter weights: `adapter_model.safetensors` files
    of modalities this push does not carry are deleted in the same commit. Nothing is sent when the model has no
    modality adapters or a requested modality is unknown (`ValueError`).
    """
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise ValueError("`repo_id` must be a repository id such as 'org/regionblip-tiny-adapters'.")
    chosen = _chosen_modalities(modalities, _modality_adapter_names(model), "model's modality adapters")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory(prefix="hf_regionmm_modality_adapters_") as tmp:
        folder = save_modality_adapters(model, tmp, base_model=base_model, modalities=chosen, model_id=repo_id)
        return _commit_folder(
            api,
            folder,
            repo_id,
            commit_message=commit_message or f"Publish {', '.join(chosen)} LoRA adapters for {base_model}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def load_modality_adapters_from_hub(
    model: PreTrainedModel,
    repo_id: str | Path,
    modalities: Sequence[str] | str | None = None,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
) -> list[str]:
    """Load per-modality LoRA adapters published by `push_modality_adapters_to_hub` into `model`, in place.

    Args:
        model: the base model (e.g. `AutoModelForImageTextToText.from_pretrained(base_repo)`), with
            `load_modality_adapter`; its sizes must match the model the adapters were saved from.
        repo_id: the adapters' repository id, or a local folder written by `save_modality_adapters`.
        modalities: which adapters to load (default: every modality the repository holds). Only those are
            downloaded.
        revision: branch, tag or commit of the adapters' repository.

    Returns the loaded modalities. Each replaces the LoRA weights of that modality's Q-Former and LLM adapters;
    the active modality is left as it was.
    """
    available_in_model = _modality_adapter_names(model)
    if modalities is not None:
        _chosen_modalities(modalities, available_in_model, "model's modality adapters")
    if isinstance(repo_id, Path) or Path(repo_id).is_dir():
        folder = Path(repo_id)
    else:
        from huggingface_hub import snapshot_download

        patterns = (
            ["README.md", "*/*/adapter_config.json", "*/*/adapter_model.safetensors"]
            if modalities is None
            else [f"{modality}/*" for modality in ([modalities] if isinstance(modalities, str) else modalities)]
        )
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    in_repo = [
        modality
        for modality in available_in_model
        if all((folder / modality / part / "adapter_model.safetensors").is_file() for part in _MODALITY_ADAPTER_PARTS)
    ]
    if modalities is None and not in_repo:
        raise ValueError(
            f"`repo_id` {repo_id} holds no modality adapters (`<modality>/qformer/` + `<modality>/language_model/` "
            f"for any of {available_in_model}); publish them with `push_modality_adapters_to_hub`."
        )
    chosen = _chosen_modalities(modalities, in_repo, f"modality adapters in {repo_id}")
    for modality in chosen:
        model.load_modality_adapter(folder / modality, modality)
    return chosen


# ---- release ----------------------------------------------------------------------------------------------------


def _load_eval_json(path: str | Path) -> dict[str, float]:
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"`eval_json` {path} could not be read as JSON ({error}).") from None
    metrics = loaded.get("metrics", loaded) if isinstance(loaded, dict) else None
    if not isinstance(metrics, dict):
        raise ValueError(f"`eval_json` {path} must hold a JSON object of metric name -> number.")
    return {name: value for name, value in metrics.items() if isinstance(value, int | float)}


def _checked_metrics(metrics: Any, source: str) -> dict[str, float]:
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError(f"Evaluation ({source}) produced no metrics; nothing was pushed.")
    bad = {
        name: value
        for name, value in metrics.items()
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    }
    if bad:
        raise ValueError(f"Evaluation ({source}) failed: non-finite or non-numeric metrics {bad}; nothing was pushed.")
    return {str(name): float(value) for name, value in metrics.items()}


def release(
    system: str,
    checkpoint: str | Path,
    repo_id: str,
    *,
    with_code: bool = False,
    eval_json: str | Path | None = None,
    eval_options: Mapping[str, Any] | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Evaluate a checkpoint folder, fill its card and publish weights, processor, card (and code) in one commit.

    Args:
        system: registered system name (`"groma"`).
        checkpoint: a folder written by `save_pretrained` (config.json + safetensors + processor files).
        repo_id: target repository (`"org/groma-tiny"`).
        with_code: also publish the remote code (see `save_with_code`).
        eval_json: metrics to publish instead of running the system's `evaluate` hook (`{"metrics": {...}}` or a
            flat object, as written by `hf-regionmm eval`).
        eval_options: keyword arguments for the `evaluate` hook.

    Refuses (ValueError, nothing pushed) when the folder holds pickled weights, when evaluation raises or yields no
    or non-finite metrics, when the system has no `evaluate` hook and no `eval_json` is given, or in offline mode.
    """
    spec = get_system(system)
    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"`checkpoint` {checkpoint} holds no config.json; pass a folder written by save_pretrained.")
    check_safetensors_only(checkpoint)
    if not any(checkpoint.glob("*.safetensors")):
        raise ValueError(f"`checkpoint` {checkpoint} holds no .safetensors weights; save it with save_pretrained.")
    if eval_json is not None:
        metrics = _checked_metrics(_load_eval_json(eval_json), f"eval_json {eval_json}")
    elif spec.evaluate is not None:
        with tempfile.TemporaryDirectory(prefix="hf_regionmm_release_eval_") as eval_dir:
            try:
                raw_metrics = spec.evaluate(str(checkpoint), Path(eval_dir), **dict(eval_options or {}))
            except Exception as error:  # noqa: BLE001  (any failure of the evaluation blocks the release)
                raise ValueError(
                    f"Evaluation of {checkpoint} failed ({type(error).__name__}: {error}); nothing was pushed."
                ) from error
        metrics = _checked_metrics(raw_metrics, f"{spec.name} evaluate")
    else:
        raise ValueError(
            f"System {spec.name!r} has no evaluation routine; pass `--eval-json` with the checkpoint's metrics."
        )
    if hub_constants.HF_HUB_OFFLINE:
        raise ValueError("Cannot push while offline mode is on (HF_HUB_OFFLINE=1); unset it to release.")
    model = spec.auto_model_class.from_pretrained(checkpoint)
    if not isinstance(model.config, spec.config_class):
        raise ValueError(
            f"`checkpoint` {checkpoint} is a {type(model.config).__name__} checkpoint, not {spec.name!r}; "
            "pass the matching system name."
        )
    processor = AutoProcessor.from_pretrained(checkpoint) if spec.processor_class is not None else None
    return push_to_hub(
        model,
        processor,
        repo_id,
        with_code=with_code,
        private=private,
        token=token,
        commit_message=commit_message or f"Release {spec.name} ({', '.join(sorted(metrics))})",
        eval_results=metrics,
    )
