"""The system registry: one `SystemSpec` per model family, registered with the transformers Auto classes.

Each system issue (Groma, RegionBLIP, TAP-v2, u-LLaVA) adds one spec in `hf_regionmm/systems/<name>.py`. The spec
is what the library needs to make the system a Hugging Face citizen (which config, model heads, image processors and
processor go to which Auto class) plus the small factories that the shared contract test (`tests/test_contract.py`),
the Hub round-trip tests and `hf-regionmm demo` drive every system with: a tiny config, an offline processor, example
inputs, bad-input cases and, once the system has one, a trainer recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, PreTrainedConfig, PreTrainedModel

__all__ = [
    "BadInputCase",
    "SystemSpec",
    "TrainingRecipe",
    "get_system",
    "register_system",
    "registered_systems",
]

# Auto classes a spec may name as keys of `model_classes`; anything else is a typo we want to hear about early.
_MODEL_AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForImageTextToText",
    "AutoModelForMaskGeneration",
    "AutoModelForMultimodalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForZeroShotObjectDetection",
)


@dataclass(frozen=True)
class BadInputCase:
    """One call that must fail cleanly: `call(model, processor)` raises `error` with a message matching `match`."""

    description: str
    call: Callable[[PreTrainedModel, Any], Any]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class TrainingRecipe:
    """How the contract test, the demo and `hf-regionmm train` train a tiny model of a system.

    `build_dataset(processor, num_samples, seed, stage)` returns a `torch.utils.data.Dataset` (or `datasets.Dataset`)
    of training examples for `stage` (None: `default_stage`); `collator(processor)` returns the data collator;
    `trainer_class` is the system's `Trainer` subclass, constructed as `trainer_class(model=..., args=...,
    train_dataset=..., data_collator=..., processing_class=processor, **trainer_kwargs)` plus `stage=<name>` when the
    recipe has `stages` (the paper's `TrainingStage`s, whose optimiser settings go into the `TrainingArguments`).
    `dataset_from_scenes(processor, scenes, seed, stage)`, when set, builds the same kind of data set from scenes
    in the synthetic schema that a real-format loader returned (`hf-regionmm train SYSTEM --data FORMAT`).
    """

    trainer_class: type
    build_dataset: Callable[[Any, int, int, str | None], Any]
    collator: Callable[[Any], Callable]
    trainer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    stages: Sequence[Any] = ()
    default_stage: str | None = None
    dataset_from_scenes: Callable[[Any, Any, int, str | None], Any] | None = None


@dataclass(frozen=True)
class SystemSpec:
    """Everything the library and its shared tests need to know about one system.

    Args:
        name: short name used on the command line and in test ids (`"groma"`).
        config_class: the top-level `PreTrainedConfig` subclass; its `model_type` is registered with `AutoConfig`.
        model_classes: Auto class name -> model class, e.g. `{"AutoModel": GromaModel,
            "AutoModelForImageTextToText": GromaForConditionalGeneration}`.
        main_auto_class: the key of `model_classes` that loads the model users train and generate with.
        image_processor_classes: backend -> image processor class (`{"torchvision": GromaImageProcessor}`).
        processor_class: the `ProcessorMixin` subclass registered with `AutoProcessor`.
        extra_configs: sub-configs with their own `model_type` that should also resolve through `AutoConfig`.
        tiny_config: builds a config small enough for CPU tests (seconds, a few MB).
        tiny_processor: builds a processor that works offline (tiny tokenizer, no Hub download).
        example_inputs: `(processor, config) -> dict` of model inputs for a forward pass with `labels`, built through the
            processor on synthetic data, so that processor and model are exercised together.
        generation_inputs: `(processor, config) -> dict` of prompt inputs for `generate`; None if the system does
            not generate text.
        bad_inputs: `() -> list[BadInputCase]`: calls on model/processor that must raise a clear error.
        training: the trainer recipe, once the system has one.
        frozen_parameter_patterns: substrings of parameter names that are meant to be frozen in the tiny model
            (the gradient-flow contract skips them).
        demo: `(output_dir: Path, progress: Callable[[str], None]) -> dict[str, float]`: the system's part of
            `hf-regionmm demo` (train the tiny model on synthetic data, evaluate, save checkpoint, card and pictures
            under `output_dir`); None falls back to a generic run of the trainer recipe.
        evaluate: `(checkpoint: str, output_dir: Path, **options) -> dict[str, float]` for `hf-regionmm eval`.
        convert: `(source: str, destination: str, **options) -> None` for `hf-regionmm convert` (original release
            checkpoints to this library's layout).
        card_template: file name of the model-card template in `hub_cards/`.
    """

    name: str
    config_class: type[PreTrainedConfig]
    model_classes: Mapping[str, type[PreTrainedModel]]
    main_auto_class: str
    tiny_config: Callable[[], PreTrainedConfig]
    tiny_processor: Callable[[], Any]
    example_inputs: Callable[[Any, PreTrainedConfig], dict]
    image_processor_classes: Mapping[str, type] = field(default_factory=dict)
    processor_class: type | None = None
    extra_configs: Sequence[type[PreTrainedConfig]] = ()
    generation_inputs: Callable[[Any, PreTrainedConfig], dict] | None = None
    bad_inputs: Callable[[], list[BadInputCase]] = list
    training: TrainingRecipe | None = None
    frozen_parameter_patterns: Sequence[str] = ()
    demo: Callable[..., dict[str, float]] | None = None
    evaluate: Callable[..., dict[str, float]] | None = None
    convert: Callable[..., None] | None = None
    card_template: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.model_classes) - set(_MODEL_AUTO_CLASSES)
        if unknown:
            raise ValueError(
                f"SystemSpec {self.name!r}: `model_classes` has unknown Auto class names {sorted(unknown)}; "
                f"use some of {list(_MODEL_AUTO_CLASSES)}."
            )
        if self.main_auto_class not in self.model_classes:
            raise ValueError(
                f"SystemSpec {self.name!r}: `main_auto_class`={self.main_auto_class!r} is not a key of `model_classes` "
                f"({sorted(self.model_classes)})."
            )

    @property
    def main_model_class(self) -> type[PreTrainedModel]:
        return self.model_classes[self.main_auto_class]

    @property
    def generates(self) -> bool:
        return self.generation_inputs is not None

    @property
    def auto_model_class(self) -> Any:
        """The transformers Auto class (e.g. `AutoModelForImageTextToText`) that loads the main model."""
        return getattr(transformers, self.main_auto_class)


_REGISTRY: dict[str, SystemSpec] = {}


def register_system(spec: SystemSpec) -> SystemSpec:
    """Record `spec` and register its config, models, image processors and processor with the Auto classes.

    Idempotent: registering the same spec again (e.g. on module reload) is harmless.
    """
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing.config_class is not spec.config_class:
        raise ValueError(f"A different system is already registered under the name {spec.name!r}.")
    for config_class in (spec.config_class, *spec.extra_configs):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_name, model_class in spec.model_classes.items():
        getattr(transformers, auto_name).register(spec.config_class, model_class, exist_ok=True)
        if spec.card_template and hasattr(model_class, "model_card_writer"):
            # modeling/model_card_hook.py: plain save_pretrained / push_to_hub then write the system's card.
            model_class.model_card_writer = staticmethod(_card_writer(spec.card_template, spec.name))
    if spec.image_processor_classes:
        AutoImageProcessor.register(
            spec.config_class, image_processor_classes=dict(spec.image_processor_classes), exist_ok=True
        )
    if spec.processor_class is not None:
        AutoProcessor.register(spec.config_class, spec.processor_class, exist_ok=True)
    _REGISTRY[spec.name] = spec
    return spec


def _card_writer(card_template: str, system: str) -> Callable[[PreTrainedModel, Any, str | None], Any]:
    def write(model: PreTrainedModel, directory: Any, model_id: str | None) -> Any:
        from .hub.model_card import write_model_card  # the hub helpers import this module

        template = card_template.removesuffix(".md")
        return write_model_card(directory, template, model_id=model_id or Path(directory).name, tags=[system])

    return write


def registered_systems() -> list[SystemSpec]:
    """All registered systems, in registration order."""
    return list(_REGISTRY.values())


def get_system(name: str) -> SystemSpec:
    """The spec registered under `name`; a clear error lists the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown system {name!r}; registered systems are {sorted(_REGISTRY)}.") from None
