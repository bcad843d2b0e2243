"""LoRA on the LLM of a region-level multimodal model, shared by every system that tunes its LLM with LoRA.

TAP-v2-Chat (section 3.2 "Training methods") and u-LLaVA (section 4.1, stage II "if LoRA is employed") both tune the
LLM with LoRA while other modules (projectors, heads, the last ViT blocks, SAM's mask decoder) train fully. One PEFT
adapter folder should hold everything such a stage trains, so `LanguageModelLoraMixin` builds a peft `LoraConfig` with
LoRA inside the LLM only and the fully trained modules as `modules_to_save` (peft keeps a trained copy next to the
frozen original), adds it through transformers' PEFT integration (`add_adapter`, so the model is not wrapped in a
`PeftModel` and parameter names keep their prefixes), and merges it back into plain weights.

A model using the mixin provides:
- config fields `lora_rank`, `lora_alpha`, `lora_dropout` and a `language_lora_target_modules` property (LLM linear
  layer names, e.g. `("q_proj", "k_proj", "v_proj", "o_proj")`);
- the class attribute `language_model_prefix` (module path of the LLM, `"model.language_model"`);
- the class attribute `lora_modules_to_save` (module paths saved with the adapter), or an override of
  `trained_module_names()` when they depend on the config.
"""

import re
from typing import ClassVar

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper

__all__ = ["LanguageModelLoraMixin"]


class LanguageModelLoraMixin:
    """LLM LoRA for a `PreTrainedModel` (mix in before `PreTrainedModel`'s subclass in the bases)."""

    # Module path of the LLM inside the model; LoRA targets are restricted to it.
    language_model_prefix: ClassVar[str] = "model.language_model"
    # Module paths (as in `named_modules()`) that a LoRA stage trains fully and the adapter therefore saves.
    lora_modules_to_save: ClassVar[tuple[str, ...]] = ()

    def trained_module_names(self) -> list[str]:
        """Names of the modules trained fully next to the LLM's LoRA (saved in the adapter's `modules_to_save`)."""
        return list(self.lora_modules_to_save)

    def language_model_lora_config(self) -> LoraConfig:
        """The peft `LoraConfig` built from the config: LoRA (`config.lora_rank`, `lora_alpha`, `lora_dropout`) on the
        LLM modules `config.language_lora_target_modules`, and `trained_module_names()` as `modules_to_save`, so the
        adapter also holds their trained copies."""
        targets = "|".join(self.config.language_lora_target_modules)
        return LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            # A regex on full module names keeps LoRA inside the LLM (vision towers have `proj`/`fc1`/`q_proj` too).
            target_modules=rf"{re.escape(self.language_model_prefix)}\..*\.({targets})",
            modules_to_save=self.trained_module_names(),
        )

    def add_language_model_lora(self, lora_config: LoraConfig | None = None, adapter_name: str = "default") -> None:
        """Add a LoRA adapter to the LLM (transformers' PEFT integration, `self.add_adapter`) and activate it.

        Args:
            lora_config: defaults to `language_model_lora_config()`. A custom config should keep the modules of
                `trained_module_names()` in `modules_to_save`, or the adapter would not hold what the stage trains
                (the trainers check this).
            adapter_name: peft adapter name.

        Every base weight keeps its value; LoRA B starts at zero, so the outputs are unchanged until training. Save the
        adapter with `hf_regionmm.hub.publish.save_adapter` (or `save_pretrained`, which then writes only the
        adapter) and load it onto the base checkpoint with `load_adapter` or the Auto class `from_pretrained`.
        """
        if lora_config is None:
            lora_config = self.language_model_lora_config()
        if not isinstance(lora_config, LoraConfig):
            raise TypeError(f"`lora_config` must be a peft LoraConfig; got {type(lora_config).__name__}.")
        if getattr(self, "_hf_peft_config_loaded", False) and adapter_name in self.peft_config:
            raise ValueError(
                f"The model already has an adapter {adapter_name!r}; pass another `adapter_name` or merge it first "
                "(`merge_language_model_lora()`)."
            )
        self.add_adapter(lora_config, adapter_name=adapter_name)

    def has_language_model_lora(self) -> bool:
        """Whether LoRA layers sit inside the LLM (unmerged)."""
        language_model = self.get_submodule(self.language_model_prefix)
        return any(isinstance(module, BaseTunerLayer) for module in language_model.modules())

    def merge_language_model_lora(self) -> None:
        """Fold the active adapter into plain weights: LoRA deltas are added to the LLM's linear layers and every
        `modules_to_save` module is replaced by its trained copy; the adapters are removed, so `save_pretrained` writes
        a full checkpoint with the same outputs."""
        if not getattr(self, "_hf_peft_config_loaded", False):
            raise ValueError("The model has no adapter to merge; add one with `add_language_model_lora()`.")
        if len(self.active_adapters()) != 1:
            raise ValueError(
                f"Merge one adapter at a time; active adapters: {self.active_adapters()}. Choose with `set_adapter`."
            )
        wrapped = [
            name for name, module in self.named_modules() if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))
        ]
        replaced: list[str] = []
        for name in wrapped:
            if any(name.startswith(prefix + ".") for prefix in replaced):
                continue  # inside a module already swapped for its merged copy
            replaced.append(name)
            parent_name, _, child_name = name.rpartition(".")
            module = self.get_submodule(name)
            if isinstance(module, ModulesToSaveWrapper):
                merged = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            else:
                module.merge()
                merged = module.get_base_layer()
            setattr(self.get_submodule(parent_name), child_name, merged)
        del self.peft_config
        self._hf_peft_config_loaded = False
        # `load_adapter` leaves its key renamings (`base_model.model.` prefix, `lora_*.<adapter>`) in
        # `_weight_conversions`, which `save_pretrained` reverts on the merged, adapter-free weights; the systems using
        # this mixin have no conversions of their own, so drop them.
        self._weight_conversions = None
