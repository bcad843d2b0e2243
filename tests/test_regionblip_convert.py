"""Conversion of released RegionBLIP (LAVIS) checkpoints (hf_regionmm/hub/convert_regionblip.py).

A synthetic release is built the way the original was trained: a tiny transformers BLIP-2, a tiny RegionBLIP grown
from it with `from_blip2`, its trainable weights perturbed, then exported under the LAVIS names by an inverse mapping
written here independently of the converter (from the rename list in modeling_regionblip.py's docstring), together
with what a LAVIS `_save_checkpoint` really stores besides: every buffer, the LoRA pairs of adapters a Q-Former never
runs, the Q-Former text side and ITC/ITM heads of stage 1. Point-BERT is saved in its original
`{"base_model": {"module.transformer_q.*"}}` format. Converting must give a model whose outputs equal the source's for
the four modalities; bad checkpoints must fail with a clear error and leave nothing behind.
"""

import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Blip2Config, Blip2ForConditionalGeneration

from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.hub.convert_regionblip import (
    convert_lavis_state_dict,
    convert_regionblip_checkpoint,
    lavis_key_to_ours,
)
from hf_regionmm.modeling.modeling_regionblip import RegionBlipForConditionalGeneration
from hf_regionmm.processing.processing_regionblip import IMAGE_TOKEN, RegionBlipProcessor
from hf_regionmm.systems.regionblip import TINY_NUM_POINTS, tiny_regionblip_config, tiny_regionblip_words

LAVIS_MODALITY = {"image": "img", "image_region": "img_region", "point_cloud": "pc", "point_cloud_region": "pc_region"}
OURS_MODALITY = {value: key for key, value in LAVIS_MODALITY.items()}


def _tiny_blip2() -> Blip2ForConditionalGeneration:
    tiny = tiny_regionblip_config()
    config = Blip2Config(
        vision_config=tiny.vision_config.to_dict(),
        qformer_config=tiny.qformer_config.to_dict(),
        text_config=tiny.text_config.to_dict(),
        num_query_tokens=tiny.num_query_tokens,
        image_token_index=tiny.image_token_index,
    )
    torch.manual_seed(0)
    return Blip2ForConditionalGeneration(config).eval()


def _source_model(
    blip2: Blip2ForConditionalGeneration, use_box_regression: bool, qformer_losses: bool = False
) -> RegionBlipForConditionalGeneration:
    """RegionBLIP grown from `blip2` as the release was (released PaFE width 128); what trained (and Point-BERT) is
    then perturbed. Without `qformer_losses`, the captioning model a conversion derives by default."""
    tiny = tiny_regionblip_config()
    torch.manual_seed(1)
    model = RegionBlipForConditionalGeneration.from_blip2(
        blip2,
        point_bert_config=tiny.point_bert_config.to_dict(),
        use_box_regression=use_box_regression,
        use_itc=qformer_losses,
        use_itm=qformer_losses,
        use_itg=qformer_losses,
    ).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad or name.startswith("model.point_encoder."):
                parameter.add_(torch.randn_like(parameter) * 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Inverse mapping: our keys -> LAVIS / Point-BERT keys (written from the docstring, independently of the converter).

_POINT_BERT_INVERSE = [
    (r"^group_encoder\.", "encoder."),
    (r"^position_embedding\.", "pos_embed."),
    (r"^blocks\.(\d+)\.", r"blocks.blocks.\1."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.2\.", ".mlp.fc2."),
]


def _point_bert_original(key: str) -> str:
    for pattern, replacement in _POINT_BERT_INVERSE:
        key = re.sub(pattern, replacement, key)
    return key


_STAGE1_INVERSE = [
    (
        r"^model\.(point_cloud_)?qformer_text\.(word|position)_embeddings\.",
        r"QFORMER\1.bert.embeddings.\2_embeddings.",
    ),
    (r"^model\.(point_cloud_)?qformer_text\.lm_transform\.", r"QFORMER\1.cls.predictions.transform.dense."),
    (r"^model\.(point_cloud_)?qformer_text\.lm_layer_norm\.", r"QFORMER\1.cls.predictions.transform.LayerNorm."),
    (r"^model\.(point_cloud_)?qformer_text\.lm_decoder\.weight$", r"QFORMER\1.cls.predictions.decoder.weight"),
    (r"^model\.(point_cloud_)?qformer_text\.lm_decoder\.bias$", r"QFORMER\1.cls.predictions.bias"),
    (r"^model\.text_projection\.", "stage1_proj_text."),
    (r"^model\.itm_head\.", "img_itm_head."),
    (r"^model\.temperature$", "temp"),
]


def _lavis_key(key: str) -> str:
    for pattern, replacement in _STAGE1_INVERSE:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed.replace("QFORMERpoint_cloud_", "Qformer_pc").replace("QFORMER", "Qformer")
    match = re.match(r"model\.vision_projections\.(\w+)\.(.+)", key)
    if match:
        return f"stage1_proj_{LAVIS_MODALITY[match.group(1)]}.{match.group(2)}"
    lora = re.fullmatch(r"(.+)\.lora_([AB])\.(\w+)\.weight", key)
    if lora:
        key = f"{lora.group(1)}.lora_{lora.group(2)}_{LAVIS_MODALITY[lora.group(3)]}"
    key = key.replace(".base_layer.", ".")
    for ours, qformer in (("model.qformer.", "Qformer.bert."), ("model.point_cloud_qformer.", "Qformer_pc.bert.")):
        if key.startswith(ours):
            rest = key[len(ours) :]
            rest = re.sub(r"^layernorm\.", "embeddings.LayerNorm.", rest)
            rest = rest.replace(".crossattention.attention.", ".crossattention.self.")
            rest = rest.replace(".attention.attention.", ".attention.self.")
            return qformer + rest
    match = re.fullmatch(r"model\.query_tokens\.(\w+)", key)
    if match:
        return f"query_tokens_{LAVIS_MODALITY[match.group(1)]}"
    match = re.match(r"model\.multi_modal_projector\.(\w+)\.(.+)", key)
    if match:
        return f"opt_proj_{LAVIS_MODALITY[match.group(1)]}.{match.group(2)}"
    match = re.match(r"model\.region_position_embeddings\.(\w+)\.layers\.(.+)", key)
    if match:
        return f"{LAVIS_MODALITY[match.group(1)]}_posembed.{match.group(2)}"
    match = re.match(r"model\.box_heads\.(\w+)\.(.+)", key)
    if match:
        return f"reg_{LAVIS_MODALITY[match.group(1)]}.{match.group(2)}"
    for ours, original in (
        ("model.point_cloud_adapter.", "pc_adapter."),
        ("model.language_model.", "opt_model.model."),
        ("lm_head.", "opt_model.lm_head."),
    ):
        if key.startswith(ours):
            return original + key[len(ours) :]
    if key.startswith("model.point_encoder."):
        return "point_encoder." + _point_bert_original(key[len("model.point_encoder.") :])
    raise AssertionError(f"no inverse rule for {key}")


def released_state_dict(model: RegionBlipForConditionalGeneration) -> dict[str, torch.Tensor]:
    """What LAVIS `_save_checkpoint` stores for this model: trainable parameters + every buffer, LAVIS names."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    state = model.state_dict()
    released = {_lavis_key(key): state[key].clone() for key in sorted(trainable | buffers)}
    generator = torch.Generator().manual_seed(2)
    qformer_width = model.config.qformer_config.hidden_size
    # Every LAVIS LoRA linear holds all four pairs, all trainable except the image ones of the image Q-Former; the
    # pairs a Q-Former never runs keep their initial values (A random, B zero) and are saved all the same.
    for key in list(released):
        match = re.fullmatch(r"(Qformer(_pc)?\..+)\.lora_A_(\w+)", key)
        if match is None:
            continue
        unused = ("pc", "pc_region") if match.group(2) is None else ("img", "img_region")
        for modality in unused:
            released[f"{match.group(1)}.lora_A_{modality}"] = torch.randn(released[key].shape, generator=generator)
            released[f"{match.group(1)}.lora_B_{modality}"] = torch.zeros(qformer_width, released[key].shape[0])
    # Stage-1 (ITC / ITM / ITG) parts of the trainable point-cloud Q-Former and heads, and the BERT position ids.
    stage1 = {
        "Qformer_pc.bert.embeddings.word_embeddings.weight": (30, qformer_width),
        "Qformer_pc.bert.embeddings.position_embeddings.weight": (16, qformer_width),
        "Qformer_pc.bert.encoder.layer.0.intermediate.dense.weight": (64, qformer_width),
        "Qformer_pc.bert.encoder.layer.1.output.dense.weight": (qformer_width, 64),
        "Qformer_pc.bert.encoder.layer.1.output.LayerNorm.bias": (qformer_width,),
        "Qformer_pc.cls.predictions.bias": (30,),
        "Qformer_pc.cls.predictions.transform.dense.weight": (qformer_width, qformer_width),
        "stage1_proj_text.weight": (8, qformer_width),
        "stage1_proj_pc_region.bias": (8,),
        "img_itm_head.weight": (2, qformer_width),
        "temp": (),
    }
    released.update(
        {key: torch.randn(shape, generator=generator) for key, shape in stage1.items() if key not in released}
    )
    for key in [key for key in released if key.endswith("cls.predictions.bias")]:
        # BERT ties the decoder bias to `cls.predictions.bias`; the state dict holds both names.
        released[key.replace(".bias", ".decoder.bias")] = released[key]
    released["Qformer.bert.embeddings.position_ids"] = torch.arange(16)[None]
    released["Qformer_pc.bert.embeddings.position_ids"] = torch.arange(16)[None]
    return released


def point_bert_checkpoint(model: RegionBlipForConditionalGeneration) -> dict:
    """Point-BERT's pre-training checkpoint layout, with the modules LAVIS ignores."""
    encoder = model.model.point_encoder.state_dict()
    base = {f"module.transformer_q.{_point_bert_original(key)}": tensor.clone() for key, tensor in encoder.items()}
    base["module.transformer_q.cls_head_finetune.0.weight"] = torch.zeros(4, 4)
    base["module.transformer_q.mask_token"] = torch.zeros(1, 1, 32)
    base["module.dvae.encoder.first_conv.0.weight"] = torch.zeros(128, 3, 1)
    return {"base_model": base, "epoch": 300, "metrics": {"acc": 0.9}}


def _save_release(folder: Path, released: dict, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint_best.pth"
    torch.save({"model": released, "optimizer": {"state": {}, "param_groups": []}, "epoch": 9, **extra}, path)
    return path


def _tokenizer():
    return build_word_tokenizer(tiny_regionblip_words(), extra_special_tokens=[IMAGE_TOKEN])


def _staging_leftovers(parent: Path) -> list[str]:
    return [entry.name for entry in parent.iterdir() if ".converting-" in entry.name]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def blip2() -> Blip2ForConditionalGeneration:
    return _tiny_blip2()


@pytest.fixture(scope="module")
def source_model(blip2) -> RegionBlipForConditionalGeneration:
    return _source_model(blip2, use_box_regression=True)


@pytest.fixture(scope="module")
def release(tmp_path_factory, source_model) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("release")
    point_bert = folder / "point_bert_pretrained.pt"
    torch.save(point_bert_checkpoint(source_model), point_bert)
    return {"pth": _save_release(folder, released_state_dict(source_model)), "point_bert": point_bert}


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, release, blip2, source_model) -> Path:
    destination = tmp_path_factory.mktemp("converted") / "regionblip-tiny-converted"
    result = convert_regionblip_checkpoint(
        str(release["pth"]),
        str(destination),
        blip2=blip2,
        point_bert=release["point_bert"],
        config=source_model.config,
        tokenizer=_tokenizer(),
    )
    assert result == destination
    return destination


def _modality_inputs(config) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(3)
    queries = [config.image_token_index] * config.num_query_tokens
    input_ids = torch.tensor([queries + [1, 5, 9, 7], queries + [1, 6, 8, 4]])
    pixel_values = torch.randn(2, 3, 56, 56, generator=generator)
    point_clouds = torch.randn(2, TINY_NUM_POINTS, 3, generator=generator)
    corners = torch.tensor([[x, y, z] for x in (-0.5, 0.4) for y in (-0.3, 0.6) for z in (-0.2, 0.5)]).flatten()
    return {
        "image": {"input_ids": input_ids, "pixel_values": pixel_values},
        "image_region": {
            "input_ids": input_ids,
            "pixel_values": pixel_values,
            "region_boxes": torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.0, 0.3, 0.5, 0.6]]),
        },
        "point_cloud": {"input_ids": input_ids, "point_clouds": point_clouds},
        "point_cloud_region": {
            "input_ids": input_ids,
            "point_clouds": point_clouds,
            "region_boxes_3d": torch.stack([corners, corners * 0.5]),
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# The real conversion path


def test_inverse_mapping_round_trips_through_the_converter_rules(source_model):
    # Every key of our model that LAVIS names maps back to itself (the base-layer insertion aside).
    for key in source_model.state_dict():
        if key.startswith("model.vision_tower."):
            continue
        back = lavis_key_to_ours(_lavis_key(key))
        assert back in (key, key.replace(".base_layer.", ".")), (key, back)


def test_release_has_the_lavis_layout(release):
    released = torch.load(release["pth"], weights_only=True)["model"]
    assert "Qformer_pc.bert.encoder.layer.0.crossattention.self.value.lora_B_pc_region" in released
    assert "Qformer_pc.bert.encoder.layer.1.attention.self.query.weight" in released
    assert "Qformer.bert.encoder.layer.0.attention.self.query.lora_A_img_region" in released
    assert "Qformer.bert.encoder.layer.0.attention.self.query.lora_A_pc" in released  # never run, saved anyway
    assert "opt_model.model.decoder.layers.1.self_attn.v_proj.lora_A_pc" in released
    assert "img_region_posembed.2.weight" in released and "reg_pc_region.bias" in released
    assert "point_encoder.encoder.second_conv.1.running_var" in released
    # Frozen parts are not in a LAVIS checkpoint.
    assert not any(key.startswith(("opt_model.model.decoder.embed_tokens", "query_tokens_img.")) for key in released)
    assert "query_tokens_img" not in released and "Qformer.bert.embeddings.LayerNorm.weight" not in released


def test_converted_outputs_equal_the_source_for_every_modality(converted_dir, source_model):
    files = sorted(path.name for path in converted_dir.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "README.md" in files
    assert "processor_config.json" in files or "preprocessor_config.json" in files
    assert not any(name.endswith((".pth", ".bin")) for name in files)

    model = AutoModelForImageTextToText.from_pretrained(converted_dir).eval()
    assert isinstance(model, RegionBlipForConditionalGeneration)
    source_state, converted_state = source_model.state_dict(), model.state_dict()
    assert converted_state.keys() == source_state.keys()
    differing = [key for key in source_state if not torch.equal(converted_state[key], source_state[key])]
    # Only the image LoRA's A differs (drawn from a fixed seed); its B is zero in both, so it adds nothing.
    assert differing and all(".lora_A.image." in key for key in differing)
    assert all(not bool(converted_state[key.replace("lora_A", "lora_B")].any()) for key in differing)

    for modality, inputs in _modality_inputs(model.config).items():
        with torch.no_grad():
            expected = source_model(**inputs)
            actual = model(**inputs)
        assert model.active_modality == modality
        torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-6, msg=modality)
        if modality.endswith("region"):
            torch.testing.assert_close(actual.box_predictions, expected.box_predictions, rtol=0, atol=1e-6)
    inputs = _modality_inputs(model.config)["point_cloud_region"]
    with torch.no_grad():
        expected_ids = source_model.generate(**inputs, max_new_tokens=4, do_sample=False)
        actual_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(actual_ids, expected_ids)


def test_processor_is_written_with_the_model_placeholder_id(converted_dir):
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert isinstance(processor, RegionBlipProcessor)
    config = RegionBlipForConditionalGeneration.config_class.from_pretrained(converted_dir)
    assert processor.image_token_id == config.image_token_index
    assert processor.num_query_tokens == config.num_query_tokens
    assert processor.image_processor.size.height == config.vision_config.image_size


def test_release_folder_without_options_derives_the_released_config(tmp_path, blip2):
    # The shipped yamls train without `enable_aux_regloss`: no box heads. A folder with the .pth, blip2/ and no
    # `config=` must give exactly from_blip2's config (box regression off, point-cloud Q-Former on).
    source_model = _source_model(blip2, use_box_regression=False)
    folder = tmp_path / "release"
    _save_release(folder, released_state_dict(source_model))
    blip2.save_pretrained(folder / "blip2")
    _tokenizer().save_pretrained(folder / "blip2")
    destination = convert_regionblip_checkpoint(
        str(folder), str(tmp_path / "converted"), point_bert=source_model.model.point_encoder
    )
    model = RegionBlipForConditionalGeneration.from_pretrained(destination).eval()
    assert model.config.use_box_regression is False and model.model.box_heads is None
    assert model.config.use_point_cloud_qformer
    assert model.config.position_embedding_hidden_size == 128
    inputs = _modality_inputs(model.config)["image_region"]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, source_model(**inputs).logits, rtol=0, atol=1e-6)
    # The tokenizer came from the blip2 folder.
    assert isinstance(AutoProcessor.from_pretrained(destination), RegionBlipProcessor)


def test_stage1_heads_and_qformer_text_map_when_the_config_keeps_them(tmp_path, blip2):
    # With ITC / ITM / ITG on, the release's `stage1_proj_*`, `img_itm_head`, `temp` and the point-cloud Q-Former's
    # text side (BERT embeddings, text FFN, `cls` head) land in the model; the frozen rest comes from base weights.
    source = _source_model(blip2, use_box_regression=False, qformer_losses=True)
    released = released_state_dict(source)
    for key in (
        "Qformer_pc.cls.predictions.decoder.bias",
        "stage1_proj_pc_region.weight",
        "img_itm_head.bias",
        "temp",
    ):
        assert key in released
    trained = {name for name, parameter in source.named_parameters() if parameter.requires_grad}
    state = source.state_dict()
    base = {key: tensor for key, tensor in state.items() if key not in trained}
    converted = convert_lavis_state_dict(released, source.config, base_weights=base)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[key], state[key]) for key in state)
    assert torch.equal(converted["model.temperature"], released["temp"])

    released["Qformer_pc.cls.predictions.decoder.bias"] = released["Qformer_pc.cls.predictions.bias"] + 1
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.bias.*ties together"):
        convert_lavis_state_dict(released, source.config, base_weights=base)
    # Through the file path, transformers' BLIP-2 has no image Q-Former text side: the error says what to do.
    source_path = _save_release(tmp_path / "release", released_state_dict(source))
    with pytest.raises(ValueError, match=r"model\.qformer_text\..*use_itc=use_itm=use_itg=False"):
        convert_regionblip_checkpoint(
            source_path,
            tmp_path / "converted",
            blip2=blip2,
            point_bert=source.model.point_encoder,
            config=source.config,
        )


# ----------------------------------------------------------------------------------------------------------------
# Failures: clear errors, nothing written


def test_unknown_keys_are_named_unless_allowed(tmp_path, release, blip2, source_model, caplog):
    released = torch.load(release["pth"], weights_only=True)["model"]
    released["roi_feat_proj_img_region.weight"] = torch.zeros(4, 4)
    source = _save_release(tmp_path / "release", released)
    destination = tmp_path / "out" / "converted"
    options = {"blip2": blip2, "point_bert": release["point_bert"], "config": source_model.config}
    with pytest.raises(ValueError, match=r"1 weights that are not part of the released RegionBLIP layout") as error:
        convert_regionblip_checkpoint(source, destination, **options)
    assert "roi_feat_proj_img_region.weight" in str(error.value) and "allow_extra_keys=True" in str(error.value)
    assert not destination.exists()
    assert not (tmp_path / "out").exists() or _staging_leftovers(tmp_path / "out") == []

    base = {key: tensor for key, tensor in source_model.state_dict().items() if ".lora_A.image." not in key}
    base.update(
        {key: torch.zeros_like(tensor) for key, tensor in source_model.state_dict().items() if key not in base}
    )
    with caplog.at_level("WARNING"):
        converted = convert_lavis_state_dict(released, source_model.config, base_weights=base, allow_extra_keys=True)
    assert "roi_feat_proj_img_region.weight" in caplog.text
    assert converted.keys() == source_model.state_dict().keys()


def test_missing_trained_weight_is_named(tmp_path, release, blip2, source_model):
    released = torch.load(release["pth"], weights_only=True)["model"]
    del released["query_tokens_pc"]
    del released["Qformer.bert.encoder.layer.1.crossattention.self.value.lora_B_img_region"]
    source = _save_release(tmp_path / "release", released)
    with pytest.raises(ValueError, match=r"lacks 2 weights that train") as error:
        convert_regionblip_checkpoint(
            source, tmp_path / "converted", blip2=blip2, point_bert=release["point_bert"], config=source_model.config
        )
    assert "model.query_tokens.point_cloud" in str(error.value)
    assert "model.qformer.encoder.layer.1.crossattention.attention.value.lora_B.image_region.weight" in str(
        error.value
    )
    assert not (tmp_path / "converted").exists()


def test_missing_base_weights_and_shape_mismatch_are_explained(tmp_path, release, blip2, source_model):
    destination = tmp_path / "converted"
    with pytest.raises(ValueError, match=r"`blip2` is required"):
        convert_regionblip_checkpoint(release["pth"], destination, point_bert=release["point_bert"])
    with pytest.raises(ValueError, match=r"model\.point_encoder\..*Pass `point_bert=`"):
        convert_regionblip_checkpoint(release["pth"], destination, blip2=blip2, config=source_model.config)
    released = torch.load(release["pth"], weights_only=True)["model"]
    released["opt_proj_pc.weight"] = torch.zeros(7, 32)
    source = _save_release(tmp_path / "release", released)
    with pytest.raises(ValueError, match=r"opt_proj_pc\.weight \(7, 32\) -> model\.multi_modal_projector"):
        convert_regionblip_checkpoint(
            source, destination, blip2=blip2, point_bert=release["point_bert"], config=source_model.config
        )
    assert not destination.exists()


class _MaliciousGlobal:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this would create a folder: proof of arbitrary code execution.
        return (os.mkdir, (str(self.marker),))


def test_pth_with_a_class_object_is_refused(tmp_path, release, blip2):
    marker = tmp_path / "pwned"
    source = _save_release(tmp_path / "release", {"temp": torch.ones(())}, config=_MaliciousGlobal(marker))
    destination = tmp_path / "converted"
    with pytest.raises(ValueError, match=r"Refusing to load `source` checkpoint_best\.pth.*weights_only"):
        convert_regionblip_checkpoint(source, destination, blip2=blip2, point_bert=release["point_bert"])
    assert not marker.exists()
    torch.save({"base_model": {"module.transformer_q.norm.weight": _MaliciousGlobal(marker)}}, tmp_path / "pb.pt")
    with pytest.raises(ValueError, match=r"Refusing to load `point_bert` pb\.pt"):
        convert_regionblip_checkpoint(release["pth"], destination, blip2=blip2, point_bert=tmp_path / "pb.pt")
    assert not marker.exists()
    assert not destination.exists() and _staging_leftovers(tmp_path) == []


def test_failure_while_writing_leaves_no_partial_output(tmp_path, release, blip2, source_model, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(RegionBlipProcessor, "save_pretrained", fail)
    destination = tmp_path / "converted"
    with pytest.raises(OSError, match="disk full"):
        convert_regionblip_checkpoint(
            release["pth"],
            destination,
            blip2=blip2,
            point_bert=release["point_bert"],
            config=source_model.config,
            tokenizer=_tokenizer(),
        )
    assert not destination.exists()
    assert _staging_leftovers(tmp_path) == []


def test_existing_destination_and_wrong_tokenizer_are_refused(tmp_path, release, blip2, source_model):
    destination = tmp_path / "converted"
    destination.mkdir()
    (destination / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match=r"`destination`.*already exists"):
        convert_regionblip_checkpoint(release["pth"], destination, blip2=blip2)
    assert sorted(path.name for path in destination.iterdir()) == ["keep.txt"]

    tokenizer = build_word_tokenizer(tiny_regionblip_words() + ("extra",), extra_special_tokens=[IMAGE_TOKEN])
    with pytest.raises(ValueError, match=r"`tokenizer` maps '<image>' to id"):
        convert_regionblip_checkpoint(
            release["pth"],
            tmp_path / "other",
            blip2=blip2,
            point_bert=release["point_bert"],
            config=source_model.config,
            tokenizer=tokenizer,
        )
    assert not (tmp_path / "other").exists() and _staging_leftovers(tmp_path) == []
