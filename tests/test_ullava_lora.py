"""u-LLaVA's stage II LoRA option (section 4.1): which parameters train, what changes, adapter round trip and merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForImageTextToText, TrainingArguments, set_seed

from hf_regionmm.hub.publish import save_adapter
from hf_regionmm.modeling.modeling_ullava import ULlavaForConditionalGeneration
from hf_regionmm.systems.ullava import _example_scenes, example_inputs, tiny_ullava_config, tiny_ullava_processor
from hf_regionmm.trainers.region_trainer import RegionTrainer, language_model_lora_stage
from hf_regionmm.trainers.ullava import ULLAVA_STAGES, ULlavaCollator, ULlavaTrainer, ULlavaTrainingDataset

# What stage II trains fully next to the LLM's LoRA (saved in the adapter's `modules_to_save`).
STAGE_II_MODULES = (
    "model.multi_modal_projector",
    "seg_projector",
    "loc_projector",
    "loc_head",
    "model.sam_mask_decoder",
)


@pytest.fixture(scope="module")
def processor():
    return tiny_ullava_processor()


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    set_seed(0)
    directory = tmp_path_factory.mktemp("ullava_base")
    ULlavaForConditionalGeneration(tiny_ullava_config()).save_pretrained(directory)
    return directory


def _load(directory: Path) -> ULlavaForConditionalGeneration:
    return ULlavaForConditionalGeneration.from_pretrained(directory).eval()


def _outputs(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Logits, mask logits and boxes of one eval forward."""
    model.eval()
    with torch.no_grad():
        outputs = model(**inputs)
    return outputs.logits, outputs.pred_masks, outputs.pred_boxes


def _assert_same_outputs(actual: tuple, expected: tuple, exact: bool) -> None:
    compare = torch.testing.assert_close
    options = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-5}
    compare(actual[0], expected[0], **options)
    assert len(actual[1]) == len(expected[1])
    for masks, reference in zip(actual[1], expected[1], strict=True):
        compare(masks, reference, **options)
    compare(actual[2], expected[2], **options)


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _expected_lora_trainable(model: ULlavaForConditionalGeneration) -> set[str]:
    """By hand: LoRA A/B on q_proj and v_proj of every LLM layer (released r=8 recipe) + the adapter's copies of the
    stage II modules."""
    expected = set()
    for layer in range(model.config.text_config.num_hidden_layers):
        for projection in ("q_proj", "v_proj"):
            for matrix in ("lora_A", "lora_B"):
                expected.add(f"model.language_model.layers.{layer}.self_attn.{projection}.{matrix}.default.weight")
    for name, _ in model.named_parameters():
        if any(name.startswith(f"{module}.modules_to_save.default.") for module in STAGE_II_MODULES):
            expected.add(name)
    return expected


def test_lora_config_follows_the_released_recipe_and_keeps_outputs(base_checkpoint, processor):
    model = _load(base_checkpoint)
    config = model.config
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    lora_config = model.language_model_lora_config()
    assert (lora_config.r, lora_config.lora_alpha) == (8, 16)
    assert list(lora_config.modules_to_save) == list(STAGE_II_MODULES)

    inputs = example_inputs(processor, config)
    before = _outputs(model, inputs)
    assert not model.has_language_model_lora()
    model.add_language_model_lora()
    assert model.has_language_model_lora()
    lora_modules = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    # Only the LLM's q/v projections, although CLIP's attention has `q_proj` / `v_proj` too.
    assert len(lora_modules) == 2 * config.text_config.num_hidden_layers
    assert all(name.startswith("model.language_model.layers.") for name in lora_modules)
    _assert_same_outputs(_outputs(model, inputs), before, exact=True)  # LoRA B = 0, the copies equal the originals


def test_lora_refused_where_it_cannot_be_saved_or_has_no_recipe(base_checkpoint):
    model = _load(base_checkpoint)
    with pytest.raises(ValueError, match="needs LoRA layers in the LLM"):
        language_model_lora_stage(ULLAVA_STAGES[1], model, ("model.language_model.", "lm_head."))
    with pytest.raises(ValueError, match="has no LoRA recipe"):
        RegionTrainer(model=model, use_lora=True)
    model.add_language_model_lora()
    # Stage I keeps the LLM frozen, so its LoRA stays frozen as well; only the projector's copy trains.
    align = language_model_lora_stage(ULLAVA_STAGES[0], model, ("model.language_model.", "lm_head."))
    assert align.trainable == ("model.multi_modal_projector.modules_to_save.",)


@pytest.fixture(scope="module")
def lora_trained(base_checkpoint, processor, tmp_path_factory):
    """Stage II with `use_lora=True`, 2 steps, and the parameters before training."""
    set_seed(0)
    model = _load(base_checkpoint)
    arguments = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("ullava_lora")),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = ULlavaTrainer(
        model=model,
        args=arguments,
        train_dataset=ULlavaTrainingDataset(_example_scenes(), tasks=("res",)),
        data_collator=ULlavaCollator(processor),
        stage="instruct",
        use_lora=True,
    )
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainable_at_start = _trainable(model)
    trainer.train()
    return trainer, before, trainable_at_start


def test_lora_trainer_trains_exactly_lora_and_the_stage_modules(lora_trained):
    trainer, before, trainable_at_start = lora_trained
    model = trainer.model
    assert trainable_at_start == _expected_lora_trainable(model)
    assert trainer.stage.name == "instruct" and trainer.stage_parameter_counts["trainable"] == sum(
        parameter.numel() for name, parameter in model.named_parameters() if name in trainable_at_start
    )
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    # Frozen: every base LLM weight, the embeddings, lm_head, CLIP, SAM's encoders and the originals behind the copies.
    assert changed <= trainable_at_start
    assert any(".lora_B." in name for name in changed)
    for module in STAGE_II_MODULES:
        assert any(name.startswith(f"{module}.modules_to_save.") for name in changed), module


def test_lora_adapter_round_trip_and_merge_give_the_same_outputs(lora_trained, base_checkpoint, processor, tmp_path):
    trainer, _, _ = lora_trained
    model = trainer.model
    inputs = example_inputs(processor, model.config)
    trained = _outputs(model, inputs)
    base = _outputs(_load(base_checkpoint), inputs)
    assert not torch.allclose(trained[0], base[0]) and not torch.allclose(trained[2], base[2])
    assert not torch.allclose(trained[1][0], base[1][0])

    adapter = save_adapter(model, tmp_path / "adapter", base_model=str(base_checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {path.name for path in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()  # the adapter only, not a copy of the base
    reloaded = _load(base_checkpoint)
    reloaded.load_adapter(str(adapter))
    _assert_same_outputs(_outputs(reloaded, inputs), trained, exact=True)
    auto = AutoModelForImageTextToText.from_pretrained(adapter)
    assert type(auto) is ULlavaForConditionalGeneration
    _assert_same_outputs(_outputs(auto, inputs), trained, exact=True)

    reloaded.merge_language_model_lora()
    assert not reloaded.has_language_model_lora() and not getattr(reloaded, "_hf_peft_config_loaded", False)
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in reloaded.named_parameters())
    merged = _outputs(reloaded, inputs)
    _assert_same_outputs(merged, trained, exact=False)
    reloaded.save_pretrained(tmp_path / "merged")
    _assert_same_outputs(_outputs(_load(tmp_path / "merged"), inputs), merged, exact=True)
