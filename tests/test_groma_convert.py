"""Conversion of released Groma checkpoints (`hf-regionmm convert groma`, hf_regionmm/hub/convert_groma.py).

A synthetic "released" checkpoint is built from a tiny Groma with the released behaviour: its state dict is renamed
back to the ORIGINAL key names by an inverse mapping written here independently of the converter (transformers-4.32
`fc1`/`out_proj`/`attention.attention.query` names, the duplicated `decoder.bbox_embed` / `decoder.class_embed_*`
aliases, Llama `rotary_emb.inv_freq` buffers) and saved with `torch.save` next to a released-style `config.json`
(sub-configs as 4.32 diff dicts) and a tokenizer. Converting it must give a model whose outputs equal the source
model's bit for bit; bad checkpoints must fail with a clear error and leave the destination untouched.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_regionmm import cli
from hf_regionmm.data.tiny_tokenizer import build_word_tokenizer
from hf_regionmm.hub.convert_groma import (
    convert_groma_checkpoint,
    convert_released_state_dict,
    groma_config_from_released,
)
from hf_regionmm.modeling.configuration_groma import GromaConfig, groma_special_tokens
from hf_regionmm.modeling.modeling_groma import GromaForConditionalGeneration
from hf_regionmm.processing import processing_groma
from hf_regionmm.processing.processing_groma import GromaProcessor
from hf_regionmm.systems.groma import tiny_groma_words

MAX_REGIONS = 6
TEXT_VOCAB = 4 + len(tiny_groma_words())

# A released-style config.json at tiny sizes. Sub-configs are diffs against the transformers-4.32 defaults, as the
# original `to_json_string` wrote them: every value below differs from that default (DINOv2's patch_size 14 too, the
# 4.32 default being 16), everything else must come from the defaults.
RELEASED_TINY_CONFIG = {
    "architectures": ["GromaModel"],
    "model_type": "groma",
    "box_score_thres": 0.0,
    "nms_thres": 0.6,
    "max_region_num": MAX_REGIONS,
    "num_new_token": 14 + MAX_REGIONS,
    "llm_cfg": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": TEXT_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "pad_token_id": 3,
        "torch_dtype": "float32",
        "transformers_version": "4.32.0",
    },
    "perceiver_cfg": {
        "architectures": ["CustomDDETRModel"],
        "model_type": "ddetr",
        "vis_output_layer": -2,
        "zs_weight_path": None,
        "vis_encoder_cfg": {
            "architectures": ["Dinov2Model"],
            "model_type": "dinov2",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "mlp_ratio": 2,
            "image_size": 126,
            "patch_size": 14,
        },
        "ddetr_cfg": {
            "model_type": "deformable_detr",
            "id2label": {"0": "LABEL_0"},
            "label2id": {"LABEL_0": 0},
            "auxiliary_loss": True,
            "class_cost": 2,
            "cls_loss_coefficient": 2,
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 2,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_n_points": 2,
            "decoder_n_points": 2,
            "num_queries": 24,
            "two_stage_num_proposals": 24,
            "num_feature_levels": 1,
            "two_stage": True,
            "with_box_refine": True,
        },
    },
}


def _source_config() -> GromaConfig:
    """The same model as RELEASED_TINY_CONFIG, built directly (not through the converter)."""
    return GromaConfig.from_preset(
        "groma-tiny",
        behaviour="released",
        image_size=448,
        max_region_num=MAX_REGIONS,
        box_score_thres=0.0,
        region_encoder_embed_dim=64,
        region_encoder_output_size=14,
        region_encoder_fuse_rounds=5,
        region_encoder_num_groups=64,
        region_encoder_pos_hidden_size=256,
        vision_config={"hidden_size": 64, "num_hidden_layers": 4, "mlp_ratio": 2, "image_size": 126},
        text_config={
            "vocab_size": TEXT_VOCAB,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "pad_token_id": 3,
        },
        proposer_config={
            "input_dim": 64,
            "decoder_layers": 2,
            "num_queries": 24,
            "dropout": 0.1,
            "class_loss_coefficient": 2,
            "class_cost": 2,
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# Inverse mapping: this library's keys -> the original release's keys (written independently of the converter).

_INVERSE_RULES = [
    (r"^model\.vision_tower\.(.*)\.attention\.q_proj\.", r"perceiver.vis_encoder.\1.attention.attention.query."),
    (r"^model\.vision_tower\.(.*)\.attention\.k_proj\.", r"perceiver.vis_encoder.\1.attention.attention.key."),
    (r"^model\.vision_tower\.(.*)\.attention\.v_proj\.", r"perceiver.vis_encoder.\1.attention.attention.value."),
    (r"^model\.vision_tower\.(.*)\.attention\.o_proj\.", r"perceiver.vis_encoder.\1.attention.output.dense."),
    (r"^model\.vision_tower\.", "perceiver.vis_encoder."),
    (r"^model\.proposer\.input_proj\.", "perceiver.input_proj."),
    (r"^model\.proposer\.objectness_heads\.(coco|sa1b)\.", r"perceiver.ddetr_transformer.class_embed_\1."),
    (r"^model\.proposer\.(.*)\.mlp\.(fc[12])\.", r"perceiver.ddetr_transformer.\1.\2."),
    (r"^model\.proposer\.(.*)\.self_attn\.o_proj\.", r"perceiver.ddetr_transformer.\1.self_attn.out_proj."),
    (r"^model\.proposer\.", "perceiver.ddetr_transformer."),
    (r"^model\.language_model\.", "llm.model."),
    (r"^lm_head\.", "llm.lm_head."),
    (r"^model\.multi_modal_projector\.linear_1\.", "img_txt_bridge.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "img_txt_bridge.2."),
    (r"^model\.region_encoder\.feature_fusion\.input_convs\.", "region_encoder.mlvl_fuse.input_conv."),
    (r"^model\.region_encoder\.feature_fusion\.fuse_convs\.", "region_encoder.mlvl_fuse.fuse_convs."),
    (r"^model\.region_encoder\.level_convs\.", "region_encoder.roi_align.pconvs."),
    (r"^model\.region_encoder\.position_embedding\.layers\.", "region_encoder.roi_align.pos_embedd."),
    (r"^model\.region_encoder\.flatten_proj\.", "region_encoder.roi_align.flatten_linear."),
    (r"^model\.region_encoder\.output_proj\.", "region_encoder.roi_align.updims."),
    (r"^model\.new_token_embeddings\.", "new_input_embs."),
    (r"^extra_lm_head\.", "extra_lm_head."),
]


def _original_key(key: str) -> str:
    for pattern, replacement in _INVERSE_RULES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    raise AssertionError(f"no inverse rule for {key}")


def released_state_dict(model: GromaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's weights under the original names, with the release's duplicated aliases and rotary buffers."""
    original = {_original_key(key): tensor for key, tensor in model.state_dict().items()}
    head = re.compile(r"^perceiver\.ddetr_transformer\.(bbox_embed|class_embed_(enc|coco|sa1b))\.")
    for key in [key for key in original if head.match(key)]:
        # The original registers these modules twice; torch.save stores the shared storage once.
        original[key.replace("perceiver.ddetr_transformer.", "perceiver.ddetr_transformer.decoder.")] = original[key]
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(model.config.text_config.num_hidden_layers):
        original[f"llm.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    return original


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def source_model() -> GromaForConditionalGeneration:
    torch.manual_seed(0)
    model = GromaForConditionalGeneration(_source_config()).eval()
    with torch.no_grad():
        # Break the symmetries of the init (zero box deltas, equal objectness priors) so that a swapped or dropped
        # weight changes the outputs.
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def _write_tokenizer(folder: Path) -> None:
    # The release ships the Vicuna tokenizer with Groma's tokens already appended, in the released order.
    tokenizer = build_word_tokenizer(tiny_groma_words(), extra_special_tokens=groma_special_tokens(MAX_REGIONS))
    tokenizer.save_pretrained(folder)


def _write_release(folder: Path, state_dict: dict, config: dict = RELEASED_TINY_CONFIG, tokenizer: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state_dict, folder / "pytorch_model.bin")
    if tokenizer:
        _write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def released_weights(source_model) -> dict[str, torch.Tensor]:
    return released_state_dict(source_model)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, released_weights) -> Path:
    return _write_release(tmp_path_factory.mktemp("release") / "groma-7b-finetune", released_weights)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, release_dir) -> Path:
    destination = tmp_path_factory.mktemp("converted") / "groma-tiny-converted"
    assert cli.main(["convert", "groma", str(release_dir), str(destination)]) == 0
    return destination


def _inputs(processor: GromaProcessor) -> dict:
    rng = np.random.RandomState(0)
    images = [PIL.Image.fromarray(rng.randint(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(2)]
    return dict(
        processor(
            images=images,
            text=[processing_groma.grounded_caption_prompt(), processing_groma.region_caption_prompt()],
            boxes=[[], [[100.0, 80.0, 420.0, 300.0]]],
            padding_side="left",
            return_tensors="pt",
        )
    )


def _staging_leftovers(parent: Path) -> list[str]:
    return [entry.name for entry in parent.iterdir() if ".converting-" in entry.name]


# ----------------------------------------------------------------------------------------------------------------
# The real conversion path


def test_release_has_the_original_layout(released_weights):
    # Sanity of the synthetic release itself: original names, aliases and buffers are there.
    assert "perceiver.vis_encoder.encoder.layer.0.attention.attention.query.weight" in released_weights
    assert "perceiver.ddetr_transformer.encoder.layers.0.fc1.weight" in released_weights
    assert "perceiver.ddetr_transformer.decoder.layers.1.self_attn.out_proj.weight" in released_weights
    assert "perceiver.ddetr_transformer.decoder.bbox_embed.2.layers.2.bias" in released_weights
    assert "perceiver.ddetr_transformer.decoder.class_embed_sa1b.1.weight" in released_weights
    assert "region_encoder.roi_align.pos_embedd.5.weight" in released_weights
    assert "llm.model.layers.1.self_attn.rotary_emb.inv_freq" in released_weights
    # 2 decoder layers: 3 box heads x 3 linears x 2 + class_embed_enc 2 + 2 x 2 objectness heads x 2 = 28 aliases.
    assert (
        sum(".ddetr_transformer.decoder.bbox_embed." in k or ".decoder.class_embed_" in k for k in released_weights)
        == 28
    )


def test_config_json_maps_to_the_source_config(converted_dir, source_model):
    converted = GromaConfig.from_pretrained(converted_dir)
    source = source_model.config
    for name in ("vision_config", "text_config", "proposer_config"):
        ours, theirs = getattr(converted, name).to_dict(), getattr(source, name).to_dict()
        differing = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
        assert differing <= {"transformers_version", "dtype", "architectures", "_name_or_path"}, (name, differing)
    for field in (
        "image_size",
        "max_region_num",
        "num_new_tokens",
        "nms_thres",
        "box_score_thres",
        "ground_box_score",
        "shuffle_regions",
        "region_encoder_embed_dim",
        "region_encoder_num_levels",
        "region_encoder_output_size",
        "region_encoder_sampling_ratio",
        "region_encoder_fuse_rounds",
        "region_encoder_num_groups",
        "region_encoder_pos_hidden_size",
        "region_box_format",
        "region_feature_strides",
        "image_token_merge_order",
        "vision_pos_embed_interpolation",
        "proposer_feature_source",
    ):
        assert getattr(converted, field) == getattr(source, field), field
    # Released quirks, spelled out.
    assert converted.region_box_format == "cxcywh_as_xyxy"
    assert converted.region_feature_strides == (1.75, 3.5, 7.0)
    assert converted.proposer_config.update_reference_points is False
    assert converted.proposer_config.objectness_weights == (0.4, 0.6)


def test_converted_outputs_equal_the_source_bit_for_bit(converted_dir, source_model):
    files = sorted(path.name for path in converted_dir.iterdir())
    assert "model.safetensors" in files and "config.json" in files and "README.md" in files
    assert "processor_config.json" in files or "preprocessor_config.json" in files
    assert not any(name.endswith(".bin") for name in files)

    model = AutoModelForImageTextToText.from_pretrained(converted_dir).eval()
    assert isinstance(model, GromaForConditionalGeneration)
    source_state = source_model.state_dict()
    converted_state = model.state_dict()
    assert converted_state.keys() == source_state.keys()
    assert all(torch.equal(converted_state[key], source_state[key]) for key in source_state)

    processor = AutoProcessor.from_pretrained(converted_dir)
    inputs = _inputs(processor)
    with torch.no_grad():
        expected = source_model(**inputs)
        actual = model(**inputs)
    # Several regions are selected, so the region encoder and the slot filling are exercised.
    assert int(expected.region_mask.sum()) > 2
    for name in ("logits", "region_boxes", "region_mask", "region_scores", "image_hidden_states", "attention_mask"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name
    with torch.no_grad():
        expected_ids = source_model.generate(**inputs, max_new_tokens=3, do_sample=False)
        actual_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(actual_ids, expected_ids)


def test_processor_carries_groma_tokens_at_the_model_ids(converted_dir):
    processor = AutoProcessor.from_pretrained(converted_dir)
    config = GromaConfig.from_pretrained(converted_dir)
    assert isinstance(processor, GromaProcessor)
    assert processor.num_image_tokens == config.num_image_tokens == 256
    assert processor.image_token_id == config.image_token_id
    assert processor.region_index_token_ids == config.region_index_token_ids
    assert processor.image_processor.size.height == 448


def test_sharded_safetensors_release_converts_to_the_same_weights(tmp_path, released_weights, source_model):
    # safetensors cannot store shared tensors: keep only the aliases of the box heads (a deduplicating save may keep
    # either name), so the converter must take the weights from the alias.
    weights = {key: tensor.clone().contiguous() for key, tensor in released_weights.items()}
    for key in [key for key in weights if key.startswith("perceiver.ddetr_transformer.bbox_embed.")]:
        del weights[key]
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    source = tmp_path / "release"
    source.mkdir()
    for name, shard_keys in shards.items():
        save_file({key: weights[key] for key in shard_keys}, source / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (source / "config.json").write_text(json.dumps(RELEASED_TINY_CONFIG))

    destination = convert_groma_checkpoint(source, tmp_path / "converted", dtype="float32")
    model = GromaForConditionalGeneration.from_pretrained(destination)
    source_state = source_model.state_dict()
    assert all(torch.equal(tensor, source_state[key]) for key, tensor in model.state_dict().items())
    # No tokenizer in the source: no processor in the output.
    assert not (destination / "tokenizer.json").exists()


def test_dtype_argument_casts_every_weight(released_weights, tmp_path):
    source = _write_release(tmp_path / "release", released_weights, tokenizer=False)
    destination = convert_groma_checkpoint(source, tmp_path / "converted", dtype=torch.bfloat16)
    model = GromaForConditionalGeneration.from_pretrained(destination, dtype="auto")
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="`dtype`"):
        convert_groma_checkpoint(source, tmp_path / "other", dtype="int8")


# ----------------------------------------------------------------------------------------------------------------
# Failures: clear errors, nothing written


def test_unknown_key_is_named_and_nothing_is_written(tmp_path, released_weights):
    weights = dict(released_weights)
    weights["perceiver.ddetr_transformer.zs_classifier.linear.weight"] = torch.zeros(4, 4)
    weights["region_encoder.roi_align.extra_norm.weight"] = torch.zeros(4)
    source = _write_release(tmp_path / "release", weights, tokenizer=False)
    destination = tmp_path / "out" / "converted"
    with pytest.raises(ValueError, match=r"2 weights that are not part of the released Groma layout") as error:
        convert_groma_checkpoint(source, destination)
    assert "perceiver.ddetr_transformer.zs_classifier.linear.weight" in str(error.value)
    assert "region_encoder.roi_align.extra_norm.weight" in str(error.value)
    assert not destination.exists()
    assert not (tmp_path / "out").exists() or _staging_leftovers(tmp_path / "out") == []


def test_missing_key_and_wrong_shape_are_named(released_weights, source_model):
    weights = dict(released_weights)
    del weights["region_encoder.roi_align.updims.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 weights.*model\.region_encoder\.output_proj\.weight"):
        convert_released_state_dict(weights, source_model.config)

    weights = dict(released_weights)
    weights["new_input_embs.weight"] = torch.zeros(114, 64)
    with pytest.raises(ValueError, match=r"new_input_embs\.weight \(114, 64\) -> model\.new_token_embeddings"):
        convert_released_state_dict(weights, source_model.config)


def test_aliases_that_disagree_are_refused(released_weights, source_model):
    weights = dict(released_weights)
    weights["perceiver.ddetr_transformer.decoder.class_embed_coco.1.bias"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"decoder\.class_embed_coco\.1\.bias.*different values"):
        convert_released_state_dict(weights, source_model.config)


class _MaliciousGlobal:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        # Unpickling this would create a folder: proof of arbitrary code execution.
        return (os.mkdir, (str(self.marker),))


def test_pickle_with_a_malicious_global_is_refused(tmp_path, released_weights):
    source = _write_release(tmp_path / "release", released_weights, tokenizer=False)
    marker = tmp_path / "pwned"
    torch.save({"llm.lm_head.weight": _MaliciousGlobal(marker)}, source / "pytorch_model.bin")
    destination = tmp_path / "converted"
    with pytest.raises(ValueError, match=r"Refusing to load pytorch_model\.bin.*weights_only"):
        convert_groma_checkpoint(source, destination)
    assert not marker.exists()
    assert not destination.exists()
    assert _staging_leftovers(tmp_path) == []


def test_existing_destination_is_never_overwritten(tmp_path, release_dir):
    destination = tmp_path / "converted"
    destination.mkdir()
    (destination / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match=r"`destination`.*already exists"):
        convert_groma_checkpoint(release_dir, destination)
    assert sorted(path.name for path in destination.iterdir()) == ["keep.txt"]


def test_failure_while_writing_leaves_no_partial_output(tmp_path, release_dir, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(GromaProcessor, "save_pretrained", fail)
    destination = tmp_path / "converted"
    with pytest.raises(OSError, match="disk full"):
        convert_groma_checkpoint(release_dir, destination)
    assert not destination.exists()
    assert _staging_leftovers(tmp_path) == []


def test_unloadable_tokenizer_stops_the_conversion(tmp_path, released_weights):
    source = _write_release(tmp_path / "release", released_weights, tokenizer=False)
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    destination = tmp_path / "converted"
    with pytest.raises(ValueError, match=r"tokenizer files but transformers could not load them"):
        convert_groma_checkpoint(source, destination)
    assert not destination.exists()
    assert _staging_leftovers(tmp_path) == []


def test_cli_reports_conversion_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["convert", "groma", str(empty), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The released groma-7b config.json (transcribed from FoundationVision/groma-7b-finetune)


def _released_7b_config(vis_output_layer: int) -> dict:
    return {
        "architectures": ["GromaModel"],
        "box_score_thres": 0.15,
        "nms_thres": 0.6,
        "max_region_num": 100,
        "model_type": "groma",
        "num_new_token": 114,
        "llm_cfg": {
            "_name_or_path": "vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 11008,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 32,
            "pad_token_id": 0,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
            "transformers_version": "4.32.0",
            "use_cache": True,
            "vocab_size": 32000,
        },
        "perceiver_cfg": {
            "architectures": ["CustomDDETRModel"],
            "ddetr_cfg": {
                "auxiliary_loss": True,
                "class_cost": 2,
                "cls_loss_coefficient": 2,
                "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0},
                "model_type": "deformable_detr",
                "num_feature_levels": 1,
                "two_stage": True,
                "with_box_refine": True,
            },
            "model_type": "ddetr",
            "torch_dtype": "float32",
            "transformers_version": "4.32.0",
            "vis_encoder_cfg": {
                "architectures": ["Dinov2Model"],
                "hidden_size": 1024,
                "image_size": 518,
                "model_type": "dinov2",
                "num_attention_heads": 16,
                "num_hidden_layers": 24,
                "patch_size": 14,
                "torch_dtype": "float32",
            },
            "vis_output_layer": vis_output_layer,
            "zs_weight_path": None,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.32.0",
    }


def test_released_7b_config_is_the_groma_7b_preset():
    converted = groma_config_from_released(_released_7b_config(vis_output_layer=-2))
    preset = GromaConfig.for_released_checkpoint()
    # Sizes the diff dicts leave to the 4.32 defaults (proposer: 6+6 layers, 300 queries; DINOv2: MLP ratio 4).
    assert converted.proposer_config.d_model == 256 and converted.proposer_config.decoder_layers == 6
    assert converted.proposer_config.num_queries == 300 and converted.proposer_config.num_feature_levels == 1
    assert converted.vision_config.mlp_ratio == 4 and converted.vision_config.layerscale_value == 1.0
    for name in ("vision_config", "text_config", "proposer_config"):
        for key, value in getattr(preset, name).to_dict().items():
            if key in ("transformers_version", "dtype", "architectures", "_name_or_path", "class_loss_coefficient"):
                continue
            assert getattr(converted, name).to_dict().get(key) == value, (name, key)
    preset_fields = preset.to_dict()
    converted_fields = converted.to_dict()
    for key, value in preset_fields.items():
        if key.endswith("_config") or key in ("transformers_version", "dtype", "architectures"):
            continue
        assert converted_fields.get(key) == value, key


def test_patch_size_missing_from_the_diff_is_the_4_32_default():
    released = _released_7b_config(vis_output_layer=-2)
    del released["perceiver_cfg"]["vis_encoder_cfg"]["patch_size"]
    # transformers 5 defaults to 14; the 4.32 default (16) gives 448 / 16 = 28 patches and strides (16/8, 16/4, 16/2).
    config = groma_config_from_released(released)
    assert config.vision_config.patch_size == 16
    assert config.region_feature_strides == (2.0, 4.0, 8.0)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c.update(model_type="ddetr"), r"model_type='ddetr'.*groma-det-pretrain"),
        (lambda c: c.update(num_new_token=100), r"num_new_token=100.*114"),
        (lambda c: c["perceiver_cfg"].update(zs_weight_path="zs.pt"), r"zs_weight_path"),
        (lambda c: c["perceiver_cfg"]["ddetr_cfg"].update(num_queries=100), r"two_stage_num_proposals=300"),
        (lambda c: c.pop("llm_cfg"), r"lacks the `llm_cfg`"),
    ],
)
def test_unsupported_released_configs_are_refused(change, match):
    released = _released_7b_config(vis_output_layer=-2)
    change(released)
    with pytest.raises(ValueError, match=match):
        groma_config_from_released(released)


def test_image_tokens_from_another_dinov2_layer_are_not_silently_dropped():
    # The groma-7b-* releases set `vis_output_layer: -2` (image tokens from the second-to-last DINOv2 layer).
    assert groma_config_from_released(_released_7b_config(vis_output_layer=-2)).vision_feature_layer == -2
    released_default = _released_7b_config(vis_output_layer=-1)
    released_default["perceiver_cfg"].pop("vis_output_layer", None)
    assert groma_config_from_released(released_default).vision_feature_layer == -1
