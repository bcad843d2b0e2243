"""Convert a released Groma checkpoint (`FoundationVision/groma-7b-*`) into this library's layout.

The original release (Ma et al. 2024, code `FoundationVision/Groma`, transformers 4.32) is a folder with

* `config.json`: a `GromaConfig` of the original code, `{"llm_cfg": <LlamaConfig diff>, "perceiver_cfg":
  {"vis_encoder_cfg": <Dinov2Config diff>, "ddetr_cfg": <DeformableDetrConfig diff>, "vis_output_layer",
  "zs_weight_path"}, "num_new_token", "nms_thres", "box_score_thres", "max_region_num"}`. Sub-configs were saved as
  *diffs* against the transformers-4.32 class defaults, so missing fields take those defaults (kept below; several
  differ from today's, e.g. DINOv2's `patch_size` was 16);
* weights as `pytorch_model*.bin` (+ `pytorch_model.bin.index.json`) or `*.safetensors`;
* optionally the Vicuna tokenizer with Groma's 114 new tokens already appended.

`convert_groma_checkpoint` maps that folder to a `GromaForConditionalGeneration` with the *released* behaviour (see
`configuration_groma.RELEASED_BEHAVIOUR`: mean-of-last-4 single-level proposer, cxcywh-as-xyxy RoIAlign boxes, half
strides, transformers-4.32 position-table interpolation), so converted weights reproduce the original outputs.
Key renames (original -> here; `model.` is this library's base-model prefix):

* `perceiver.vis_encoder.*` -> `model.vision_tower.*`, with transformers 5's DINOv2 names
  (`attention.attention.{query,key,value}` -> `attention.{q,k,v}_proj`,
  `attention.output.dense` -> `attention.o_proj`);
* `perceiver.input_proj.*` -> `model.proposer.input_proj.*`;
* `perceiver.ddetr_transformer.*` -> `model.proposer.*`, with transformers 5's Deformable-DETR names
  (`layers.N.fc1/fc2` -> `layers.N.mlp.fc1/fc2`, decoder `self_attn.out_proj` -> `self_attn.o_proj`) and
  `class_embed_{coco,sa1b}.i` -> `objectness_heads.{coco,sa1b}.i`;
* `perceiver.ddetr_transformer.decoder.{bbox_embed,class_embed_*}.*`: dropped, they alias the heads above (the
  original registers those modules twice, so `.bin` files hold both names); the two copies must be equal;
* `llm.model.*` -> `model.language_model.*`, `llm.lm_head.weight` -> `lm_head.weight` (persisted
  `rotary_emb.inv_freq` buffers are dropped and recomputed);
* `img_txt_bridge.{0,2}` -> `model.multi_modal_projector.linear_{1,2}`;
* `region_encoder.mlvl_fuse.{input_conv,fuse_convs}` ->
  `model.region_encoder.feature_fusion.{input_convs,fuse_convs}`;
* `region_encoder.roi_align.{pconvs,pos_embedd,flatten_linear,updims}` ->
  `model.region_encoder.{level_convs,position_embedding.layers,flatten_proj,output_proj}`;
* `extra_lm_head` -> `extra_lm_head`, `new_input_embs` -> `model.new_token_embeddings`.

DINOv2 keys are mapped to the names `Dinov2Model` holds in memory in transformers 5 (its loader renames legacy names
on the fly, and `save_pretrained` may write them back in the legacy form; both reload the same).

Safety: `.bin` files are read with `torch.load(weights_only=True)` only, so a pickle that names anything but tensors
is refused. Every original key must map and every model weight must be present with the right shape, or the
conversion stops with the list of offending keys before anything is written. The output is written into a temporary
sibling folder that is renamed into place only once complete.

Deviation: region slots are filled in descending-score order (`shuffle_regions=False`) instead of the released random
permutation, so `<rK>` indices are reproducible; the set of regions and their features are the released ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from hf_regionmm.hub.conversion import (
    check_destination,
    expected_shapes,
    format_keys,
    instantiate_converted,
    load_weight_file,
    resolve_dtype,
    write_converted_checkpoint,
)
from hf_regionmm.modeling.configuration_groma import GROMA_BASE_NEW_TOKENS, RELEASED_BEHAVIOUR, GromaConfig
from hf_regionmm.modeling.modeling_groma import GromaForConditionalGeneration
from hf_regionmm.processing.image_processing_groma import GromaImageProcessor
from hf_regionmm.processing.processing_groma import GromaProcessor, add_groma_special_tokens

__all__ = [
    "convert_groma_checkpoint",
    "convert_released_state_dict",
    "groma_config_from_released",
    "load_released_state_dict",
]

# ----------------------------------------------------------------------------------------------------------------
# Released config.json -> GromaConfig

# Sub-configs of the release are `to_diff_dict()` output of transformers 4.32: a missing field had that version's
# class default, which is not always today's default.
_DINOV2_V4_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-6,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "drop_path_rate": 0.0,
    "use_swiglu_ffn": False,
}
_DEFORMABLE_DETR_V4_DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "encoder_n_points": 4,
    "decoder_n_points": 4,
    "num_queries": 300,
    "two_stage": False,
    "two_stage_num_proposals": 300,
    "with_box_refine": False,
    "num_feature_levels": 4,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "init_std": 0.02,
    "focal_alpha": 0.25,
    "auxiliary_loss": False,
    "class_cost": 1,
    "bbox_cost": 5,
    "giou_cost": 2,
    # Not a 4.32 field: Groma's training script adds it; 4.32's own loss weighted the class term by 1.
    "cls_loss_coefficient": 1,
    "bbox_loss_coefficient": 5,
    "giou_loss_coefficient": 2,
}
_LLAMA_V4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
}
# Bookkeeping fields of a saved config that describe no weight and no computation.
_META_FIELDS = frozenset(
    {
        "architectures",
        "_name_or_path",
        "_commit_hash",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "model_type",
        "id2label",
        "label2id",
        "use_cache",
        "pretraining_tp",  # 4.32's tensor-parallel split of the same matmuls; numerically the same model
    }
)
_DDETR_TO_PROPOSER = {
    "d_model": "d_model",
    "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers",
    "encoder_attention_heads": "encoder_attention_heads",
    "decoder_attention_heads": "decoder_attention_heads",
    "encoder_ffn_dim": "encoder_ffn_dim",
    "decoder_ffn_dim": "decoder_ffn_dim",
    "encoder_n_points": "encoder_n_points",
    "decoder_n_points": "decoder_n_points",
    "num_queries": "num_queries",
    "two_stage": "two_stage",
    "with_box_refine": "with_box_refine",
    "num_feature_levels": "num_feature_levels",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "activation_function": "activation_function",
    "init_std": "init_std",
    "focal_alpha": "focal_alpha",
    "auxiliary_loss": "auxiliary_loss",
    "class_cost": "class_cost",
    "bbox_cost": "bbox_cost",
    "giou_cost": "giou_cost",
    "cls_loss_coefficient": "class_loss_coefficient",
    "bbox_loss_coefficient": "bbox_loss_coefficient",
    "giou_loss_coefficient": "giou_loss_coefficient",
}
# The released region encoder (`groma/model/roi_align.py`) hard-codes these; its width is the vision hidden size and
# its RoIAlign assumes a 448-pixel input.
_RELEASED_IMAGE_SIZE = 448
_RELEASED_REGION_ENCODER = {
    "region_encoder_num_levels": 3,
    "region_encoder_output_size": 14,
    "region_encoder_sampling_ratio": 2,
    "region_encoder_fuse_rounds": 5,
    "region_encoder_num_groups": 64,
    "region_encoder_pos_hidden_size": 256,
}
_RELEASED_OBJECTNESS_HEADS = ("coco", "sa1b")
_RELEASED_OBJECTNESS_WEIGHTS = (0.4, 0.6)
_RELEASED_GROUND_BOX_SCORE = 0.2
_RELEASED_MODEL_TYPES = ("groma", "gvllm")  # "gvllm" is the name of the first upload of groma-7b-finetune


def _sub_config(released: Mapping[str, Any], name: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    value = released.get(name, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"`config.json` field `{name}` must be a JSON object; got {type(value).__name__}.")
    merged = {**defaults, **value}
    return {key: item for key, item in merged.items() if key not in _META_FIELDS}


def groma_config_from_released(released: Mapping[str, Any]) -> GromaConfig:
    """Build the `GromaConfig` (released behaviour) of an original `config.json`.

    Args:
        released: the parsed `config.json` of `FoundationVision/groma-7b-*` (`model_type` "groma"), with `llm_cfg`,
            `perceiver_cfg` (`vis_encoder_cfg`, `ddetr_cfg`, `vis_output_layer`, `zs_weight_path`), `num_new_token`,
            `nms_thres`, `box_score_thres` and `max_region_num`.

    Returns:
        A `GromaConfig` whose sub-configs carry the released sizes (missing fields = transformers-4.32 defaults), the
        released quirks of `RELEASED_BEHAVIOUR`, the region encoder's hard-coded sizes and a 448-pixel input.
    """
    if not isinstance(released, Mapping):
        raise TypeError(f"`released` must be the parsed config.json (a dict); got {type(released).__name__}.")
    model_type = released.get("model_type")
    if model_type not in _RELEASED_MODEL_TYPES:
        hint = " (groma-det-pretrain holds the proposer only and is not a chat model)" if model_type == "ddetr" else ""
        raise ValueError(
            f"`config.json` has model_type={model_type!r}; expected one of {_RELEASED_MODEL_TYPES}, the "
            f"FoundationVision/groma-7b-* release{hint}."
        )
    for name in ("llm_cfg", "perceiver_cfg"):
        if not isinstance(released.get(name), Mapping):
            raise ValueError(f"`config.json` lacks the `{name}` object of a released Groma config.")
    perceiver = released["perceiver_cfg"]
    if perceiver.get("zs_weight_path") is not None:
        raise ValueError(
            f"`perceiver_cfg.zs_weight_path` is {perceiver['zs_weight_path']!r}: the zero-shot classifier head was "
            "never part of the released checkpoints and is not supported; it must be null."
        )

    vision = _sub_config(perceiver, "vis_encoder_cfg", _DINOV2_V4_DEFAULTS)
    if perceiver.get("vis_encoder_cfg", {}).get("model_type", "dinov2") != "dinov2":
        raise ValueError("`perceiver_cfg.vis_encoder_cfg.model_type` must be 'dinov2' (Groma's image encoder).")
    if vision["use_swiglu_ffn"]:
        raise ValueError(
            "`perceiver_cfg.vis_encoder_cfg.use_swiglu_ffn` is true (DINOv2-g); the released Groma uses DINOv2-L with "
            "an MLP and this converter maps only that layout."
        )
    text = _sub_config(released, "llm_cfg", _LLAMA_V4_DEFAULTS)
    if released["llm_cfg"].get("model_type", "llama") != "llama":
        raise ValueError("`llm_cfg.model_type` must be 'llama' (Vicuna); other language models were never released.")
    if text["num_key_value_heads"] is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    if text["rope_scaling"] is None:
        text.pop("rope_scaling")

    ddetr = _sub_config(perceiver, "ddetr_cfg", _DEFORMABLE_DETR_V4_DEFAULTS)
    num_labels = len(perceiver.get("ddetr_cfg", {}).get("id2label", {"0": "object"}))
    if num_labels != 1:
        raise ValueError(
            f"`perceiver_cfg.ddetr_cfg` has {num_labels} labels; Groma's proposer is class-agnostic (1 label)."
        )
    if ddetr["two_stage"] and ddetr["two_stage_num_proposals"] != ddetr["num_queries"]:
        raise ValueError(
            f"`perceiver_cfg.ddetr_cfg` has two_stage_num_proposals={ddetr['two_stage_num_proposals']} but "
            f"num_queries={ddetr['num_queries']}; the proposer keeps one decoder query per two-stage proposal, so "
            "they must be equal (both 300 in the release)."
        )
    proposer = {ours: ddetr[theirs] for theirs, ours in _DDETR_TO_PROPOSER.items()}
    proposer.update(
        input_dim=vision["hidden_size"],
        update_reference_points=False,
        content_queries="query_embeddings",
        objectness_heads=_RELEASED_OBJECTNESS_HEADS,
        objectness_weights=_RELEASED_OBJECTNESS_WEIGHTS,
    )

    max_region_num = released.get("max_region_num", 100)
    expected_new_tokens = len(GROMA_BASE_NEW_TOKENS) + max_region_num
    if released.get("num_new_token") != expected_new_tokens:
        raise ValueError(
            f"`config.json` has num_new_token={released.get('num_new_token')!r} but max_region_num={max_region_num} "
            f"implies {len(GROMA_BASE_NEW_TOKENS)} + {max_region_num} = {expected_new_tokens} new tokens (114 in the "
            "release); the checkpoint's `extra_lm_head` and `new_input_embs` rows must match Groma's token list."
        )

    behaviour = dict(RELEASED_BEHAVIOUR)
    proposer["num_feature_levels"] = ddetr["num_feature_levels"]
    behaviour.pop("proposer_num_feature_levels")
    patch_size = vision["patch_size"]
    behaviour["region_feature_strides"] = (patch_size / 8, patch_size / 4, patch_size / 2)

    # The released configs read image tokens from DINOv2 hidden state `vis_output_layer` (-2 in groma-7b-*; the
    # class default -1 when absent).
    behaviour["vision_feature_layer"] = perceiver.get("vis_output_layer", -1)

    return GromaConfig(
        vision_config={"model_type": "dinov2", **vision},
        text_config={"model_type": "llama", **text},
        proposer_config=proposer,
        image_size=_RELEASED_IMAGE_SIZE,
        max_region_num=max_region_num,
        nms_thres=released.get("nms_thres", 0.6),
        box_score_thres=released.get("box_score_thres", 0.15),
        ground_box_score=_RELEASED_GROUND_BOX_SCORE,
        shuffle_regions=False,
        region_encoder_embed_dim=vision["hidden_size"],
        image_token_merge_order="column_major",
        **_RELEASED_REGION_ENCODER,
        **behaviour,
    )


# ----------------------------------------------------------------------------------------------------------------
# Reading the released weights

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def _weight_files(source: Path) -> list[Path]:
    for index_name in _INDEX_FILES:
        index_path = source / index_name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"`source` index {index_path} is not a valid weight index: {error}.") from None
            files = [source / name for name in dict.fromkeys(weight_map.values())]
            missing = [path.name for path in files if not path.is_file()]
            if missing:
                raise ValueError(f"`source` index {index_name} names shard files that are missing: {missing}.")
            return files
    for name in _SINGLE_FILES:
        if (source / name).is_file():
            return [source / name]
    raise ValueError(
        f"`source` {source} holds no weights: expected one of {list(_SINGLE_FILES)} or a sharded checkpoint with "
        f"{list(_INDEX_FILES)}."
    )


def load_released_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Read every weight of a released checkpoint folder, under its original key names.

    Reads `model.safetensors(.index.json)` or `pytorch_model.bin(.index.json)`; `.bin` files only through
    `torch.load(weights_only=True)`. Raises `ValueError` for a missing file, a pickle with anything but tensors, or a
    key stored in two shards.
    """
    source = Path(source)
    state_dict: dict[str, torch.Tensor] = {}
    for path in _weight_files(source):
        shard = load_weight_file(path)
        repeated = sorted(set(shard) & set(state_dict))
        if repeated:
            raise ValueError(f"`source` stores {repeated[:5]} in more than one shard ({path.name} repeats them).")
        state_dict.update(shard)
    return state_dict


# ----------------------------------------------------------------------------------------------------------------
# Key mapping

_PREFIXES: tuple[tuple[str, str], ...] = (
    ("perceiver.vis_encoder.", "model.vision_tower."),
    ("perceiver.input_proj.", "model.proposer.input_proj."),
    ("perceiver.ddetr_transformer.", "model.proposer."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
    ("img_txt_bridge.0.", "model.multi_modal_projector.linear_1."),
    ("img_txt_bridge.2.", "model.multi_modal_projector.linear_2."),
    ("region_encoder.mlvl_fuse.input_conv.", "model.region_encoder.feature_fusion.input_convs."),
    ("region_encoder.mlvl_fuse.fuse_convs.", "model.region_encoder.feature_fusion.fuse_convs."),
    ("region_encoder.roi_align.pconvs.", "model.region_encoder.level_convs."),
    ("region_encoder.roi_align.pos_embedd.", "model.region_encoder.position_embedding.layers."),
    ("region_encoder.roi_align.flatten_linear.", "model.region_encoder.flatten_proj."),
    ("region_encoder.roi_align.updims.", "model.region_encoder.output_proj."),
    ("extra_lm_head.", "extra_lm_head."),
    ("new_input_embs.", "model.new_token_embeddings."),
)
# Inside a prefix: transformers-4.32 module names that transformers 5 renamed (matched on whole dotted segments).
_VISION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)
_PROPOSER_RENAMES = ((".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2."), (".self_attn.out_proj.", ".self_attn.o_proj."))
_DETR = "perceiver.ddetr_transformer."
# `decoder.bbox_embed` / `decoder.class_embed_*` are the same modules as the top-level heads, registered twice by the
# original two-stage "hack"; `.bin` files store them under both names.
_ALIAS_PREFIXES = tuple(
    f"{_DETR}decoder.{head}." for head in ("bbox_embed", "class_embed_enc", "class_embed_coco", "class_embed_sa1b")
)


def _is_dropped_buffer(key: str) -> bool:
    # transformers 4.3x could persist Llama's rotary `inv_freq`; it is recomputed from the config.
    return key.startswith("llm.model.layers.") and key.endswith(".self_attn.rotary_emb.inv_freq")


def _rename(key: str, objectness_heads: tuple[str, ...]) -> str | None:
    """The in-memory name of an original key, or None if the key is not part of the released layout."""
    for original, ours in _PREFIXES:
        if not key.startswith(original):
            continue
        renamed = ours + key[len(original) :]
        if original == "perceiver.vis_encoder.":
            if ".encoder.layer." in renamed:
                for old, new in _VISION_RENAMES:
                    renamed = renamed.replace(old, new)
        elif original == _DETR:
            for old, new in _PROPOSER_RENAMES:
                renamed = renamed.replace(old, new)
            for head in objectness_heads:
                head_prefix = f"model.proposer.class_embed_{head}."
                if renamed.startswith(head_prefix):
                    renamed = f"model.proposer.objectness_heads.{head}." + renamed[len(head_prefix) :]
        return renamed
    return None


def convert_released_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: GromaConfig
) -> dict[str, torch.Tensor]:
    """Rename an original Groma state dict to `GromaForConditionalGeneration`'s keys, checking it is complete.

    Args:
        state_dict: original key -> tensor (as `load_released_state_dict` returns it). Not modified; the returned
            dict shares its tensors.
        config: the target model's config (decides the expected keys and shapes).

    Returns:
        Model key -> tensor, exactly the model's `state_dict()` keys with matching shapes.

    Raises:
        ValueError: listing original keys that do not belong to the released layout, model weights the checkpoint
            lacks, shape mismatches, or duplicated heads whose two copies differ.
    """
    objectness_heads = tuple(config.proposer_config.objectness_heads)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    aliases: dict[str, str] = {}
    for key in state_dict:
        if _is_dropped_buffer(key):
            continue
        alias_prefix = next((prefix for prefix in _ALIAS_PREFIXES if key.startswith(prefix)), None)
        if alias_prefix is not None:
            aliases[key] = _DETR + key[len(_DETR + "decoder.") :]
            continue
        renamed = _rename(key, objectness_heads)
        if renamed is None:
            unknown.append(key)
            continue
        if renamed in converted:
            raise ValueError(f"`source` keys {sources[renamed]!r} and {key!r} both map to {renamed!r}.")
        converted[renamed] = state_dict[key]
        sources[renamed] = key

    for alias, primary in aliases.items():
        if primary not in state_dict:
            # A deduplicating save may have kept only the alias; it then carries the weights.
            renamed = _rename(primary, objectness_heads)
            converted[renamed] = state_dict[alias]
            sources[renamed] = alias
        elif not torch.equal(state_dict[alias], state_dict[primary]):
            raise ValueError(
                f"`source` stores {alias!r} and {primary!r}, which the original model shares, with different values; "
                "the checkpoint is inconsistent and cannot be converted faithfully."
            )

    expected = expected_shapes(GromaForConditionalGeneration, config)
    unknown += [sources[key] for key in converted if key not in expected]
    if unknown:
        raise ValueError(
            f"`source` has {len(unknown)} weights that are not part of the released Groma layout (no mapping for "
            f"them): {format_keys(sorted(unknown))}. Nothing was written; a checkpoint with extra modules (or a "
            "config.json that does not describe it) cannot be converted."
        )
    missing = sorted(key for key in expected if key not in converted)
    if missing:
        raise ValueError(
            f"`source` lacks {len(missing)} weights the converted model needs: {format_keys(missing)}. Nothing was "
            "written; check that every shard is present and that config.json describes this checkpoint."
        )
    mismatched = [
        f"{sources[key]} {tuple(converted[key].shape)} -> {key} {tuple(shape)}"
        for key, shape in expected.items()
        if converted[key].shape != shape
    ]
    if mismatched:
        raise ValueError(
            f"`source` has {len(mismatched)} weights whose shapes do not match the config: "
            f"{format_keys(mismatched)}. Nothing was written; config.json (or the `config` argument) does not "
            "describe this checkpoint."
        )
    return {key: converted[key] for key in expected}


# ----------------------------------------------------------------------------------------------------------------
# Conversion


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _build_processor(source: Path, config: GromaConfig) -> GromaProcessor | None:
    if not any((source / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as error:  # noqa: BLE001  (any loader failure becomes one clear conversion error)
        raise ValueError(
            f"`source` has tokenizer files but transformers could not load them ({type(error).__name__}: {error}). "
            "A sentencepiece `tokenizer.model` needs `pip install sentencepiece`; nothing was written."
        ) from None
    tokenizer = add_groma_special_tokens(tokenizer, max_region_num=config.max_region_num)
    first_new_id = tokenizer.convert_tokens_to_ids(GROMA_BASE_NEW_TOKENS[0])
    if first_new_id != config.text_config.vocab_size:
        raise ValueError(
            f"`source` tokenizer puts Groma's first new token {GROMA_BASE_NEW_TOKENS[0]!r} at id {first_new_id}, but "
            f"the model expects it right after the LLM vocabulary, at id {config.text_config.vocab_size}; the "
            "tokenizer does not belong to this checkpoint."
        )
    image_processor = GromaImageProcessor(size={"height": config.image_size, "width": config.image_size})
    return GromaProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=config.num_image_tokens,
        max_region_num=config.max_region_num,
    )


def convert_groma_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    config: GromaConfig | None = None,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert a released `FoundationVision/groma-7b-*` folder into a `GromaForConditionalGeneration` checkpoint.

    Args:
        source: folder with the original `config.json`, weights (`pytorch_model*.bin` or `*.safetensors`, sharded or
            not) and optionally tokenizer files.
        destination: folder to create (must not exist, or be empty). It receives `config.json`, safetensors weights,
            `generation_config.json`, a model card and, when `source` has a tokenizer, the `GromaProcessor` files
            (tokenizer with Groma's new tokens + image processor).
        config: use this config instead of the one derived from `source/config.json` (e.g. the paper behaviour, or
            other thresholds); its sizes must match the weights.
        dtype: dtype of the converted weights; default the checkpoint's own if all its floating tensors share one,
            else float32.

    Returns:
        `destination` as a `Path`.

    Raises:
        ValueError: anything that would make the result incomplete or unfaithful (unknown or missing keys, shape
        mismatches, an unsupported released option, a pickle with non-tensor content). Nothing is written then.
    """
    source = Path(source)
    destination = Path(destination)
    if not source.is_dir():
        raise ValueError(f"`source` {source} is not a folder; pass the downloaded groma-7b-* checkpoint folder.")
    check_destination(destination, source)
    if config is None:
        config_path = source / "config.json"
        if not config_path.is_file():
            raise ValueError(f"`source` {source} has no config.json; pass `config=` to describe the checkpoint.")
        try:
            released = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"`source` config.json is not valid JSON: {error}.") from None
        config = groma_config_from_released(released)
    elif not isinstance(config, GromaConfig):
        raise TypeError(f"`config` must be a GromaConfig or None; got {type(config).__name__}.")

    released_weights = load_released_state_dict(source)
    target_dtype = resolve_dtype(dtype, released_weights.values())
    state_dict = convert_released_state_dict(released_weights, config)
    del released_weights
    processor = _build_processor(source, config)
    model = instantiate_converted(GromaForConditionalGeneration, config, state_dict, target_dtype)
    del state_dict

    return write_converted_checkpoint(
        model,
        processor,
        destination,
        source,
        system="groma",
        training_summary=(
            "Converted from the original FoundationVision/Groma release with `hf-regionmm convert groma`; the "
            "released behaviour (single-level proposer on the mean of the last 4 DINOv2 layers, cxcywh RoIAlign "
            "boxes, half strides, transformers-4.32 position interpolation) is kept, so outputs match the "
            "original."
        ),
    )
