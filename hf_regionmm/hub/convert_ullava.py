"""Convert a released u-LLaVA checkpoint (`jinxu95/ullava`, code `OPPOMKLab/u-LLaVA`) into this library's layout.

The original `UllavaForCausalLM` (Xu et al. 2024, sections 3.1-3.2) is saved by `save_pretrained` of transformers 4.29
as `pytorch_model*.bin` (+ `pytorch_model.bin.index.json`) or safetensors, with a `config.json` whose `llm_config`
holds the Llama sizes, the CLIP `vision_config`, `vision_hidden_layer` and `projector_type`. SAM ViT-H is not
described by the config (the original code hard-codes it), so its sizes are read from the weight shapes.

Key renames (original -> here; `model.` is this library's base-model prefix; see `reference/original_repos.md` 4b):

* `llm.model.*` -> `model.language_model.*`, `llm.lm_head.weight` -> `lm_head.weight`;
* `llm.vision_encoder.vision_model.*` (or `llm.vision_encoder.*`, HF CLIP names) -> `model.vision_tower.*`;
* `llm.vision_projector.{weight,bias}` -> `model.multi_modal_projector.linear_1.*` (`projector_type` "mlp";
  "mlp2x": `llm.vision_projector.{0,2}` -> `linear_{1,2}`);
* `seg_projector.{0,2}` (HEAD) or `text_hidden_fcs.0.{0,2}` (the Jan-2024 Hub weights) -> `seg_projector.{0,2}`;
* `det_projector.*` -> `loc_projector.*`, `det_decoder.*` -> `loc_head.*` (HEAD only);
* `visual_model.{image_encoder,prompt_encoder,mask_decoder}.*` (segment-anything names) ->
  `model.sam_{vision_encoder,prompt_encoder,mask_decoder}.*` with transformers' SAM names: `blocks.N` -> `layers.N`,
  `norm{1,2}` -> `layer_norm{1,2}`, `patch_embed.proj` -> `patch_embed.projection`, `neck.{0,1,2,3}` ->
  `neck.{conv1,layer_norm1,conv2,layer_norm2}`; `pe_layer.positional_encoding_gaussian_matrix` ->
  `shared_embedding.positional_embedding`, `point_embeddings.N` -> `point_embed.N`, `mask_downscaling.{0,1,3,4,6}`
  -> `mask_embed.{conv1,layer_norm1,conv2,layer_norm2,conv3}`; `transformer.layers.N.norm{1-4}` ->
  `layer_norm{1-4}`, `transformer.norm_final_attn` -> `transformer.layer_norm_final_attn`, `output_upscaling.{0,1,3}`
  -> `upscale_conv1`, `upscale_layer_norm`, `upscale_conv2`; in `output_hypernetworks_mlps.N` and
  `iou_prediction_head` an MLP's `layers.0` -> `proj_in`, its last layer -> `proj_out`, `layers.k` -> `layers.(k-1)`.
* dropped: Llama `rotary_emb.inv_freq` and CLIP `position_ids` buffers (recomputed), SAM `pixel_mean`/`pixel_std`
  (the processor normalises; they must hold SAM's values).

Two vocabulary layouts exist. HEAD code: 11 new tokens, `[LOC]` = 32008, `det_*` heads present. The Jan-2024 Hub
weights: 10 new tokens (no `[LOC]`, `[tag]` = 32008, `[/tag]` = 32009), no `det_*` heads. This library always has
the 11 tokens, so a legacy checkpoint gets a `[LOC]` row inserted at `base + 8` of the embedding and of `lm_head`
(both the mean of the existing rows: its logit is the mean logit, so greedy decoding does not produce it) and
untrained location heads (seeded default init); its `rec_fusion` is `"mask"`, the old REC path (box of the mask).
Every other logit, mask and hidden state equals the original's. A legacy tokenizer is re-laid out the same way (its
10 tokens removed, the 11 appended in the HEAD order), so the text of every other token is unchanged.

Behaviour kept from the release: `seg_token_offset="previous"`, `loc_box_activation="none"` (raw decoder outputs).

Safety: `.bin` files are read with `torch.load(weights_only=True)` only. Unknown keys, missing weights and shape
mismatches stop the conversion with a list of the offending keys before anything is written; the output is written
into a temporary sibling folder renamed into place only once complete.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hf_regionmm.hub.conversion import (
    check_destination,
    expected_shapes,
    format_keys,
    instantiate_converted,
    load_weight_file,
    resolve_dtype,
    write_converted_checkpoint,
)
from hf_regionmm.hub.convert_groma import load_released_state_dict
from hf_regionmm.modeling.configuration_ullava import ULLAVA_NEW_TOKENS, ULlavaConfig
from hf_regionmm.modeling.modeling_ullava import ULlavaForConditionalGeneration
from hf_regionmm.processing.processing_ullava import ULlavaProcessor, add_ullava_special_tokens

__all__ = [
    "LEGACY_NEW_TOKENS",
    "convert_released_state_dict",
    "convert_ullava_checkpoint",
    "load_ullava_state_dict",
    "ullava_config_from_released",
]

# The Jan-2024 release added these 10 tokens (no `[LOC]`), in this order, after the LLM vocabulary.
LEGACY_NEW_TOKENS: tuple[str, ...] = tuple(token for token in ULLAVA_NEW_TOKENS if token != "[LOC]")
_LOC_INDEX = ULLAVA_NEW_TOKENS.index("[LOC]")

# Size conventions used when config.json does not give a value the shapes cannot tell: head widths of Llama (128),
# CLIP (64) and the number of SAM mask-decoder heads (8), as in every released Vicuna / CLIP-L / SAM checkpoint.
_LLAMA_HEAD_DIM = 128
_CLIP_HEAD_DIM = 64
_SAM_DECODER_HEADS = 8
_SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
_SAM_PIXEL_STD = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------------------------------------------
# Reading the released weights


def load_ullava_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a released checkpoint under its original key names.

    Args:
        source: a folder (`model.safetensors`, `pytorch_model.bin`, or shards with `model.safetensors.index.json` /
            `pytorch_model.bin.index.json`) or a single `.safetensors` / `.bin` file.

    `.bin` files are read only through `torch.load(weights_only=True)`; a pickle holding anything but tensors is
    refused with a `ValueError`.
    """
    source = Path(source)
    if source.is_dir():
        return load_released_state_dict(source)
    if source.is_file():
        if source.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(
                f"`source` {source} is neither a folder nor a `.safetensors` / `.bin` weight file; pass the "
                "downloaded jinxu95/ullava folder or one of its weight files."
            )
        return load_weight_file(source)
    raise ValueError(f"`source` {source} does not exist; pass a checkpoint folder or a weight file.")


# ----------------------------------------------------------------------------------------------------------------
# Key mapping

_PREFIXES: tuple[tuple[str, str], ...] = (
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
    ("llm.vision_encoder.vision_model.", "model.vision_tower."),
    ("llm.vision_encoder.", "model.vision_tower."),
    ("llm.vision_projector.0.", "model.multi_modal_projector.linear_1."),
    ("llm.vision_projector.2.", "model.multi_modal_projector.linear_2."),
    ("llm.vision_projector.", "model.multi_modal_projector.linear_1."),
    ("seg_projector.", "seg_projector."),
    ("text_hidden_fcs.0.", "seg_projector."),
    ("det_projector.", "loc_projector."),
    ("det_decoder.", "loc_head."),
    ("visual_model.image_encoder.", "model.sam_vision_encoder."),
    ("visual_model.prompt_encoder.", "model.sam_prompt_encoder."),
    ("visual_model.mask_decoder.", "model.sam_mask_decoder."),
)
# Regex renames inside each SAM part (segment-anything -> transformers), applied to the part-relative name.
_SAM_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "visual_model.image_encoder.": (
        (r"^patch_embed\.proj\.", "patch_embed.projection."),
        (r"^blocks\.(\d+)\.norm(\d)\.", r"layers.\1.layer_norm\2."),
        (r"^blocks\.(\d+)\.", r"layers.\1."),
        (r"^neck\.0\.", "neck.conv1."),
        (r"^neck\.1\.", "neck.layer_norm1."),
        (r"^neck\.2\.", "neck.conv2."),
        (r"^neck\.3\.", "neck.layer_norm2."),
    ),
    "visual_model.prompt_encoder.": (
        (r"^pe_layer\.positional_encoding_gaussian_matrix$", "shared_embedding.positional_embedding"),
        (r"^point_embeddings\.(\d+)\.", r"point_embed.\1."),
        (r"^mask_downscaling\.0\.", "mask_embed.conv1."),
        (r"^mask_downscaling\.1\.", "mask_embed.layer_norm1."),
        (r"^mask_downscaling\.3\.", "mask_embed.conv2."),
        (r"^mask_downscaling\.4\.", "mask_embed.layer_norm2."),
        (r"^mask_downscaling\.6\.", "mask_embed.conv3."),
    ),
    "visual_model.mask_decoder.": (
        (r"^transformer\.layers\.(\d+)\.norm(\d)\.", r"transformer.layers.\1.layer_norm\2."),
        (r"^transformer\.norm_final_attn\.", "transformer.layer_norm_final_attn."),
        (r"^output_upscaling\.0\.", "upscale_conv1."),
        (r"^output_upscaling\.1\.", "upscale_layer_norm."),
        (r"^output_upscaling\.3\.", "upscale_conv2."),
    ),
}
# segment-anything's `MLP` keeps all its linears in `layers`; transformers' `SamFeedForward` names the first and the
# last `proj_in` / `proj_out`, so the index map depends on the MLP's depth.
_SAM_MLP = re.compile(r"^(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.(weight|bias)$")


def _is_dropped(key: str, tensor: torch.Tensor) -> bool:
    if key.startswith("llm.model.layers.") and key.endswith(".self_attn.rotary_emb.inv_freq"):
        return True
    if key.startswith("llm.vision_encoder.") and key.endswith("embeddings.position_ids"):
        return True
    if key in ("visual_model.pixel_mean", "visual_model.pixel_std"):
        expected = _SAM_PIXEL_MEAN if key.endswith("mean") else _SAM_PIXEL_STD
        values = tensor.detach().float().flatten().tolist()
        if len(values) != 3 or any(abs(a - b) > 1e-3 for a, b in zip(values, expected)):
            raise ValueError(
                f"`source` {key} = {values} differs from SAM's {list(expected)}; the processor normalises with SAM's "
                "values, so this checkpoint would not reproduce its masks."
            )
        return True
    return False


def _mlp_depths(keys: list[str]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for key in keys:
        if not key.startswith("visual_model.mask_decoder."):
            continue
        match = _SAM_MLP.match(key[len("visual_model.mask_decoder.") :])
        if match:
            depths[match.group(1)] = max(depths.get(match.group(1), 0), int(match.group(2)) + 1)
    return depths


def _rename(key: str, mlp_depths: Mapping[str, int]) -> str | None:
    """The model name of an original key, or None if the key is not part of a released layout."""
    for original, ours in _PREFIXES:
        if not key.startswith(original):
            continue
        rest = key[len(original) :]
        if original == "llm.vision_projector." and rest not in ("weight", "bias"):
            return None
        if original == "visual_model.mask_decoder.":
            match = _SAM_MLP.match(rest)
            if match:
                name, index, kind = match.group(1), int(match.group(2)), match.group(3)
                depth = mlp_depths[name]
                layer = "proj_in" if index == 0 else "proj_out" if index == depth - 1 else f"layers.{index - 1}"
                return f"{ours}{name}.{layer}.{kind}"
        for pattern, replacement in _SAM_RENAMES.get(original, ()):
            renamed, count = re.subn(pattern, replacement, rest)
            if count:
                rest = renamed
                break
        return ours + rest
    return None


def _insert_loc_row(matrix: torch.Tensor, base_vocab_size: int) -> torch.Tensor:
    # The mean row: as an embedding it is the usual init of a new token; as an lm_head row its logit is the mean of
    # all logits, so greedy decoding of the legacy model never picks `[LOC]` and the other logits stay exact.
    position = base_vocab_size + _LOC_INDEX
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
    return torch.cat([matrix[:position], mean, matrix[position:]], dim=0)


def _location_keys(expected: Mapping[str, torch.Size]) -> list[str]:
    return sorted(key for key in expected if key.startswith(("loc_projector.", "loc_head.")))


def convert_released_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ULlavaConfig
) -> dict[str, torch.Tensor]:
    """Rename an original u-LLaVA state dict to `ULlavaForConditionalGeneration`'s keys, checking it is complete.

    Args:
        state_dict: original key -> tensor (as `load_ullava_state_dict` returns it); not modified.
        config: the target config (decides the expected keys and shapes).

    Returns:
        Model key -> tensor for every model weight, except the location heads of a legacy checkpoint (no `det_*`
        keys), which the caller initialises. A legacy checkpoint (embedding rows = `config.text_config.vocab_size -
        1`, no `det_*`) gets its `[LOC]` row inserted into `model.language_model.embed_tokens` and `lm_head`.

    Raises:
        ValueError: listing original keys without a mapping, model weights the checkpoint lacks, or shape mismatches.
    """
    keys = list(state_dict)
    mlp_depths = _mlp_depths(keys)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        tensor = state_dict[key]
        if _is_dropped(key, tensor):
            continue
        renamed = _rename(key, mlp_depths)
        if renamed is None:
            unknown.append(key)
            continue
        if renamed in converted:
            raise ValueError(f"`source` keys {sources[renamed]!r} and {key!r} both map to {renamed!r}.")
        converted[renamed] = tensor
        sources[renamed] = key

    expected = expected_shapes(ULlavaForConditionalGeneration, config)
    unknown += [sources[key] for key in converted if key not in expected]
    if unknown:
        raise ValueError(
            f"`source` has {len(unknown)} weights that are not part of a released u-LLaVA layout (no mapping for "
            f"them): {format_keys(sorted(unknown))}. Nothing was written; a checkpoint with extra modules (or a "
            "LoRA adapter not merged into `llm`) cannot be converted."
        )

    vocab_size = config.text_config.vocab_size
    has_location_heads = any(key.startswith("det_") for key in keys)
    legacy_rows = vocab_size - 1
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        tensor = converted.get(name)
        if tensor is not None and tensor.ndim == 2 and tensor.shape[0] == legacy_rows and not has_location_heads:
            converted[name] = _insert_loc_row(tensor, config.base_vocab_size)

    location_keys = [] if has_location_heads else _location_keys(expected)
    missing = sorted(key for key in expected if key not in converted and key not in location_keys)
    if missing:
        raise ValueError(
            f"`source` lacks {len(missing)} weights the converted model needs: {format_keys(missing)}. Nothing was "
            "written; check that every shard is present and that the config describes this checkpoint."
        )
    mismatched = [
        f"{sources[key]} {tuple(converted[key].shape)} -> {key} {tuple(shape)}"
        for key, shape in expected.items()
        if key in converted and converted[key].shape != shape
    ]
    if mismatched:
        raise ValueError(
            f"`source` has {len(mismatched)} weights whose shapes do not match the config: "
            f"{format_keys(mismatched)}. Nothing was written; the `config` does not describe this checkpoint."
        )
    return {key: converted[key] for key in expected if key in converted}


# ----------------------------------------------------------------------------------------------------------------
# Config from the weights (+ the released config.json when present)


def _layer_count(keys: list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(match.group(1)) for key in keys if (match := pattern.match(key))}
    if not indices:
        raise ValueError(f"`source` has no `{prefix}N.*` weights; it is not a u-LLaVA checkpoint.")
    return max(indices) + 1


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state_dict:
        raise ValueError(
            f"`source` lacks {key!r}, which the config is inferred from; pass `config=` or check the checkpoint."
        )
    return state_dict[key].shape


def _vision_prefix(keys: list[str]) -> str:
    if any(key.startswith("llm.vision_encoder.vision_model.") for key in keys):
        return "llm.vision_encoder.vision_model."
    return "llm.vision_encoder."


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"`config.json` field `{name}` must be a JSON object; got {type(value).__name__}.")
    return value


def _text_config(state_dict: Mapping[str, torch.Tensor], released_llm: Mapping[str, Any], vocab_size: int) -> dict:
    keys = list(state_dict)
    hidden = _shape(state_dict, "llm.model.embed_tokens.weight")[1]
    heads = released_llm.get("num_attention_heads", hidden // _LLAMA_HEAD_DIM)
    key_rows = _shape(state_dict, "llm.model.layers.0.self_attn.k_proj.weight")[0]
    if not isinstance(heads, int) or heads < 1 or hidden % heads or key_rows % (hidden // heads):
        raise ValueError(
            f"`source` Llama width {hidden} (key width {key_rows}) does not fit num_attention_heads={heads!r} (the "
            f"released head width {_LLAMA_HEAD_DIM} when config.json does not say); put the original config.json "
            "(`llm_config.num_attention_heads`) next to the weights or pass `config=`."
        )
    head_dim = hidden // heads
    base_vocab = vocab_size - len(ULLAVA_NEW_TOKENS)
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _shape(state_dict, "llm.model.layers.0.mlp.gate_proj.weight")[0],
        "num_hidden_layers": _layer_count(keys, "llm.model.layers."),
        "num_attention_heads": heads,
        "num_key_value_heads": released_llm.get("num_key_value_heads") or key_rows // head_dim,
        "max_position_embeddings": released_llm.get("max_position_embeddings", 2048),
        "rms_norm_eps": released_llm.get("rms_norm_eps", 1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": released_llm.get("rope_theta", 10000.0)},
        "hidden_act": released_llm.get("hidden_act", "silu"),
        "bos_token_id": released_llm.get("bos_token_id", 1),
        "eos_token_id": released_llm.get("eos_token_id", 2),
        # The release pads with `[PAD]`, its first new token.
        "pad_token_id": base_vocab,
        "tie_word_embeddings": False,
    }


def _vision_config(state_dict: Mapping[str, torch.Tensor], released_vision: Mapping[str, Any]) -> dict:
    keys = list(state_dict)
    prefix = _vision_prefix(keys)
    hidden, _, patch_size, _ = _shape(state_dict, f"{prefix}embeddings.patch_embedding.weight")
    positions = _shape(state_dict, f"{prefix}embeddings.position_embedding.weight")[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"`source` CLIP position table has {positions} rows; expected 1 + a square number.")
    heads = released_vision.get("num_attention_heads", hidden // _CLIP_HEAD_DIM)
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise ValueError(
            f"`source` CLIP width {hidden} does not fit num_attention_heads={heads!r} (the released head width "
            f"{_CLIP_HEAD_DIM} when config.json does not say); put the original config.json "
            "(`llm_config.vision_config.num_attention_heads`) next to the weights or pass `config=`."
        )
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": _shape(state_dict, f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _layer_count(keys, f"{prefix}encoder.layers."),
        "num_attention_heads": heads,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "projection_dim": released_vision.get("projection_dim", 768),
        "hidden_act": released_vision.get("hidden_act", "quick_gelu"),
        "layer_norm_eps": released_vision.get("layer_norm_eps", 1e-5),
    }


def _sam_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    keys = list(state_dict)
    encoder, prompt, decoder = (
        f"visual_model.{part}." for part in ("image_encoder", "prompt_encoder", "mask_decoder")
    )
    hidden, _, patch_size, _ = _shape(state_dict, f"{encoder}patch_embed.proj.weight")
    grid = _shape(state_dict, f"{encoder}pos_embed")[1]
    output_channels = _shape(state_dict, f"{encoder}neck.0.weight")[0]
    num_layers = _layer_count(keys, f"{encoder}blocks.")
    # Global-attention blocks have a relative-position table over the whole grid (2 * grid - 1 rows), windowed ones
    # over their window (2 * window - 1 rows): which blocks are global and the window size follow from the shapes.
    table_rows = [_shape(state_dict, f"{encoder}blocks.{index}.attn.rel_pos_h")[0] for index in range(num_layers)]
    head_dim = _shape(state_dict, f"{encoder}blocks.0.attn.rel_pos_h")[1]
    global_blocks = [index for index, rows in enumerate(table_rows) if rows == 2 * grid - 1]
    windowed = [rows for rows in table_rows if rows != 2 * grid - 1]
    window_size = (windowed[0] + 1) // 2 if windowed else 0
    decoder_hidden = _shape(state_dict, f"{decoder}iou_token.weight")[1]
    mask_tokens = _shape(state_dict, f"{decoder}mask_tokens.weight")[0]
    iou_depth = _mlp_depths(keys).get("iou_prediction_head", 3)
    image_size = grid * patch_size
    return {
        "vision_config": {
            "hidden_size": hidden,
            "num_hidden_layers": num_layers,
            "num_attention_heads": hidden // head_dim,
            "global_attn_indexes": global_blocks,
            "window_size": window_size,
            "output_channels": output_channels,
            "num_pos_feats": _shape(state_dict, f"{prompt}pe_layer.positional_encoding_gaussian_matrix")[1],
            "image_size": image_size,
            "patch_size": patch_size,
            "mlp_dim": _shape(state_dict, f"{encoder}blocks.0.mlp.lin1.weight")[0],
        },
        "prompt_encoder_config": {
            "hidden_size": output_channels,
            "image_size": image_size,
            "patch_size": patch_size,
            "mask_input_channels": _shape(state_dict, f"{prompt}mask_downscaling.3.weight")[0],
        },
        "mask_decoder_config": {
            "hidden_size": decoder_hidden,
            "num_hidden_layers": _layer_count(keys, f"{decoder}transformer.layers."),
            "num_attention_heads": _SAM_DECODER_HEADS,
            "mlp_dim": _shape(state_dict, f"{decoder}transformer.layers.0.mlp.lin1.weight")[0],
            "attention_downsample_rate": decoder_hidden
            // _shape(state_dict, f"{decoder}transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0],
            "num_multimask_outputs": mask_tokens - 1,
            "iou_head_depth": iou_depth,
            "iou_head_hidden_dim": _shape(state_dict, f"{decoder}iou_prediction_head.layers.0.weight")[0],
        },
    }


def ullava_config_from_released(
    state_dict: Mapping[str, torch.Tensor],
    released: Mapping[str, Any] | None = None,
    *,
    num_video_frames: int = 8,
) -> ULlavaConfig:
    """Build the `ULlavaConfig` (released behaviour) of an original checkpoint from its weight shapes.

    Args:
        state_dict: original key -> tensor (only shapes are read; meta tensors are fine).
        released: the parsed original `config.json`, if any. Read: `llm_config.{num_attention_heads,
            num_key_value_heads, rms_norm_eps, rope_theta, max_position_embeddings, bos_token_id, eos_token_id,
            hidden_act}`, `llm_config.vision_config.{num_attention_heads, hidden_act, layer_norm_eps}`,
            `llm_config.vision_hidden_layer` and `llm_config.projector_type`. Head counts the shapes cannot give default
            to the released conventions (Llama head width 128, CLIP 64, 8 SAM decoder heads).
        num_video_frames: frames per video (8 in the release; not visible in the weights).

    Returns:
        A `ULlavaConfig` with `seg_token_offset="previous"`, `loc_box_activation="none"`, and `rec_fusion="box"`
        (HEAD, with `det_*` heads) or `"mask"` (legacy checkpoint without them, which gets a `[LOC]` token inserted).
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise TypeError("`state_dict` must be a non-empty mapping of original key -> tensor.")
    released = _mapping(released, "config.json")
    llm = _mapping(released.get("llm_config"), "llm_config")
    vision = _mapping(llm.get("vision_config"), "llm_config.vision_config")
    keys = list(state_dict)
    has_location_heads = any(key.startswith("det_") for key in keys)
    rows = _shape(state_dict, "llm.model.embed_tokens.weight")[0]
    vocab_size = rows if has_location_heads else rows + 1
    projector_type = "mlp2x_gelu" if "llm.vision_projector.2.weight" in state_dict else "linear"
    if llm.get("projector_type") not in (None, "mlp", "mlp2x"):
        raise ValueError(
            f"`config.json` llm_config.projector_type={llm.get('projector_type')!r}; the release has 'mlp' (one "
            "Linear) or 'mlp2x' (Linear-GELU-Linear)."
        )
    location: dict[str, Any] = {"rec_fusion": "mask"}
    if has_location_heads:
        head_layers = _layer_count(keys, "det_decoder.")
        location = {
            "rec_fusion": "box",
            "loc_projector_dim": _shape(state_dict, "det_projector.2.weight")[0],
            "loc_head_hidden_sizes": [
                _shape(state_dict, f"det_decoder.{index}.weight")[0] for index in range(0, head_layers - 1, 2)
            ],
        }
    vision_config = _vision_config(state_dict, vision)
    return ULlavaConfig(
        vision_config=vision_config,
        text_config=_text_config(state_dict, llm, vocab_size),
        sam_config=_sam_config(state_dict),
        vision_feature_layer=llm.get("vision_hidden_layer", -2),
        image_size=vision_config["image_size"],
        projector_type=projector_type,
        num_video_frames=num_video_frames,
        seg_token_offset="previous",
        loc_box_activation="none",
        **location,
    )


# ----------------------------------------------------------------------------------------------------------------
# Conversion

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _without_legacy_tokens(tokenizer: Any) -> PreTrainedTokenizerFast:
    """The legacy tokenizer (10 u-LLaVA tokens, no `[LOC]`) with those tokens removed, so that
    `add_ullava_special_tokens` can append the 11 tokens in the HEAD order (`[tag]`, `[/tag]` move up by one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = tokenizer.get_vocab()
    legacy_ids = [vocab.get(token) for token in LEGACY_NEW_TOKENS]
    base = len(tokenizer) - len(LEGACY_NEW_TOKENS)
    if backend is None or legacy_ids != list(range(base, len(tokenizer))):
        raise ValueError(
            "`source` tokenizer has u-LLaVA's legacy tokens (no `[LOC]`) but not as its last 10 ids in the released "
            f"order (got ids {legacy_ids} for a vocabulary of {len(tokenizer)}); pass `tokenizer=` a folder with the "
            "plain Vicuna tokenizer, or `tokenizer=False` to convert the weights only."
        )
    state = json.loads(backend.to_str())
    legacy = set(LEGACY_NEW_TOKENS)
    state["added_tokens"] = [entry for entry in state.get("added_tokens", []) if entry["content"] not in legacy]
    model_vocab = state.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):
        state["model"]["vocab"] = {token: index for token, index in model_vocab.items() if token not in legacy}
    special = {
        name: value
        for name, value in tokenizer.special_tokens_map.items()
        if name in ("bos_token", "eos_token", "unk_token", "pad_token") and value not in legacy
    }
    rebuilt = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), **special)
    if len(rebuilt) != base:
        raise ValueError(
            f"`source` tokenizer still has {len(rebuilt)} tokens after removing u-LLaVA's legacy tokens (expected "
            f"{base}); pass `tokenizer=` a folder with the plain Vicuna tokenizer."
        )
    return rebuilt


def _build_processor(tokenizer_source: Path, config: ULlavaConfig) -> ULlavaProcessor | None:
    if not any((tokenizer_source / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), local_files_only=True)
    except Exception as error:  # noqa: BLE001  (any loader failure becomes one clear conversion error)
        raise ValueError(
            f"`source` has tokenizer files but transformers could not load them ({type(error).__name__}: {error}). "
            "A sentencepiece `tokenizer.model` needs `pip install sentencepiece`; nothing was written."
        ) from None
    vocab = tokenizer.get_vocab()
    if "[SEG]" in vocab and "[LOC]" not in vocab:
        tokenizer = _without_legacy_tokens(tokenizer)
    tokenizer = add_ullava_special_tokens(tokenizer)
    if len(tokenizer) != config.text_config.vocab_size:
        raise ValueError(
            f"`source` tokenizer has {len(tokenizer)} tokens with u-LLaVA's, but the model's vocabulary is "
            f"{config.text_config.vocab_size}; the tokenizer does not belong to this checkpoint."
        )
    return ULlavaProcessor.from_model_config(config, tokenizer)


def _read_released_config(source: Path) -> dict[str, Any] | None:
    config_path = (source if source.is_dir() else source.parent) / "config.json"
    if not config_path.is_file():
        return None
    try:
        released = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"`source` config.json is not valid JSON: {error}.") from None
    if not isinstance(released, dict):
        raise ValueError(f"`source` config.json must hold a JSON object; got {type(released).__name__}.")
    if released.get("model_type") not in (None, "ullava"):
        raise ValueError(
            f"`source` config.json has model_type={released.get('model_type')!r}; expected 'ullava' (the "
            "UllavaForCausalLM of OPPOMKLab/u-LLaVA)."
        )
    return released


def convert_ullava_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    config: ULlavaConfig | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: str | Path | bool | None = None,
    num_video_frames: int = 8,
) -> Path:
    """Convert a released u-LLaVA checkpoint into a `ULlavaForConditionalGeneration` folder.

    Args:
        source: the original folder (weights as `pytorch_model*.bin` or `*.safetensors`, sharded or not, optional
            `config.json` and tokenizer files) or a single `.safetensors` / `.bin` weight file.
        destination: folder to create (must not exist, or be empty). It receives `config.json`, safetensors weights,
            `generation_config.json`, a model card and, when a tokenizer is available, the `ULlavaProcessor` files.
        config: use this config instead of the one inferred from the weight shapes and `config.json`.
        dtype: dtype of the converted weights; default the checkpoint's own if all its floating tensors share one,
            else float32.
        tokenizer: a folder holding the plain LLM tokenizer to build the processor from (default: `source`, when it
            holds tokenizer files); `False` writes the weights only.
        num_video_frames: frames per video for the inferred config (8 in the release).

    Returns:
        `destination` as a `Path`.

    Raises:
        ValueError: unknown or missing keys, shape mismatches, a pickle with non-tensor content, a tokenizer that
        does not belong to the weights. Nothing is written then.
    """
    source = Path(source)
    destination = Path(destination)
    if not source.exists():
        raise ValueError(f"`source` {source} does not exist; pass a checkpoint folder or a weight file.")
    check_destination(destination, source)
    if config is not None and not isinstance(config, ULlavaConfig):
        raise TypeError(f"`config` must be a ULlavaConfig or None; got {type(config).__name__}.")
    if tokenizer is not None and not isinstance(tokenizer, (str, Path, bool)):
        raise TypeError(f"`tokenizer` must be a folder path, False or None; got {type(tokenizer).__name__}.")

    released_weights = load_ullava_state_dict(source)
    has_location_heads = any(key.startswith("det_") for key in released_weights)
    if config is None:
        config = ullava_config_from_released(
            released_weights, _read_released_config(source), num_video_frames=num_video_frames
        )
    target_dtype = resolve_dtype(dtype, released_weights.values())
    state_dict = convert_released_state_dict(released_weights, config)
    del released_weights
    processor = None
    if tokenizer is not False:
        tokenizer_source = Path(tokenizer) if isinstance(tokenizer, (str, Path)) else source
        if tokenizer_source.is_dir():
            processor = _build_processor(tokenizer_source, config)
        elif tokenizer is not None:
            raise ValueError(f"`tokenizer` {tokenizer_source} is not a folder with tokenizer files.")

    # Legacy checkpoints have no location heads: they keep their (seeded, repeatable) initialisation.
    model = instantiate_converted(
        ULlavaForConditionalGeneration,
        config,
        state_dict,
        target_dtype,
        allowed_missing=lambda loaded: () if has_location_heads else _location_keys(loaded.state_dict()),
    )
    del state_dict

    return write_converted_checkpoint(
        model,
        processor,
        destination,
        source,
        system="ullava",
        training_summary=(
            "Converted from the original OPPOMKLab/u-LLaVA release with `hf-regionmm convert ullava`; the "
            "released behaviour (the [SEG]/[LOC] state of the preceding token, raw location-decoder outputs) is "
            "kept, so outputs match the original."
        ),
    )
