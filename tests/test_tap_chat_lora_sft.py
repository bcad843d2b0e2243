"""TAP-v2-Chat training: LoRA on the LLM (section 3.2 "Training methods"), the chat template, and trl's SFTTrainer.

Everything runs on the tiny config (64-pixel images, 16 visual tokens, a 2-layer Phi) and offline.
"""

import re
from pathlib import Path

import jinja2
import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments, set_seed
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from hf_regionmm.data.synthetic import generate_scenes
from hf_regionmm.hub.publish import save_adapter
from hf_regionmm.modeling.modeling_tap import TapChatForConditionalGeneration
from hf_regionmm.processing.processing_tap import TapChatProcessor, caption_prompt, chat_prompt
from hf_regionmm.systems.tap import chat_example_inputs, tiny_tap_chat_config, tiny_tap_chat_processor
from hf_regionmm.trainers.tap import (
    TAP_CHAT_STAGES,
    TapChatCollator,
    TapChatSFTTrainer,
    TapChatTrainer,
    TapChatTrainingDataset,
    build_tap_chat_sft_dataset,
    lora_stage,
    tap_chat_messages,
)

LORA_MODULE = re.compile(r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|dense)")


@pytest.fixture(scope="module")
def processor() -> TapChatProcessor:
    return tiny_tap_chat_processor()


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    generated = generate_scenes(4, seed=5, split="train", image_size_range=(64, 96), with_masks=False)
    return [generated[index] for index in range(len(generated))]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    set_seed(0)
    directory = tmp_path_factory.mktemp("tap_chat_base")
    TapChatForConditionalGeneration(tiny_tap_chat_config()).save_pretrained(directory)
    return directory


def _load(directory: Path) -> TapChatForConditionalGeneration:
    return TapChatForConditionalGeneration.from_pretrained(directory).eval()


def _logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _expected_lora_trainable(model: TapChatForConditionalGeneration) -> set[str]:
    """What the paper trains, by hand: LoRA A/B of every LLM attention projection + the adapter's copies of the
    projector and of the last k ViT blocks."""
    config = model.config
    expected = set()
    for layer in range(config.text_config.num_hidden_layers):
        for projection in ("q_proj", "k_proj", "v_proj", "dense"):
            for matrix in ("lora_A", "lora_B"):
                expected.add(f"model.language_model.layers.{layer}.self_attn.{projection}.{matrix}.default.weight")
    depth = config.vision_config.vision_num_hidden_layers
    copies = ["model.multi_modal_projector"]
    copies += [f"model.vision_tower.layers.{i}" for i in range(depth - config.num_trainable_vision_blocks, depth)]
    for name, _ in model.named_parameters():
        if any(name.startswith(f"{copy}.modules_to_save.default.") for copy in copies):
            expected.add(name)
    return expected


def _trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


# ---- LoRA --------------------------------------------------------------------------------------------------------


def test_lora_config_follows_the_config_and_leaves_outputs_unchanged(base_checkpoint, processor):
    model = _load(base_checkpoint)
    config = model.config
    assert config.language_lora_target_modules == ("q_proj", "k_proj", "v_proj", "dense")  # Phi's output proj
    llama = tiny_tap_chat_config(text_config={"model_type": "llama", "head_dim": 16})
    assert llama.language_lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_config = model.language_model_lora_config()
    assert (lora_config.r, lora_config.lora_alpha) == (config.lora_rank, config.lora_alpha) == (4, 8)
    assert lora_config.modules_to_save == ["model.multi_modal_projector", "model.vision_tower.layers.2"] + [
        "model.vision_tower.layers.3"
    ]

    inputs = chat_example_inputs(processor, config)
    before = _logits(model, inputs)
    model.add_language_model_lora()
    lora_modules = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    # Only the LLM's attention projections get LoRA, although the ViT has `proj` / `fc1` layers too.
    assert len(lora_modules) == 4 * config.text_config.num_hidden_layers
    assert all(LORA_MODULE.fullmatch(name) for name in lora_modules)
    assert torch.equal(_logits(model, inputs), before)  # LoRA B starts at zero, the copies equal the originals
    with pytest.raises(ValueError, match="already has an adapter"):
        model.add_language_model_lora()


def test_lora_stage_refuses_models_without_a_complete_adapter(base_checkpoint):
    model = _load(base_checkpoint)
    with pytest.raises(ValueError, match="needs LoRA layers in the LLM"):
        lora_stage(TAP_CHAT_STAGES[1], model)
    with pytest.raises(ValueError, match="`use_lora` is False"):
        TapChatTrainer(model=model, lora_config=LoraConfig(r=2, target_modules=["q_proj"]))
    # An adapter without the projector in `modules_to_save` would not save what the stage trains.
    model.add_language_model_lora(LoraConfig(r=2, target_modules=r"model\.language_model\..*\.q_proj"))
    with pytest.raises(ValueError, match="does not keep it in `modules_to_save`"):
        lora_stage(TAP_CHAT_STAGES[1], model)
    with pytest.raises(ValueError, match="pass use_lora=True"):
        TapChatTrainer(model=model)


@pytest.fixture(scope="module")
def lora_trained(base_checkpoint, processor, tmp_path_factory):
    """The instruct stage with `use_lora=True`, 2 steps, and the parameters before training."""
    set_seed(0)
    model = _load(base_checkpoint)
    arguments = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("tap_chat_lora")),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    scenes = generate_scenes(4, seed=1, split="train", image_size_range=(64, 96), with_masks=False)
    trainer = TapChatTrainer(
        model=model,
        args=arguments,
        train_dataset=TapChatTrainingDataset(scenes, task="instruct"),
        data_collator=TapChatCollator(processor),
        stage="instruct",
        use_lora=True,
    )
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainable_at_start = _trainable(model)
    trainer.train()
    return trainer, before, trainable_at_start


def test_lora_trainer_trains_exactly_the_stage_parts(lora_trained):
    trainer, before, trainable_at_start = lora_trained
    model = trainer.model
    assert trainable_at_start == _expected_lora_trainable(model)
    assert trainer.stage.name == "instruct" and trainer.stage_parameter_counts["trainable"] == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable_at_start
    )
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    # Frozen: every base LLM weight, the embeddings, lm_head, the first ViT blocks and the originals behind the copies.
    assert changed <= trainable_at_start
    assert any(".lora_B." in name for name in changed)
    assert any(name.startswith("model.multi_modal_projector.modules_to_save.") for name in changed)
    assert any(name.startswith("model.vision_tower.layers.3.modules_to_save.") for name in changed)


def test_lora_adapter_round_trip_and_merge_give_the_same_outputs(lora_trained, base_checkpoint, processor, tmp_path):
    trainer, _, _ = lora_trained
    model = trainer.model
    inputs = chat_example_inputs(processor, model.config)
    trained = _logits(model, inputs)
    assert not torch.allclose(trained, _logits(_load(base_checkpoint), inputs))

    adapter = save_adapter(model, tmp_path / "adapter", base_model=str(base_checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {path.name for path in adapter.iterdir()}
    assert not (adapter / "model.safetensors").exists()  # the adapter only, not a copy of the base
    reloaded = _load(base_checkpoint)
    reloaded.load_adapter(str(adapter))
    assert torch.equal(_logits(reloaded, inputs), trained)
    # `base_model_name_or_path` names the base, so the Auto class loads base + adapter in one call.
    auto = AutoModelForImageTextToText.from_pretrained(adapter)
    assert type(auto) is TapChatForConditionalGeneration
    assert torch.equal(_logits(auto, inputs), trained)

    reloaded.merge_language_model_lora()
    assert not reloaded.has_language_model_lora() and not getattr(reloaded, "_hf_peft_config_loaded", False)
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in reloaded.named_parameters())
    merged = _logits(reloaded, inputs)
    torch.testing.assert_close(merged, trained, atol=1e-5, rtol=1e-5)
    reloaded.save_pretrained(tmp_path / "merged")
    assert torch.equal(_logits(_load(tmp_path / "merged"), inputs), merged)


# ---- chat template -----------------------------------------------------------------------------------------------


def _user(text: str | None = None, image: object = True) -> dict:
    content = [{"type": "image"} if image is True else {"type": "image", "image": image}] if image else []
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_chat_template_renders_exactly_chat_prompt(processor, scenes):
    single = [_user("what is red ?")]
    assert processor.apply_chat_template(single, add_generation_prompt=True) == chat_prompt("what is red ?")
    history = [_user("what is red ?"), _assistant("a circle ."), {"role": "user", "content": "and blue ?"}]
    expected = chat_prompt("and blue ?", history=[("what is red ?", "a circle .")])
    assert processor.apply_chat_template(history, add_generation_prompt=True) == expected
    assert processor.apply_chat_template([_user()], add_generation_prompt=True) == caption_prompt()

    # A finished conversation ends with the last answer and EOS, as `answers=` supervises it.
    eos = processor.tokenizer.eos_token
    finished = processor.apply_chat_template([*history, _assistant("a square .")])
    assert finished == f"{expected} a square .{eos}"
    assert processor.apply_chat_template([_user(), _assistant("a red star .")]) == f"<image> a red star .{eos}"

    # ... and both ways tokenize identically.
    image = scenes[0]["image"]
    from_template = processor(
        images=[image], text=[processor.apply_chat_template(history, add_generation_prompt=True)]
    )
    from_prompt = processor(images=[image], text=[expected])
    assert torch.equal(from_template["input_ids"], from_prompt["input_ids"])
    tokenized = processor.apply_chat_template(
        [
            [
                _user("what is red ?", image),
                _assistant("a circle ."),
                _user("and blue ?", None),
                _assistant("a square ."),
            ]
        ],
        tokenize=True,
        return_dict=True,
    )
    with_answer = processor(images=[image], text=[expected], answers=["a square ."])
    assert torch.equal(tokenized["input_ids"], with_answer["input_ids"])
    assert torch.equal(tokenized["pixel_values"], with_answer["pixel_values"])


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "no image"}], "exactly one"),
        ([_user("a ?"), _assistant("b"), _user("c ?")], "one image per conversation"),
        ([_user("a ?"), _user("b ?", image=False)], "alternate"),
        ([{"role": "system", "content": "be brief"}, _user("a ?")], "no system prompt"),
        ([_user(), _assistant("a caption"), _user("more ?", image=False)], "caption conversation"),
    ],
)
def test_chat_template_rejects_conversations_it_cannot_render(processor, messages, message):
    with pytest.raises(jinja2.TemplateError, match=message):
        processor.apply_chat_template(messages, add_generation_prompt=True)


def test_chat_template_is_saved_and_loaded_with_the_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is TapChatProcessor and reloaded.num_image_tokens == processor.num_image_tokens
    assert reloaded.chat_template == processor.chat_template
    conversation = [_user("what is red ?"), _assistant("a circle ."), _user("and blue ?", image=False)]
    assert reloaded.apply_chat_template(conversation, add_generation_prompt=True) == chat_prompt(
        "and blue ?", history=[("what is red ?", "a circle .")]
    )


def test_processor_truncation_keeps_the_image_slots_whole(processor, scenes):
    image, prompt = scenes[0]["image"], chat_prompt("what is red ?")
    full = processor(images=[image], text=[prompt], answers=["a circle ."])
    length = full["input_ids"].shape[1]
    cut = processor(images=[image], text=[prompt], answers=["a circle ."], truncation=True, max_length=length - 2)
    assert torch.equal(cut["input_ids"], full["input_ids"][:, : length - 2])
    padded = processor(images=[image], text=[prompt], padding="max_length", max_length=length + 3)
    assert padded["input_ids"].shape[1] == length + 3 and padded["attention_mask"][0, -3:].sum() == 0
    with pytest.raises(ValueError, match="cuts into the 16 image slots"):
        processor(images=[image], text=[prompt], truncation=True, max_length=8)


# ---- SFT -----------------------------------------------------------------------------------------------------------


def test_instruct_label_mask_covers_only_assistant_tokens(processor, scenes):
    rows = build_tap_chat_sft_dataset(scenes[:2], task="instruct", max_turns=2)
    caption = tap_chat_messages(scenes[2], task="caption")
    examples = [dict(rows[0]), dict(rows[1]), caption]
    batch = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(examples)
    tokenizer = processor.tokenizer
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    for row, example in enumerate(examples):
        answers = [m["content"][0]["text"] for m in example["messages"] if m["role"] == "assistant"]
        expected = [token for answer in answers for token in tokenizer(answer, add_special_tokens=False)["input_ids"]]
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        supervised = labels[labels != -100]
        assert supervised.tolist() == [*expected, tokenizer.eos_token_id]
        assert torch.equal(supervised, ids[labels != -100])
        assert (ids == processor.image_token_id).sum() == processor.num_image_tokens
    assert len(rows[0]["messages"]) == 4  # two turns: the earlier answer is supervised too


def test_sft_trainer_runs_the_instruct_stage_with_lora(base_checkpoint, processor, scenes, tmp_path):
    set_seed(0)
    model = _load(base_checkpoint)
    arguments = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-2,
        assistant_only_loss=True,
        max_length=None,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    dataset = build_tap_chat_sft_dataset(scenes, task="instruct", max_turns=2)
    trainer = TapChatSFTTrainer(
        model=model,
        args=arguments,
        train_dataset=dataset,
        processing_class=processor,
        stage="instruct",
        use_lora=True,
    )
    assert isinstance(trainer, SFTTrainer)
    assert _trainable(model) == _expected_lora_trainable(model)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed <= _expected_lora_trainable(model)
    # trl turns gradient checkpointing on; the gradient still reaches the LoRA, the projector and the last ViT block.
    assert any(".lora_B." in name for name in changed)
    assert any(name.startswith("model.multi_modal_projector.modules_to_save.") for name in changed)
    assert any(name.startswith("model.vision_tower.layers.3.modules_to_save.") for name in changed)


def test_sft_trainer_requires_the_answer_only_loss_and_its_own_lora(base_checkpoint, processor, scenes, tmp_path):
    model = _load(base_checkpoint)
    dataset = build_tap_chat_sft_dataset(scenes[:2])
    plain = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="assistant_only_loss=True"):
        TapChatSFTTrainer(model=model, args=plain, train_dataset=dataset, processing_class=processor)
    with pytest.raises(ValueError, match="use_lora=True"):
        TapChatSFTTrainer(
            model=model,
            args=SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to=[], use_cpu=True),
            train_dataset=dataset,
            processing_class=processor,
            peft_config=LoraConfig(r=2),
        )


def test_plain_trl_sft_trainer_trains_on_messages_and_images(base_checkpoint, processor, scenes, tmp_path):
    # DESIGN principle 5: no library trainer, only the processor's chat template and trl's own collator.
    model = _load(base_checkpoint).train()
    before = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    arguments = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        assistant_only_loss=True,
        max_length=None,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=arguments, train_dataset=build_tap_chat_sft_dataset(scenes[:2]), processing_class=processor
    )
    trainer.train()
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.model.multi_modal_projector.linear_1.weight)
