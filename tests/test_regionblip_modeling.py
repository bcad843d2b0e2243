"""RegionBLIP model: presets, from_blip2 (exact BLIP-2 captioning), per-modality LoRA, PaFE, losses, training.

Everything runs on the tiny preset (or a tiny BLIP-2 built from config and saved locally); paper-size presets are
only built on the meta device and their parameter counts checked against sums computed here from the sizes.
"""

import re
import statistics
import time

import numpy as np
import PIL.Image
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import Blip2Config, Blip2ForConditionalGeneration, TrainingArguments

from hf_regionmm.modeling.configuration_regionblip import MODALITIES, RegionBlipConfig
from hf_regionmm.modeling.modeling_regionblip import RegionBlipForConditionalGeneration, infer_modality
from hf_regionmm.systems.regionblip import (
    REGIONBLIP_SYSTEM,
    build_training_dataset,
    example_inputs,
    tiny_regionblip_config,
    tiny_regionblip_processor,
)
from hf_regionmm.trainers.regionblip import RegionBlipCollator, RegionBlipTrainer, SemiHybridSampler

POINT_BERT_TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_groups": 8,
    "group_size": 8,
    "encoder_dims": 32,
}


def _model(seed: int = 0, **overrides) -> RegionBlipForConditionalGeneration:
    torch.manual_seed(seed)
    return RegionBlipForConditionalGeneration(tiny_regionblip_config(**overrides)).eval()


@pytest.fixture(scope="module")
def processor():
    return tiny_regionblip_processor()


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    """A tiny BLIP-2 (OPT) built from config, random queries, saved locally."""
    tiny = tiny_regionblip_config()
    config = Blip2Config(
        vision_config=tiny.vision_config.to_dict(),
        qformer_config=tiny.qformer_config.to_dict(),
        text_config=tiny.text_config.to_dict(),
        num_query_tokens=tiny.num_query_tokens,
        image_token_index=tiny.image_token_index,
    )
    torch.manual_seed(0)
    blip2 = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        blip2.query_tokens.normal_(std=0.5)
    path = tmp_path_factory.mktemp("blip2")
    blip2.save_pretrained(path)
    return path


# ---- presets ---------------------------------------------------------------------------------------------------


def _vit_params(c) -> int:
    h, i, p = c.hidden_size, c.intermediate_size, c.patch_size
    embeddings = h + (3 * p * p * h + h) + ((c.image_size // p) ** 2 + 1) * h
    # transformers stores the q / v biases as one (3h) qkv bias with a zero k part.
    layer = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h)
    return embeddings + c.num_hidden_layers * layer + 2 * h


def _qformer_params(c, adapters: int, rank: int) -> int:
    h, i, e, v = c.hidden_size, c.intermediate_size, c.encoder_hidden_size, c.vocab_size
    # The text side: word + position tables, BERT's LM head (transform, LayerNorm, untied decoder with bias).
    total = 2 * h + v * h + c.max_position_embeddings * h + (h * h + h) + 2 * h + (h * v + v)
    for index in range(c.num_hidden_layers):
        total += 3 * (h * h + h) + (h * h + h) + 2 * h + 2 * ((h * i + i) + (i * h + h) + 2 * h)
        total += adapters * 2 * rank * (h + h)
        if index % c.cross_attention_frequency == 0:
            total += (h * h + h) + 2 * (e * h + h) + (h * h + h) + 2 * h
            total += adapters * rank * ((h + h) + (e + h))
    return total


def _opt_params(c, adapters: int, rank: int) -> int:
    h, f = c.hidden_size, c.ffn_dim
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h + adapters * 2 * rank * 2 * h
    return c.vocab_size * h + (c.max_position_embeddings + 2) * h + c.num_hidden_layers * layer + 2 * h


def _t5_params(c, adapters: int, rank: int) -> int:
    d, ff, inner = c.d_model, c.d_ff, c.num_heads * c.d_kv
    attention = 4 * d * inner + d + adapters * 2 * rank * (d + inner)
    feed_forward = 3 * d * ff + d
    bias = c.relative_attention_num_buckets * c.num_heads
    encoder = c.num_layers * (attention + feed_forward) + bias + d
    decoder = c.num_decoder_layers * (2 * attention + feed_forward) + bias + d
    return c.vocab_size * d + encoder + decoder  # transformers 5 ties T5's LM head to `shared` (T5Config forces it)


def _point_bert_params(c) -> int:
    h, e, ph = c.hidden_size, c.encoder_dims, c.position_hidden_size
    pointnet = (3 * 128 + 128) + 256 + (128 * 256 + 256) + (512 * 512 + 512) + 1024 + (512 * e + e)
    block = 2 * h + 3 * h * h + (h * h + h) + 2 * h + 2 * (4 * h * h) + 4 * h + h
    return pointnet + (e * h + h) + 2 * h + (3 * ph + ph + ph * h + h) + c.num_hidden_layers * block + 2 * h


@pytest.mark.parametrize("name", ["regionblip-opt-2.7b", "regionblip-flant5-xl"])
def test_paper_presets_build_on_meta_and_match_independent_counts(name):
    config = RegionBlipConfig.from_preset(name)
    started = time.perf_counter()
    with torch.device("meta"):
        model = RegionBlipForConditionalGeneration(config)
    assert time.perf_counter() - started < 20
    rank, q, text = config.lora_rank, config.qformer_config.hidden_size, config.text_hidden_size
    image_adapters = 2  # image + image_region in the image Q-Former; the point-cloud Q-Former holds the other two
    if config.is_encoder_decoder_language_model:
        llm = _t5_params(config.text_config, 4, rank)
    else:
        llm = _opt_params(config.text_config, 4, rank)  # the tied LM head is counted once
    expected = (
        _vit_params(config.vision_config)
        + _qformer_params(config.qformer_config, image_adapters, rank)
        + _qformer_params(config.point_cloud_qformer_config, 2, rank)
        + _point_bert_params(config.point_bert_config)
        + (config.point_bert_config.hidden_size * config.vision_config.hidden_size + config.vision_config.hidden_size)
        + 4 * config.num_query_tokens * q
        + (4 * 128 + 128 + 128 * q + q) + (24 * 128 + 128 + 128 * q + q)
        + 4 * (q * text + text)
        + (q * 4 + 4) + (q * 24 + 24)
        + 5 * (q * 256 + 256) + (q * 2 + 2) + 1  # ITC projections (4 modalities + text), ITM head, temperature
        + llm
    )  # fmt: skip
    total = sum(p.numel() for p in model.parameters())
    assert total == expected
    # Paper sizes: EVA ViT-g ~1.0B, Q-Former ~105M (+ ~105M text side, as LAVIS's BertLMHeadModel), Point-BERT
    # ~22M, OPT-2.7B / Flan-T5-XL ~2.7-2.8B.
    assert 0.98e9 < sum(p.numel() for p in model.model.vision_tower.parameters()) < 1.0e9
    assert 21e6 < sum(p.numel() for p in model.model.point_encoder.parameters()) < 23e6
    assert 3.9e9 < total < 4.3e9


def test_config_validation_errors():
    with pytest.raises(ValueError, match="Unknown RegionBLIP preset"):
        RegionBlipConfig.from_preset("regionblip-opt-13b")
    with pytest.raises(ValueError, match=r"`qformer_config.encoder_hidden_size`"):
        tiny_regionblip_config(qformer_config={"encoder_hidden_size": 48})
    with pytest.raises(ValueError, match=r"`image_token_index`"):
        tiny_regionblip_config(image_token_index=10_000)
    with pytest.raises(ValueError, match="OPT or T5"):
        tiny_regionblip_config(text_config={"model_type": "llama"})


# ---- from_blip2 ------------------------------------------------------------------------------------------------


def test_from_blip2_preserves_image_captioning_exactly(blip2_dir, processor):
    blip2 = Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval()
    model = RegionBlipForConditionalGeneration.from_blip2(blip2_dir, point_bert_config=POINT_BERT_TINY).eval()
    images = [PIL.Image.new("RGB", (70, 50), (30, 140, 200)), PIL.Image.new("RGB", (40, 90), (250, 20, 60))]
    inputs = processor(images=images, text=["a photo of", "red"], captions=["a red circle", "a blue square"])
    with torch.no_grad():
        expected = blip2(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                         attention_mask=inputs["attention_mask"]).logits  # fmt: skip
        actual = model(**inputs)
    torch.testing.assert_close(actual.logits, expected, rtol=0, atol=0)
    assert model.active_modality == "image"
    # BLIP-2's queries and projection seed every modality; the LoRA adapters start at zero.
    for modality in MODALITIES:
        torch.testing.assert_close(model.model.query_tokens[modality], blip2.query_tokens)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if ".lora_B." in n)
    # Greedy captions agree with BLIP-2's own generate.
    prompt = processor(images=images, padding_side="left")
    ours = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    theirs = blip2.generate(
        pixel_values=prompt["pixel_values"], input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
        max_new_tokens=4, do_sample=False,
    )  # fmt: skip
    assert torch.equal(ours, theirs)


def test_from_blip2_keeps_blip2_frozen_and_new_modalities_trainable(blip2_dir):
    model = RegionBlipForConditionalGeneration.from_blip2(blip2_dir, point_bert_config=POINT_BERT_TINY)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, _ in model.named_parameters():
        frozen_base = name.startswith(("model.vision_tower.", "model.point_encoder.", "lm_head.")) or (
            name.startswith(("model.qformer.", "model.qformer_text.", "model.language_model."))
            and ".lora_" not in name
        )
        # As released, the image modality's ITC projection (`stage1_proj_img`) is not part of the frozen BLIP-2 path.
        image_path = name in {"model.query_tokens.image"} or (".image." in name and "vision_projections" not in name)
        assert (name in trainable) == (not frozen_base and not image_path), name
    assert "model.point_cloud_qformer.encoder.layer.0.attention.attention.key.weight" in trainable
    assert "model.query_tokens.point_cloud_region" in trainable
    with pytest.raises(TypeError, match="Blip2ForConditionalGeneration"):
        RegionBlipForConditionalGeneration.from_blip2(torch.nn.Linear(2, 2))


# ---- LoRA per modality -----------------------------------------------------------------------------------------


def test_lora_adapters_sit_on_query_value_of_self_and_cross_attention_with_released_scaling():
    model = _model()
    qformer_layers = {n: m for n, m in model.model.qformer.named_modules() if isinstance(m, LoraLayer)}
    target = re.compile(r"encoder\.layer\.\d+\.(attention|crossattention)\.attention\.(query|value)")
    assert all(target.fullmatch(n) for n in qformer_layers)
    assert any(".crossattention.attention.query" in n for n in qformer_layers)
    assert len(qformer_layers) == 2 * 2 * 2  # 2 layers x (self + cross) x (query, value)
    for layer in qformer_layers.values():
        assert set(layer.lora_A) == {"image", "image_region"}
        assert layer.r["image_region"] == 8 and layer.scaling["image_region"] == pytest.approx(1 / 8)
    pc_layers = [m for m in model.model.point_cloud_qformer.modules() if isinstance(m, LoraLayer)]
    assert pc_layers and all(set(m.lora_A) == {"point_cloud", "point_cloud_region"} for m in pc_layers)
    llm_layers = {n: m for n, m in model.model.language_model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted({n.rsplit(".", 1)[-1] for n in llm_layers}) == ["q_proj", "v_proj"]
    assert all(set(m.lora_A) == set(MODALITIES) for m in llm_layers.values())


def test_set_modality_switches_adapters_without_rebuilding_modules():
    model = _model()
    module_ids = [id(m) for m in model.modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    query = model.model.qformer.encoder.layer[0].attention.attention.query
    q_proj = model.model.language_model.decoder.layers[0].self_attn.q_proj
    durations = []
    for modality in ["image_region", "point_cloud", "image", "point_cloud_region"] * 25:
        started = time.perf_counter()
        model.set_modality(modality)
        durations.append(time.perf_counter() - started)
        assert q_proj.active_adapters == [modality]
        assert model.active_modality == modality
    model.set_modality("image_region")
    assert query.active_adapters == ["image_region"]
    assert statistics.median(durations) < 1e-3
    assert [id(m) for m in model.modules()] == module_ids
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="`modality` must be one of"):
        model.set_modality("video")


def test_each_modality_uses_only_its_own_adapter(processor):
    model = _model()
    inputs = example_inputs(processor, model.config)
    image_inputs = {k: v for k, v in inputs.items() if k != "region_boxes"}
    with torch.no_grad():
        region_before = model(**inputs).logits
        image_before = model(**image_inputs).logits
        for name, parameter in model.named_parameters():
            if ".lora_B.image_region." in name:
                parameter.normal_(std=0.5)
        region_after = model(**inputs).logits
        image_after = model(**image_inputs).logits
    assert not torch.allclose(region_before, region_after)
    torch.testing.assert_close(image_after, image_before, rtol=0, atol=0)


def test_modality_adapter_round_trips_as_peft_adapters(processor, tmp_path):
    from peft import PeftModel
    from transformers import Blip2QFormerModel

    trained = _model(seed=0)
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if ".lora_B.image_region." in name:
                parameter.normal_(std=0.3)
    folders = trained.model.save_modality_adapter(tmp_path, "image_region")
    assert [f.name for f in folders] == ["qformer", "language_model"]
    fresh = _model(seed=0)
    inputs = example_inputs(processor, fresh.config)
    with torch.no_grad():
        before = fresh(**inputs).logits
        fresh.model.load_modality_adapter(tmp_path, "image_region")
        torch.testing.assert_close(fresh(**inputs).logits, trained(**inputs).logits)
    assert not torch.allclose(before, trained(**inputs).logits)
    # Plain peft loads the Q-Former part onto a bare transformers Q-Former with the same base weights.
    base = Blip2QFormerModel(fresh.config.qformer_config).eval()
    base_state = {
        key.replace(".base_layer.", "."): value
        for key, value in trained.model.qformer.state_dict().items()
        if ".lora_" not in key
    }
    base.load_state_dict(base_state)
    peft_qformer = PeftModel.from_pretrained(base, str(tmp_path / "qformer"), adapter_name="image_region").eval()
    trained.set_modality("image_region")
    queries = torch.randn(1, 4, 32)
    image_tokens = torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = trained.model.qformer(query_embeds=queries, encoder_hidden_states=image_tokens).last_hidden_state
        actual = peft_qformer(query_embeds=queries, encoder_hidden_states=image_tokens).last_hidden_state
    torch.testing.assert_close(actual, expected)
    with pytest.raises(ValueError, match="`load_directory`"):
        fresh.model.load_modality_adapter(tmp_path / "missing", "image_region")


# ---- PaFE, losses, modalities ----------------------------------------------------------------------------------


def test_pafe_is_added_to_every_query_before_the_qformer_layernorm(processor):
    model = _model()
    inputs = example_inputs(processor, model.config)
    seen = []
    model.model.qformer.layernorm.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    with torch.no_grad():
        model(**inputs)
        position = model.model.region_position_embeddings["image_region"](inputs["region_boxes"])
        expected = model.model.query_tokens["image_region"] + position[:, None, :]
    torch.testing.assert_close(seen[0], expected)
    # PaFE is Linear(4, 16) -> GELU -> Linear(16, 32) in the tiny preset (128 / 768 in the paper).
    layers = model.model.region_position_embeddings["image_region"].layers
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Linear"]
    assert (
        layers[0].in_features == 4 and model.model.region_position_embeddings["point_cloud_region"].in_features == 24
    )


def test_loss_is_lm_plus_lambda_l1_and_terms_are_always_logged(processor):
    model = _model(box_regression_loss_weight=0.5)
    inputs = example_inputs(processor, model.config)
    lm_only = {k: v for k, v in inputs.items() if not k.startswith("qformer_")}
    outputs = model(**lm_only)
    l1 = (outputs.box_predictions - inputs["region_boxes"]).abs().mean()
    torch.testing.assert_close(outputs.loss_dict["loss_reg"], l1.detach())
    torch.testing.assert_close(outputs.loss, outputs.loss_dict["loss_lm"] + 0.5 * l1)
    logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
    lm = torch.nn.functional.cross_entropy(logits, inputs["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(outputs.loss_dict["loss_lm"], lm.detach())
    assert all(float(outputs.loss_dict[name]) == 0.0 for name in ("loss_itc", "loss_itm", "loss_itg"))
    image_outputs = model(**{k: v for k, v in lm_only.items() if k != "region_boxes"})
    assert image_outputs.loss_dict.keys() == outputs.loss_dict.keys()
    assert float(image_outputs.loss_dict["loss_reg"]) == 0.0


def test_point_cloud_modalities_use_point_bert_and_the_point_cloud_qformer(processor):
    model = _model()
    calls = {"image": 0, "point_cloud": 0, "point_bert": 0}
    model.model.qformer.register_forward_hook(lambda *args: calls.__setitem__("image", calls["image"] + 1))
    model.model.point_cloud_qformer.register_forward_hook(
        lambda *args: calls.__setitem__("point_cloud", calls["point_cloud"] + 1)
    )
    model.model.point_encoder.register_forward_hook(
        lambda *a: calls.__setitem__("point_bert", calls["point_bert"] + 1)
    )
    clouds = [np.random.default_rng(i).normal(size=(100, 3)) for i in range(2)]
    inputs = processor(point_clouds=clouds, boxes_3d=[[0, 0, 0, 1, 1, 1]] * 2, captions=["a cube", "a cone"])
    outputs = model(**inputs)
    assert calls == {"image": 0, "point_cloud": 1, "point_bert": 1}
    assert model.active_modality == "point_cloud_region"
    assert outputs.box_predictions.shape == (2, 24) and torch.isfinite(outputs.loss)
    without_box = model(**{k: v for k, v in inputs.items() if k != "region_boxes_3d"})
    assert model.active_modality == "point_cloud" and without_box.box_predictions is None


def test_evaluation_resolution_interpolates_the_vit_positions(processor):
    model = _model()
    image = PIL.Image.new("RGB", (90, 80), (120, 30, 200))
    train_size = model.config.vision_config.image_size
    eval_processor = tiny_regionblip_processor()
    eval_processor.image_processor.size = {"height": train_size + 14, "width": train_size + 14}
    inputs = eval_processor(images=[image], boxes=[[[10, 10, 60, 70]]])
    assert inputs["pixel_values"].shape[-1] == train_size + 14
    with torch.no_grad():
        tokens = model.model.encode_images(inputs["pixel_values"])
        outputs = model(**inputs)
    assert tokens.shape[1] == 1 + ((train_size + 14) // 14) ** 2
    assert torch.isfinite(outputs.logits).all()
    with pytest.raises(ValueError, match=r"`pixel_values`.*multiple of the patch size 14"):
        model.model.encode_images(torch.zeros(1, 3, train_size + 5, train_size + 5))


def test_modality_inference_and_mismatch_errors(processor):
    assert infer_modality(pixel_values=torch.zeros(1)) == "image"
    assert infer_modality(point_clouds=torch.zeros(1), region_boxes_3d=torch.zeros(1)) == "point_cloud_region"
    assert infer_modality() is None
    model = _model()
    inputs = example_inputs(processor, model.config)
    with pytest.raises(ValueError, match=r"`modality='image'` does not match"):
        model(**inputs, modality="image")
    with pytest.raises(ValueError, match=r"`region_boxes` must have shape \(batch=2, 4\)"):
        model(**{**inputs, "region_boxes": inputs["region_boxes"][:1]})
    with pytest.raises(ValueError, match="no modality input"):
        model(input_ids=inputs["input_ids"])


def test_flan_t5_variant_trains_with_a_prefix_lm_loss(processor):
    t5 = {
        "model_type": "t5", "vocab_size": tiny_regionblip_config().text_config.vocab_size, "d_model": 32, "d_ff": 64,
        "d_kv": 16, "num_heads": 2, "num_layers": 1, "num_decoder_layers": 1, "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False, "decoder_start_token_id": 3, "pad_token_id": 3, "eos_token_id": 2,
    }  # fmt: skip
    model = _model(text_config=t5)
    prompt = processor(images=[PIL.Image.new("RGB", (64, 64))] * 2, text=["a photo of"] * 2)
    labels = processor.tokenizer(["red circle", "blue"], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == processor.tokenizer.pad_token_id] = -100
    outputs = model(**prompt, labels=labels)
    assert outputs.logits.shape == (2, labels.shape[1], t5["vocab_size"])
    expected = torch.nn.functional.cross_entropy(outputs.logits.reshape(-1, t5["vocab_size"]), labels.reshape(-1))
    torch.testing.assert_close(outputs.loss_dict["loss_lm"], expected.detach())
    lora = [n for n, m in model.model.language_model.named_modules() if isinstance(m, LoraLayer)]
    assert lora and all(n.endswith((".q", ".v")) for n in lora)

    # Generation encodes queries + prefix once, then decodes; it equals a greedy loop of full forward passes.
    boxes = processor(images=[PIL.Image.new("RGB", (64, 64), (200, 10, 10))] * 2, text=["a photo of"] * 2,
                      boxes=[[[5, 5, 40, 40]], [[10, 10, 60, 50]]])  # fmt: skip
    generated = model.generate(**boxes, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, model.generate(**boxes, max_new_tokens=4, do_sample=False, use_cache=False))
    decoded = torch.full((2, 1), t5["decoder_start_token_id"])
    with torch.no_grad():
        for _ in range(4):
            step = model(**{k: v for k, v in boxes.items() if k != "image_sizes"}, decoder_input_ids=decoded)
            decoded = torch.cat([decoded, step.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, decoded)


# ---- training --------------------------------------------------------------------------------------------------


def test_semi_hybrid_sampler_yields_one_modality_per_batch():
    modalities = ["image_region"] * 5 + ["point_cloud"] * 3 + ["point_cloud_region"] * 4
    sampler = SemiHybridSampler(modalities, batch_size=2, seed=0)
    batches = sampler.batches()
    assert [len(batch) for batch in batches] == [2] * 7
    assert [modalities[b[0]] for b in batches] == ["image_region"] * 3 + ["point_cloud"] * 2 + [
        "point_cloud_region"
    ] * 2
    assert all(len({modalities[i] for i in batch}) == 1 for batch in batches)
    assert sorted(set(list(sampler))) == list(range(12))
    interleaved = SemiHybridSampler(modalities, batch_size=2, seed=0, schedule="interleaved").batches()
    assert sorted(map(sorted, interleaved)) != [sorted(b) for b in batches] or interleaved != batches


def test_trainer_logs_every_term_and_uses_the_released_optimiser(processor, tmp_path):
    torch.manual_seed(0)
    model = RegionBlipForConditionalGeneration(tiny_regionblip_config())
    dataset = build_training_dataset(processor, 6, seed=0)
    assert set(dataset.modalities) == {"image_region", "point_cloud", "point_cloud_region"}
    stage = REGIONBLIP_SYSTEM.training.stages[0]
    overrides = stage.training_arguments_overrides()
    assert (overrides["learning_rate"], overrides["weight_decay"], overrides["warmup_steps"]) == (1e-4, 0.05, 200)
    assert overrides["lr_scheduler_type"] == "cosine_with_min_lr"
    assert overrides["lr_scheduler_kwargs"] == {"min_lr": 1e-5}
    before = model.model.query_tokens["point_cloud"].detach().clone()
    frozen_before = model.model.qformer.encoder.layer[0].attention.attention.key.weight.detach().clone()
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, remove_unused_columns=False, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = RegionBlipTrainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=RegionBlipCollator(processor)
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    assert all({"loss_lm", "loss_reg", "loss_itc", "loss_itm", "loss_itg"} <= set(entry) for entry in logs)
    assert any(entry["loss_itc"] > 0 and entry["loss_itg"] > 0 for entry in logs)
    assert not torch.equal(model.model.query_tokens["point_cloud"], before)
    torch.testing.assert_close(model.model.qformer.encoder.layer[0].attention.attention.key.weight, frozen_before)
    assert trainer.stage_parameter_counts["trainable"] > 0
    with pytest.raises(ValueError, match="mixes modalities"):
        RegionBlipCollator(processor)([dataset[0], dataset[-1]])


# ---- model card --------------------------------------------------------------------------------------------------


def test_model_card_usage_snippet_runs_against_a_saved_tiny_checkpoint(processor, tmp_path, monkeypatch):
    from hf_regionmm.hub.model_card import render_model_card

    checkpoint = tmp_path / "regionblip-tiny"
    _model().save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    card = render_model_card("regionblip", model_id=str(checkpoint), eval_results={"cider": 0.5})
    assert "| cider | 0.5000 |" in card.text
    snippet = card.text.split("```python\n")[1].split("```")[0]
    PIL.Image.new("RGB", (240, 260), (10, 200, 30)).save(tmp_path / "scene.jpg")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "object.npy", rng.normal(size=(100, 3)))
    np.save(tmp_path / "scene.npy", rng.uniform(0, 2, size=(120, 3)))
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(snippet, "card", "exec"), {"print": printed.append})
    assert len(printed) == 4 and all(isinstance(p, list) and len(p) == 1 for p in printed)


def test_checkpoint_with_remote_code_loads_without_the_library(processor, tmp_path):
    import subprocess
    import sys

    from hf_regionmm.processing.processing_regionblip import RegionBlipProcessor

    model = _model()
    classes = (RegionBlipConfig, RegionBlipForConditionalGeneration, RegionBlipProcessor)
    try:
        RegionBlipConfig.register_for_auto_class()
        RegionBlipForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
        RegionBlipProcessor.register_for_auto_class("AutoProcessor")
        model.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
    finally:
        for cls in classes:
            cls._auto_class = None
    assert {"modeling_regionblip.py", "point_bert.py", "processing_regionblip.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    inputs = example_inputs(processor, model.config)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, tmp_path / "logits.pt")
    code = (
        "import sys; sys.modules['hf_regionmm'] = None\n"  # the library cannot be imported
        "import torch\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"path = {str(tmp_path)!r}\n"
        "model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()\n"
        "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)\n"
        "with torch.no_grad():\n"
        "    logits = model(**torch.load(path + '/inputs.pt')).logits\n"
        "print(type(model).__module__.startswith('transformers_modules'), type(processor).__name__,\n"
        "      torch.equal(logits, torch.load(path + '/logits.pt')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "True RegionBlipProcessor True"
