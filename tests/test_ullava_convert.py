"""Conversion of released u-LLaVA checkpoints (`hf_regionmm/hub/convert_ullava.py`).

A synthetic "released" checkpoint is built from a tiny u-LLaVA: its state dict is renamed back to the ORIGINAL key
names by an inverse mapping written here independently of the converter (segment-anything names for SAM, HF CLIP
under `llm.vision_encoder.vision_model`, `seg_projector` or the older `text_hidden_fcs.0`, with or without `det_*`,
transformers-4.29 `rotary_emb.inv_freq` / CLIP `position_ids` buffers, SAM `pixel_mean`/`pixel_std`). The legacy
layout (no `det_*`) also drops the `[LOC]` row from the vocabulary, as the Jan-2024 Hub weights have 10 new tokens.
Converting must give outputs (logits, masks, boxes) equal to the source model's; bad checkpoints must fail with a
clear error and leave nothing behind.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_regionmm.data.synthetic import generate_scenes
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.hub.convert_ullava import (
    convert_released_state_dict,
    convert_ullava_checkpoint,
    ullava_config_from_released,
)
from hf_regionmm.modeling.configuration_ullava import ULLAVA_NEW_TOKENS
from hf_regionmm.modeling.modeling_ullava import ULlavaForConditionalGeneration
from hf_regionmm.processing import processing_ullava
from hf_regionmm.systems.ullava import tiny_ullava_config, tiny_ullava_processor, tiny_ullava_words

LOC = ULLAVA_NEW_TOKENS.index("[LOC]")


def _source_config():
    # The release's SAM mask decoder has 8 heads (the shapes cannot tell); raw location outputs as released.
    return tiny_ullava_config(
        sam_config={"mask_decoder_config": {"num_attention_heads": 8}},
        loc_box_activation="none",
        num_video_frames=4,
    )


# ----------------------------------------------------------------------------------------------------------------
# Inverse mapping: this library's keys -> the original release's keys (written independently of the converter).

_SAM_ENCODER = [
    (r"^patch_embed\.projection\.", "patch_embed.proj."),
    (r"^layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
    (r"^layers\.(\d+)\.", r"blocks.\1."),
    (r"^neck\.conv1\.", "neck.0."),
    (r"^neck\.layer_norm1\.", "neck.1."),
    (r"^neck\.conv2\.", "neck.2."),
    (r"^neck\.layer_norm2\.", "neck.3."),
]
_SAM_PROMPT = [
    (r"^shared_embedding\.positional_embedding$", "pe_layer.positional_encoding_gaussian_matrix"),
    (r"^point_embed\.", "point_embeddings."),
    (r"^mask_embed\.conv1\.", "mask_downscaling.0."),
    (r"^mask_embed\.layer_norm1\.", "mask_downscaling.1."),
    (r"^mask_embed\.conv2\.", "mask_downscaling.3."),
    (r"^mask_embed\.layer_norm2\.", "mask_downscaling.4."),
    (r"^mask_embed\.conv3\.", "mask_downscaling.6."),
]
_SAM_DECODER = [
    (r"^transformer\.layers\.(\d+)\.layer_norm(\d)\.", r"transformer.layers.\1.norm\2."),
    (r"^transformer\.layer_norm_final_attn\.", "transformer.norm_final_attn."),
    (r"^upscale_conv1\.", "output_upscaling.0."),
    (r"^upscale_layer_norm\.", "output_upscaling.1."),
    (r"^upscale_conv2\.", "output_upscaling.3."),
    # SAM's 3-layer MLPs: proj_in, layers.0, proj_out -> layers.0, 1, 2.
    (r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_in\.", r"\1.layers.0."),
    (r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.layers.1."),
    (r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.proj_out\.", r"\1.layers.2."),
]


def _apply(rules, name: str) -> str:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return name


def _original_key(key: str, seg_name: str) -> str | None:
    parts = [
        ("model.language_model.", "llm.model.", []),
        ("lm_head.", "llm.lm_head.", []),
        ("model.vision_tower.", "llm.vision_encoder.vision_model.", []),
        ("model.multi_modal_projector.linear_1.", "llm.vision_projector.", []),
        ("seg_projector.", "seg_projector." if seg_name == "seg_projector" else "text_hidden_fcs.0.", []),
        ("loc_projector.", "det_projector.", []),
        ("loc_head.", "det_decoder.", []),
        ("model.sam_vision_encoder.", "visual_model.image_encoder.", _SAM_ENCODER),
        ("model.sam_prompt_encoder.", "visual_model.prompt_encoder.", _SAM_PROMPT),
        ("model.sam_mask_decoder.", "visual_model.mask_decoder.", _SAM_DECODER),
    ]
    for ours, theirs, rules in parts:
        if key.startswith(ours):
            return theirs + _apply(rules, key[len(ours) :])
    raise AssertionError(f"no inverse rule for {key}")


def released_state_dict(
    model: ULlavaForConditionalGeneration, *, seg_name: str = "seg_projector", with_det: bool = True
) -> dict[str, torch.Tensor]:
    """The model's weights under the original names; without `det_*`, also without the `[LOC]` vocabulary row."""
    config = model.config
    original = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(("loc_projector.", "loc_head.")) and not with_det:
            continue
        if key.endswith(("rotary_emb.inv_freq", "original_inv_freq", "position_ids")):
            continue
        value = tensor.clone()
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight") and not with_det:
            loc_row = config.base_vocab_size + LOC
            value = torch.cat([value[:loc_row], value[loc_row + 1 :]])
        original[_original_key(key, seg_name)] = value
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(text.num_hidden_layers):
        original[f"llm.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    positions = config.num_image_tokens + 1
    original["llm.vision_encoder.vision_model.embeddings.position_ids"] = torch.arange(positions)[None]
    original["visual_model.pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    original["visual_model.pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return original


def released_config_json(config) -> dict:
    """The parts of the original `config.json` (UllavaConfig with a nested `llm_config`) the converter reads."""
    text, vision = config.text_config, config.vision_config
    return {
        "architectures": ["UllavaForCausalLM"],
        "model_type": "ullava",
        "out_dim": config.sam_prompt_dim,
        "llm_config": {
            "model_type": "ullava_core",
            "hidden_size": text.hidden_size,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "max_position_embeddings": text.max_position_embeddings,
            "rms_norm_eps": text.rms_norm_eps,
            "vision_hidden_layer": config.vision_feature_layer,
            "projector_type": "mlp",
            "vision_config": {"model_type": "clip_vision_model", "num_attention_heads": vision.num_attention_heads},
            "transformers_version": "4.29.1",
        },
    }


def write_release(folder: Path, weights: dict, config, *, fmt: str = "safetensors", shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(released_config_json(config)))
    build_word_tokenizer(tiny_ullava_words()).save_pretrained(folder)
    keys = sorted(weights)
    groups = [keys[index::shards] for index in range(shards)]
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        names = [f"{stem}.{suffix}"]
    else:
        names = [f"{stem}-{index + 1:05d}-of-{shards:05d}.{suffix}" for index in range(shards)]
        weight_map = {key: name for name, group in zip(names, groups) for key in group}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, group in zip(names, groups):
        shard = {key: weights[key].contiguous() for key in group}
        if fmt == "safetensors":
            save_file(shard, str(folder / name))
        else:
            torch.save(shard, folder / name)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def source_model() -> ULlavaForConditionalGeneration:
    torch.manual_seed(0)
    model = ULlavaForConditionalGeneration(_source_config()).eval()
    with torch.no_grad():
        # Break init symmetries (zero biases, equal LayerNorms) so a swapped or dropped weight changes the outputs.
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.fixture(scope="module")
def legacy_named_conversion(source_model) -> tuple[dict, dict]:
    released = released_state_dict(source_model, seg_name="text_hidden_fcs")
    return released, convert_released_state_dict(released, source_model.config)


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    return generate_scenes(2, seed=3, image_size_range=(64, 96), min_objects=2, max_objects=3, with_masks=True)


def _inputs(scenes, with_loc: bool) -> dict:
    processor = tiny_ullava_processor()
    answers = (
        [processing_ullava.res_answer("red circle"), processing_ullava.rec_answer("blue square")]
        if with_loc
        else ["Sure. Info: [SEG]; [tag]red circle[/tag].", "Sure. Info: [SEG] [SEG]; [tag]blue[/tag]."]
    )
    inputs = processor(
        images=[scene["image"] for scene in scenes],
        text=["where is the red circle?", "find the blue square"],
        answers=answers,
        return_tensors="pt",
    )
    return {key: value for key, value in inputs.items() if key != "labels"}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


# ----------------------------------------------------------------------------------------------------------------
# Mapping facts, checked by hand against segment-anything / transformers SAM names


@pytest.mark.parametrize(
    ("original", "ours"),
    [
        ("visual_model.image_encoder.blocks.1.attn.qkv.weight", "model.sam_vision_encoder.layers.1.attn.qkv.weight"),
        ("visual_model.image_encoder.blocks.0.norm2.bias", "model.sam_vision_encoder.layers.0.layer_norm2.bias"),
        ("visual_model.image_encoder.neck.2.weight", "model.sam_vision_encoder.neck.conv2.weight"),
        ("visual_model.image_encoder.patch_embed.proj.bias", "model.sam_vision_encoder.patch_embed.projection.bias"),
        (
            "visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
            "model.sam_prompt_encoder.shared_embedding.positional_embedding",
        ),
        ("visual_model.prompt_encoder.point_embeddings.3.weight", "model.sam_prompt_encoder.point_embed.3.weight"),
        (
            "visual_model.prompt_encoder.mask_downscaling.4.bias",
            "model.sam_prompt_encoder.mask_embed.layer_norm2.bias",
        ),
        (
            "visual_model.mask_decoder.transformer.layers.1.norm4.weight",
            "model.sam_mask_decoder.transformer.layers.1.layer_norm4.weight",
        ),
        (
            "visual_model.mask_decoder.output_hypernetworks_mlps.2.layers.2.bias",
            "model.sam_mask_decoder.output_hypernetworks_mlps.2.proj_out.bias",
        ),
        (
            "visual_model.mask_decoder.iou_prediction_head.layers.1.weight",
            "model.sam_mask_decoder.iou_prediction_head.layers.0.weight",
        ),
        ("visual_model.mask_decoder.output_upscaling.1.weight", "model.sam_mask_decoder.upscale_layer_norm.weight"),
        ("text_hidden_fcs.0.2.weight", "seg_projector.2.weight"),
        ("det_decoder.4.bias", "loc_head.4.bias"),
        ("llm.vision_projector.weight", "model.multi_modal_projector.linear_1.weight"),
        ("llm.vision_encoder.vision_model.pre_layrnorm.weight", "model.vision_tower.pre_layrnorm.weight"),
    ],
)
def test_original_names_map_to_transformers_names(legacy_named_conversion, original, ours):
    released, converted = legacy_named_conversion
    assert original in released
    assert torch.equal(converted[ours], released[original])


def test_config_is_inferred_from_the_shapes(source_model):
    released = released_state_dict(source_model)
    inferred = ullava_config_from_released(released, released_config_json(source_model.config), num_video_frames=4)
    source = source_model.config
    for part in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        ours, theirs = getattr(inferred.sam_config, part).to_dict(), getattr(source.sam_config, part).to_dict()
        # Init settings describe no weight and no computation.
        skip = ("_attn_implementation_autoset", "initializer_range")
        assert {key: ours[key] for key in theirs if key not in skip} == {
            key: theirs[key] for key in theirs if key not in skip
        }, part
    assert inferred.sam_config.vision_config.global_attn_indexes == [1]
    assert inferred.sam_config.vision_config.window_size == 4
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
        assert getattr(inferred.text_config, name) == getattr(source.text_config, name), name
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(inferred.vision_config, name) == getattr(source.vision_config, name), name
    assert (inferred.loc_projector_dim, inferred.loc_head_hidden_sizes) == (32, (32, 16))
    assert (inferred.loc_box_activation, inferred.rec_fusion, inferred.seg_token_offset) == ("none", "box", "previous")
    # Without config.json the head counts follow the release's conventions (CLIP head width 64), which a 32-wide
    # model cannot have: a clear error instead of a wrong model.
    with pytest.raises(ValueError, match=r"CLIP width 32 does not fit num_attention_heads=0.*config\.json"):
        ullava_config_from_released(released)


# ----------------------------------------------------------------------------------------------------------------
# End to end: released folder -> converted folder -> equal outputs


@pytest.mark.parametrize(
    ("seg_name", "with_det", "fmt", "shards"),
    [
        ("seg_projector", True, "safetensors", 2),
        ("text_hidden_fcs", True, "bin", 1),
        ("seg_projector", False, "safetensors", 1),
        ("text_hidden_fcs", False, "bin", 2),
    ],
)
def test_converted_outputs_equal_the_source(tmp_path, source_model, scenes, seg_name, with_det, fmt, shards):
    released = released_state_dict(source_model, seg_name=seg_name, with_det=with_det)
    release = write_release(tmp_path / "release", released, source_model.config, fmt=fmt, shards=shards)
    destination = convert_ullava_checkpoint(release, tmp_path / "converted", num_video_frames=4)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted", "release"]

    model = AutoModelForImageTextToText.from_pretrained(destination).eval()
    processor = AutoProcessor.from_pretrained(destination)
    assert isinstance(model, ULlavaForConditionalGeneration)
    assert processor.tokenizer.convert_tokens_to_ids(list(ULLAVA_NEW_TOKENS)) == list(
        range(model.config.base_vocab_size, model.config.text_config.vocab_size)
    )
    inputs = _inputs(scenes, with_loc=with_det)
    expected, actual = _run(source_model, inputs), _run(model, inputs)
    assert len(actual.pred_masks) == 2 and actual.pred_masks[1].shape[0] == (0 if with_det else 2)
    for ours, theirs in zip(actual.pred_masks, expected.pred_masks, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if with_det:
        torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=0, atol=1e-6)
        assert model.config.rec_fusion == "box"
    else:
        loc_id = model.config.loc_token_id
        keep = [index for index in range(model.config.text_config.vocab_size) if index != loc_id]
        torch.testing.assert_close(actual.logits[..., keep], expected.logits[..., keep], rtol=0, atol=1e-5)
        # The inserted `[LOC]` lm_head row is the mean row: its logit is the mean of the released logits.
        torch.testing.assert_close(actual.logits[..., loc_id], actual.logits[..., keep].mean(-1), rtol=0, atol=1e-5)
        assert actual.pred_boxes is None and model.config.rec_fusion == "mask"


def test_single_weight_file_with_an_explicit_config(tmp_path, source_model, scenes):
    weights = tmp_path / "ullava.bin"
    torch.save(released_state_dict(source_model), weights)
    destination = convert_ullava_checkpoint(weights, tmp_path / "out", config=source_model.config)
    assert not (destination / "processor_config.json").exists()  # no tokenizer next to a bare file
    model = ULlavaForConditionalGeneration.from_pretrained(destination).eval()
    inputs = _inputs(scenes, with_loc=True)
    torch.testing.assert_close(_run(model, inputs).logits, _run(source_model, inputs).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Bad checkpoints: clear errors, nothing written


def _assert_nothing_written(parent: Path, destination: Path) -> None:
    assert not destination.exists()
    assert not [path for path in parent.iterdir() if ".converting-" in path.name]


def test_unknown_keys_are_listed_and_nothing_is_written(tmp_path, source_model):
    released = released_state_dict(source_model)
    released["visual_model.image_encoder.extra_adapter.weight"] = torch.zeros(2)
    released["llm.model.layers.0.self_attn.lora_A.weight"] = torch.zeros(2)
    release = write_release(tmp_path / "release", released, source_model.config)
    with pytest.raises(ValueError, match=r"2 weights .*extra_adapter.*lora_A|2 weights .*lora_A.*extra_adapter"):
        convert_ullava_checkpoint(release, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_missing_and_misshapen_weights_are_listed(source_model):
    released = released_state_dict(source_model)
    del released["visual_model.mask_decoder.output_upscaling.3.weight"]
    del released["seg_projector.0.bias"]
    with pytest.raises(ValueError, match=r"lacks 2 weights.*upscale_conv2\.weight.*seg_projector\.0\.bias"):
        convert_released_state_dict(released, source_model.config)
    released = released_state_dict(source_model)
    released["det_decoder.2.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"det_decoder\.2\.weight \(8, 32\) -> loc_head\.2\.weight \(16, 32\)"):
        convert_released_state_dict(released, source_model.config)


def test_wrong_sam_normalisation_is_refused(source_model):
    released = released_state_dict(source_model)
    released["visual_model.pixel_std"] = torch.ones(3, 1, 1)
    with pytest.raises(ValueError, match=r"visual_model\.pixel_std.*SAM's"):
        convert_released_state_dict(released, source_model.config)


class _NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_a_non_tensor_object_is_refused(tmp_path, source_model, capsys):
    release = tmp_path / "release"
    release.mkdir()
    torch.save({"llm.lm_head.weight": torch.zeros(2), "payload": _NotATensor()}, release / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"Refusing to load pytorch_model\.bin.*weights_only"):
        convert_ullava_checkpoint(release, tmp_path / "out")
    assert "must never run" not in capsys.readouterr().out
    torch.save({"llm.lm_head.weight": torch.zeros(2), "step": 3}, release / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"flat state dict"):
        convert_ullava_checkpoint(release, tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_failure_while_writing_leaves_no_partial_folder(tmp_path, source_model, monkeypatch):
    release = write_release(tmp_path / "release", released_state_dict(source_model), source_model.config)

    def broken_card(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_regionmm.hub.conversion.write_model_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        convert_ullava_checkpoint(release, tmp_path / "out", num_video_frames=4)
    _assert_nothing_written(tmp_path, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"`destination`.*not an empty folder"):
        convert_ullava_checkpoint(release, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


def test_legacy_tokenizer_is_re_laid_out_and_foreign_config_refused(tmp_path, source_model):
    released = released_state_dict(source_model, with_det=False)
    release = write_release(tmp_path / "release", released, source_model.config)
    legacy = [token for token in ULLAVA_NEW_TOKENS if token != "[LOC]"]
    legacy_tokenizer = build_word_tokenizer(tiny_ullava_words(), extra_special_tokens=legacy)
    legacy_tokenizer.save_pretrained(release)
    destination = convert_ullava_checkpoint(release, tmp_path / "out", num_video_frames=4)
    tokenizer = AutoProcessor.from_pretrained(destination).tokenizer
    base = source_model.config.base_vocab_size
    assert tokenizer.convert_tokens_to_ids(["[SEG]", "[LOC]", "[tag]", "[/tag]"]) == [
        base + 7,
        base + 8,
        base + 9,
        base + 10,
    ]
    assert legacy_tokenizer.convert_tokens_to_ids(["[SEG]", "[tag]"]) == [base + 7, base + 8]
    text = "where is the red circle? [SEG] [tag]red circle[/tag]"
    plain = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer(text)["input_ids"]]
    assert plain == [legacy_tokenizer.convert_ids_to_tokens(i) for i in legacy_tokenizer(text)["input_ids"]]
    convert_ullava_checkpoint(release, tmp_path / "weights-only", num_video_frames=4, tokenizer=False)
    assert not (tmp_path / "weights-only" / "processor_config.json").exists()
    (release / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match=r"model_type='llava'.*'ullava'"):
        convert_ullava_checkpoint(release, tmp_path / "out2")
