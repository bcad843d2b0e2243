"""Convert a released RegionBLIP checkpoint (mightyzau/RegionBLIP, a LAVIS fork) into this library's layout.

A released RegionBLIP checkpoint is a LAVIS training checkpoint, `torch.save({"model": state_dict, "optimizer",
"config", "scaler", "epoch"})`, whose `state_dict` holds only the parameters that trained (plus every buffer), see
reference/original_repos.md 2b. The frozen parts come from elsewhere, and so they do here:

* BLIP-2 (vision tower, image Q-Former, LLM, the `image` queries and projection): a transformers
  `Blip2ForConditionalGeneration` (`blip2=`, e.g. a local copy of `Salesforce/blip2-opt-2.7b`), mapped as
  `RegionBlipForConditionalGeneration.from_blip2` maps it;
* Point-BERT: the original `point_bert_pretrained.pt` (`point_bert=`; `{"base_model": {"module.transformer_q.*"}}`,
  read as LAVIS' `load_model_from_ckpt` reads it, keeping `transformer_q.*` / `base_model.*` and ignoring the
  pre-training heads);
* the trainable parts (`Qformer_pc`, LoRA, queries, projections, PaFE, `pc_adapter`, optional box heads) from the
  released `.pth`, which overrides the two above, as LAVIS loads it after them.

LAVIS -> ours renames (the list of modeling_regionblip.py's docstring; `<m>`: img -> image, img_region ->
image_region, pc -> point_cloud, pc_region -> point_cloud_region):

* `Qformer.bert.` -> `model.qformer.`, `Qformer_pc.bert.` -> `model.point_cloud_qformer.`, inside them
  `embeddings.LayerNorm` -> `layernorm`, `.attention.self.` / `.crossattention.self.` -> `.attention.attention.` /
  `.crossattention.attention.`;
* LoRA `X.lora_A_<m>` / `X.lora_B_<m>` -> `X.lora_A.<m>.weight` / `X.lora_B.<m>.weight` (same (r, in) / (out, r)
  layout as loralib, no transpose), and the wrapped linear `X.weight` -> `X.base_layer.weight`;
* `query_tokens_<m>` -> `model.query_tokens.<m>`, `opt_proj_<m>` / `t5_proj_<m>` -> `model.multi_modal_projector.<m>`,
  `img_region_posembed.{0,2}` / `pc_region_posembed.{0,2}` -> `model.region_position_embeddings.<m>.layers.{0,2}`,
  `reg_img_region` / `reg_pc_region` -> `model.box_heads.<m>`, `pc_adapter` -> `model.point_cloud_adapter`,
  `ln_vision` -> `model.vision_tower.post_layernorm`;
* `opt_model.model.decoder.` -> `model.language_model.decoder.`, `opt_model.lm_head.` / `t5_model.lm_head.` ->
  `lm_head.`, `t5_model.` -> `model.language_model.`;
* `point_encoder.` -> `model.point_encoder.` with Point-BERT's renames (`encoder.` -> `group_encoder.`, `pos_embed`
  -> `position_embedding`, `blocks.blocks.N` -> `blocks.N`, `mlp.fc1` / `mlp.fc2` -> `mlp.0` / `mlp.2`);
* stage 1 (ITC / ITM / ITG), when the target config keeps those losses: `Qformer.bert.embeddings.{word,position}_
  embeddings` -> `model.qformer_text.{word,position}_embeddings`, the text feed-forward `layer.N.{intermediate,output}`
  -> the same names in `model.qformer`, `Qformer.cls.predictions.transform.{dense,LayerNorm}` ->
  `model.qformer_text.{lm_transform,lm_layer_norm}`, `Qformer.cls.predictions.{decoder.weight,bias}` ->
  `model.qformer_text.lm_decoder.{weight,bias}` (`cls.predictions.decoder.bias`, tied to `bias`, must equal it),
  `Qformer_pc.*` -> `model.point_cloud_qformer_text.*`, `stage1_proj_text` -> `model.text_projection`,
  `stage1_proj_<m>` -> `model.vision_projections.<m>`, `img_itm_head` -> `model.itm_head`, `temp` ->
  `model.temperature`.

The config derived by default (no `config=`) is a captioning model: `from_blip2`'s, with box heads only if the
release has `reg_*` weights, the point-cloud Q-Former if it has `Qformer_pc.*`, and the Q-Former losses off, because
the frozen image Q-Former's text side they need is in neither the release nor transformers' BLIP-2. Released keys
with no counterpart in the target model are then dropped by name, and listed in the log: that stage-1 part (the
`Qformer*` text side, `stage1_proj_*`, `img_itm_head`, `temp`), the `position_ids` buffers, and LoRA pairs of
adapters a Q-Former never runs (every LAVIS LoRA linear carries all four pairs; with `Qformer_pc` the image Q-Former
only runs the image modalities and `Qformer_pc` only the point-cloud ones, so those pairs keep their initial values).
Any other key is an error, unless `allow_extra_keys=True`.

The image modality's LoRA is not in the release (frozen at its zero start by `freeze_blip2_pretrain`): its B is zero
here too and its A is drawn from a fixed seed, so a conversion is reproducible byte for byte.

Safety: `.pth` / `.pt` files are read with `torch.load(weights_only=True)` only; a pickle naming anything but tensors
and plain containers is refused, never unpickled otherwise. Every trained weight must be present, every other weight
must come from BLIP-2 or Point-BERT, with the right shapes, or the conversion stops with the list of offending keys
before anything is written. The output (`save_pretrained` safetensors, processor when a tokenizer is available, model
card) is written into a temporary sibling folder that is renamed into place only once complete.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BlipImageProcessor, PreTrainedModel

from hf_regionmm.hub.conversion import (
    check_destination,
    format_keys,
    instantiate_converted,
    resolve_dtype,
    torch_load_weights_only,
    write_converted_checkpoint,
)
from hf_regionmm.modeling.configuration_regionblip import MODALITIES, RegionBlipConfig
from hf_regionmm.modeling.modeling_regionblip import RegionBlipForConditionalGeneration
from hf_regionmm.modeling.point_bert import PointBertModel
from hf_regionmm.processing.processing_regionblip import IMAGE_TOKEN, RegionBlipProcessor

__all__ = [
    "convert_lavis_state_dict",
    "convert_regionblip_checkpoint",
    "lavis_key_to_ours",
    "load_lavis_checkpoint",
    "load_point_bert_checkpoint",
]

logger = logging.getLogger(__name__)

# LAVIS modality suffixes -> ours.
_MODALITY_NAMES = {
    "img": "image",
    "img_region": "image_region",
    "pc": "point_cloud",
    "pc_region": "point_cloud_region",
}
_MODALITY_PATTERN = "(img_region|img|pc_region|pc)"

# Top-level LAVIS prefixes (checked in order; the first match wins).
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("Qformer.bert.", "model.qformer."),
    ("Qformer_pc.bert.", "model.point_cloud_qformer."),
    ("opt_model.lm_head.", "lm_head."),
    ("opt_model.model.", "model.language_model."),
    ("t5_model.lm_head.", "lm_head."),
    ("t5_model.", "model.language_model."),
    ("pc_adapter.", "model.point_cloud_adapter."),
    ("ln_vision.", "model.vision_tower.post_layernorm."),
    ("img_region_posembed.", "model.region_position_embeddings.image_region.layers."),
    ("pc_region_posembed.", "model.region_position_embeddings.point_cloud_region.layers."),
    ("reg_img_region.", "model.box_heads.image_region."),
    ("reg_pc_region.", "model.box_heads.point_cloud_region."),
    ("point_encoder.", "model.point_encoder."),
)
_QFORMER_RENAMES = (
    ("embeddings.LayerNorm.", "layernorm."),
    (".crossattention.self.", ".crossattention.attention."),
    (".attention.self.", ".attention.attention."),
)
# Point-BERT's original module names -> `PointBertModel`'s (point_bert.py docstring).
_POINT_BERT_RENAMES = (
    (r"^encoder\.", "group_encoder."),
    (r"^pos_embed\.", "position_embedding."),
    (r"^blocks\.blocks\.", "blocks."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.2."),
)
# The Q-Former text side (per LAVIS Q-Former module) and the stage-1 (ITC / ITM / ITG) heads.
_QFORMER_TEXT = {"Qformer": "model.qformer_text.", "Qformer_pc": "model.point_cloud_qformer_text."}
_STAGE1_RULES: tuple[tuple[str, str], ...] = tuple(
    (rf"^{lavis}\.{inner}", f"{ours}{target}")
    for lavis, ours in _QFORMER_TEXT.items()
    for inner, target in (
        (r"bert\.embeddings\.word_embeddings\.", "word_embeddings."),
        (r"bert\.embeddings\.position_embeddings\.", "position_embeddings."),
        (r"cls\.predictions\.transform\.dense\.", "lm_transform."),
        (r"cls\.predictions\.transform\.LayerNorm\.", "lm_layer_norm."),
        (r"cls\.predictions\.decoder\.weight$", "lm_decoder.weight"),
        (r"cls\.predictions\.bias$", "lm_decoder.bias"),
    )
) + (
    (r"^stage1_proj_text\.", "model.text_projection."),
    (r"^img_itm_head\.", "model.itm_head."),
    (r"^temp$", "model.temperature"),
)
# BERT ties its LM head's decoder bias to `cls.predictions.bias`; a state dict stores it under both names.
_ALIAS = re.compile(r"^(Qformer(_pc)?\.cls\.predictions)\.decoder\.bias$")
# Released keys the captioning model has no place for when the config leaves the Q-Former losses (ITC / ITM / ITG)
# off, and buffers that are rebuilt.
_TRAINING_ONLY = re.compile(
    r"^(Qformer(_pc)?\.bert\.embeddings\.(word_embeddings\.|position_embeddings\.|position_ids$)"
    r"|Qformer(_pc)?\.bert\.encoder\.layer\.\d+\.(intermediate|output)\."
    r"|Qformer(_pc)?\.cls\."
    r"|stage1_proj_(text|img|img_region|pc|pc_region)\."
    r"|img_itm_head\."
    r"|temp$)"
)
_QFORMER_TEXT_FFN = re.compile(r"^model\.qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
_LORA_TARGET = re.compile(r"^(?P<module>.+)\.lora_[AB]\.(?P<adapter>\w+)\.weight$")


def _point_bert_key(key: str) -> str:
    for pattern, replacement in _POINT_BERT_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def lavis_key_to_ours(key: str) -> str | None:
    """This library's name for a released (LAVIS) RegionBLIP key, or None if no rename rule covers it.

    The wrapped linears of LoRA layers come out without `.base_layer` (`...query.weight`); `convert_lavis_state_dict`
    inserts it where the target model has one. Example: `Qformer.bert.encoder.layer.0.attention.self.query.lora_A_pc`
    -> `model.qformer.encoder.layer.0.attention.attention.query.lora_A.point_cloud.weight`.
    """
    match = re.fullmatch(rf"query_tokens_{_MODALITY_PATTERN}", key)
    if match:
        return f"model.query_tokens.{_MODALITY_NAMES[match.group(1)]}"
    for pattern, replacement in _STAGE1_RULES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    match = re.match(rf"stage1_proj_{_MODALITY_PATTERN}\.(.+)$", key)
    if match:
        return f"model.vision_projections.{_MODALITY_NAMES[match.group(1)]}.{match.group(2)}"
    match = re.match(rf"(opt|t5)_proj_{_MODALITY_PATTERN}\.(.+)$", key)
    if match:
        return f"model.multi_modal_projector.{_MODALITY_NAMES[match.group(2)]}.{match.group(3)}"
    for original, ours in _PREFIXES:
        if not key.startswith(original):
            continue
        rest = key[len(original) :]
        if original.startswith("Qformer"):
            for old, new in _QFORMER_RENAMES:
                rest = rest.replace(old, new)
        elif original == "point_encoder.":
            rest = _point_bert_key(rest)
        renamed = ours + rest
        lora = re.fullmatch(rf"(.+)\.lora_([AB])_{_MODALITY_PATTERN}", renamed)
        if lora:
            renamed = f"{lora.group(1)}.lora_{lora.group(2)}.{_MODALITY_NAMES[lora.group(3)]}.weight"
        return renamed
    return None


def _fit_to_model(name: str, expected: Mapping[str, torch.Size]) -> str | None:
    """`name` itself, or with `.base_layer` before its last segment (a linear wrapped by peft), if the model has it."""
    if name in expected:
        return name
    head, _, leaf = name.rpartition(".")
    wrapped = f"{head}.base_layer.{leaf}"
    return wrapped if wrapped in expected else None


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files


def _torch_load(path: Path, argument: str) -> Any:
    if not path.is_file():
        raise ValueError(f"`{argument}` {path} is not a file.")
    return torch_load_weights_only(
        path,
        f"`{argument}` {path.name}",
        "re-save it as torch.save({'model': model.state_dict()}) from a trusted environment.",
    )


def _check_flat_state_dict(state_dict: Any, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise ValueError(
            f"{what} must be a flat state dict (parameter name -> tensor); got {type(state_dict).__name__}."
        )
    return dict(state_dict)


def load_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The `"model"` state dict of a released LAVIS RegionBLIP `.pth` (read with `torch.load(weights_only=True)`).

    Raises `ValueError` for a missing file, a pickle with anything but tensors and plain containers, or a file
    without a `"model"` dict of tensors.
    """
    path = Path(path)
    loaded = _torch_load(path, "source")
    if not isinstance(loaded, Mapping) or "model" not in loaded:
        keys = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(
            f"`source` {path.name} is not a LAVIS checkpoint: expected a dict with a 'model' state dict (as LAVIS "
            f"`_save_checkpoint` writes), got {keys}."
        )
    return _check_flat_state_dict(loaded["model"], f"`source` {path.name} ['model']")


def load_point_bert_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Point-BERT weights under `PointBertModel`'s names, from the original `point_bert_pretrained.pt`.

    As LAVIS' `load_model_from_ckpt`: take `ckpt["base_model"]` (or a flat state dict), strip `module.`, keep
    `transformer_q.*` (not its `cls_head`) and `base_model.*` without that prefix, and ignore the rest (dVAE and
    pre-training heads). Keys are renamed to `PointBertModel`'s; the caller checks completeness.
    """
    path = Path(path)
    loaded = _torch_load(path, "point_bert")
    if isinstance(loaded, Mapping) and isinstance(loaded.get("base_model"), Mapping):
        loaded = loaded["base_model"]
    state_dict = _check_flat_state_dict(loaded, f"`point_bert` {path.name}")
    weights = {}
    for key, tensor in state_dict.items():
        key = key.replace("module.", "")
        if key.startswith("transformer_q.") and not key.startswith("transformer_q.cls_head"):
            weights[_point_bert_key(key[len("transformer_q.") :])] = tensor
        elif key.startswith("base_model."):
            weights[_point_bert_key(key[len("base_model.") :])] = tensor
    if not weights:
        raise ValueError(
            f"`point_bert` {path.name} holds no `transformer_q.*` or `base_model.*` weights; pass Point-BERT's "
            "pre-trained `point_bert_pretrained.pt`."
        )
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Assembling the state dict


def _blip2_model(blip2: Any) -> PreTrainedModel:
    from transformers import Blip2ForConditionalGeneration

    if isinstance(blip2, Blip2ForConditionalGeneration):
        return blip2
    if isinstance(blip2, str | Path):
        if not Path(blip2).is_dir():
            raise ValueError(
                f"`blip2` {blip2} is not a folder; pass a local transformers Blip2ForConditionalGeneration checkpoint "
                "(e.g. a download of Salesforce/blip2-opt-2.7b), which provides the frozen BLIP-2 weights."
            )
        return Blip2ForConditionalGeneration.from_pretrained(str(blip2))
    if blip2 is None:
        raise ValueError(
            "`blip2` is required: a released RegionBLIP checkpoint holds only its trained weights, the frozen vision "
            "tower, Q-Former and LLM come from BLIP-2. Pass a local Blip2ForConditionalGeneration folder (e.g. "
            "Salesforce/blip2-opt-2.7b for RegionBLIP-OPT-2.7B) or model."
        )
    raise TypeError(f"`blip2` must be a Blip2ForConditionalGeneration or a folder path; got {type(blip2).__name__}.")


def _blip2_weights(
    blip2: PreTrainedModel, config: RegionBlipConfig, expected: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """BLIP-2's weights under our names (as `from_blip2`: its Q-Former also seeds `point_cloud_qformer`, its queries and
    projection seed every modality's)."""
    is_t5 = config.is_encoder_decoder_language_model
    llm_prefixes = (("language_model.lm_head.", "lm_head."),) + (
        (("language_model.", "model.language_model."),)
        if is_t5
        else (("language_model.model.", "model.language_model."),)
    )
    weights: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in blip2.state_dict().items():
        targets: list[str] = []
        if key == "query_tokens":
            targets = [f"model.query_tokens.{modality}" for modality in MODALITIES]
        elif key.startswith("language_projection."):
            leaf = key[len("language_projection.") :]
            targets = [f"model.multi_modal_projector.{modality}.{leaf}" for modality in MODALITIES]
        elif key.startswith("vision_model."):
            targets = ["model.vision_tower." + key[len("vision_model.") :]]
        elif key.startswith("qformer."):
            rest = key[len("qformer.") :]
            targets = ["model.qformer." + rest]
            if config.use_point_cloud_qformer:
                targets.append("model.point_cloud_qformer." + rest)
        else:
            for original, ours in llm_prefixes:
                if key.startswith(original):
                    targets = [ours + key[len(original) :]]
                    break
        fitted = [_fit_to_model(target, expected) for target in targets]
        if not targets or None in fitted:
            unmapped.append(key)
            continue
        for target in fitted:
            weights[target] = tensor
    if unmapped:
        raise ValueError(
            f"`blip2` has {len(unmapped)} weights with no place in RegionBLIP: {format_keys(sorted(unmapped))}. Pass "
            "the Blip2ForConditionalGeneration the RegionBLIP checkpoint was trained on (OPT for opt_*, Flan-T5 for "
            "t5_* releases)."
        )
    return weights


def _identity_image_adapters(expected: Mapping[str, torch.Size], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The `image` LoRA at its identity start: B = 0 (as LAVIS' frozen `lora_B_img`), A from a fixed seed."""
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name in sorted(expected):
        match = _LORA_TARGET.match(name)
        if match is None or match.group("adapter") != "image":
            continue
        shape = expected[name]
        if ".lora_B." in name:
            weights[name] = torch.zeros(shape, dtype=dtype)
        else:
            # peft's default A init (kaiming-uniform, a = sqrt(5)): bound = 1 / sqrt(fan_in).
            bound = 1.0 / math.sqrt(shape[1])
            weights[name] = (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(dtype)
    return weights


def _expected_model(config: RegionBlipConfig) -> tuple[dict[str, torch.Size], frozenset[str]]:
    """Key -> shape of the model's state dict, and the keys of the weights that train (those a release holds)."""
    return _expected_model_cached(config.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=4)
def _expected_model_cached(config_json: str) -> tuple[dict[str, torch.Size], frozenset[str]]:
    # The meta device allocates nothing, so a paper-size model costs only its Python objects (building it still
    # injects every LoRA adapter, the slow part; one conversion needs the answer twice).
    config = RegionBlipConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = RegionBlipForConditionalGeneration(config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    trained = frozenset(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    return shapes, trained


def convert_lavis_state_dict(
    lavis_state_dict: Mapping[str, torch.Tensor],
    config: RegionBlipConfig,
    *,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    allow_extra_keys: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename a released RegionBLIP state dict and complete it with the base weights, checking the result.

    Args:
        lavis_state_dict: the released `"model"` dict (LAVIS names, trainable parameters + buffers).
        config: the target model's config (decides the expected keys, shapes and which weights must have trained).
        base_weights: weights under our names that the release does not hold (BLIP-2, Point-BERT, the image LoRA);
            the release overrides them where both have a key.
        allow_extra_keys: drop (with a warning) released keys no rule maps, instead of failing.

    Returns:
        Model key -> tensor, exactly the keys of `RegionBlipForConditionalGeneration(config).state_dict()`.

    Raises:
        ValueError: listing unknown released keys, trained weights the release lacks, weights no source provides, or
        shape mismatches.
    """
    expected, trained = _expected_model(config)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown, dropped = [], []
    for key, tensor in lavis_state_dict.items():
        alias = _ALIAS.match(key)
        if alias:
            primary = f"{alias.group(1)}.bias"
            if primary not in lavis_state_dict:
                raise ValueError(f"`source` has {key!r} but not {primary!r}, which BERT ties it to.")
            if not torch.equal(tensor, lavis_state_dict[primary]):
                raise ValueError(
                    f"`source` stores {key!r} and {primary!r}, which BERT ties together, with different values; the "
                    "checkpoint is inconsistent and cannot be converted faithfully."
                )
            continue
        renamed = lavis_key_to_ours(key)
        target = None if renamed is None else _fit_to_model(renamed, expected)
        if target is None:
            lora = None if renamed is None else _LORA_TARGET.match(renamed)
            # A LoRA pair of an adapter that this Q-Former / LLM never runs (its wrapped linear exists here).
            unused_adapter = lora is not None and _fit_to_model(lora.group("module") + ".weight", expected) is not None
            if unused_adapter or _TRAINING_ONLY.match(key):
                dropped.append(key)
            else:
                unknown.append(key)
            continue
        if target in converted:
            raise ValueError(f"`source` keys {sources[target]!r} and {key!r} both map to {target!r}.")
        converted[target] = tensor
        sources[target] = key

    if unknown and not allow_extra_keys:
        raise ValueError(
            f"`source` has {len(unknown)} weights that are not part of the released RegionBLIP layout (no rename "
            f"rule for them): {format_keys(sorted(unknown))}. Nothing was written; pass allow_extra_keys=True to drop "
            "them if the checkpoint carries modules the captioning model does not use."
        )
    if unknown:
        logger.warning("Dropping %d unmapped released keys: %s", len(unknown), format_keys(sorted(unknown)))
    if dropped:
        logger.info(
            "Dropping %d released keys the captioning model does not use (ITC/ITM/ITG heads, Q-Former text side, "
            "never-run LoRA pairs, position_ids): %s",
            len(dropped),
            format_keys(sorted(dropped)),
        )

    not_trained = sorted(key for key in trained if key not in converted)
    if not_trained:
        raise ValueError(
            f"`source` lacks {len(not_trained)} weights that train in RegionBLIP and so must come from the released "
            f"checkpoint: {format_keys(not_trained)}. Nothing was written; is this the final checkpoint (not the "
            "BLIP-2 one), and does `config` (box regression, point-cloud Q-Former) describe it?"
        )
    for key, tensor in (base_weights or {}).items():
        if key in expected and key not in converted:
            converted[key] = tensor
            sources[key] = f"base weight {key}"
    missing = sorted(key for key in expected if key not in converted)
    if missing:
        hint = ""
        if any(key.startswith("model.point_encoder.") for key in missing):
            hint += " Pass `point_bert=` (Point-BERT's point_bert_pretrained.pt)."
        if any(key.startswith("model.qformer_text.") or _QFORMER_TEXT_FFN.search(key) for key in missing):
            hint += (
                " The image Q-Former's text side (ITC / ITM / ITG) is frozen in the release and absent from "
                "transformers' BLIP-2: convert with use_itc=use_itm=use_itg=False (the default derived config)."
            )
        raise ValueError(
            f"No source provides {len(missing)} weights of the converted model: {format_keys(missing)}. Nothing was "
            f"written.{hint}"
        )
    mismatched = [
        f"{sources[key]} {tuple(converted[key].shape)} -> {key} {tuple(shape)}"
        for key, shape in expected.items()
        if converted[key].shape != shape
    ]
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} weights have shapes that do not match the config: {format_keys(mismatched)}. Nothing "
            "was written; the BLIP-2 / Point-BERT checkpoints or `config` do not belong to this release."
        )
    return {key: converted[key] for key in expected}


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def _config_from_sources(
    blip2: PreTrainedModel, lavis_state_dict: Mapping[str, torch.Tensor], point_bert_config: Any
) -> RegionBlipConfig:
    """`from_blip2`'s config, with the released flags read off the checkpoint's keys."""
    blip2_config = blip2.config
    keys = list(lavis_state_dict)
    llm_kind = "t5" if blip2_config.text_config.model_type == "t5" else "opt"
    other = "opt" if llm_kind == "t5" else "t5"
    if any(key.startswith((f"{other}_model.", f"{other}_proj_")) for key in keys):
        raise ValueError(
            f"`source` holds {other.upper()} weights ({other}_model / {other}_proj_*) but `blip2` has a "
            f"{blip2_config.text_config.model_type} language model; pass the BLIP-2 the release was trained on."
        )
    qformer_config = blip2_config.qformer_config.to_dict()
    use_point_cloud_qformer = any(key.startswith("Qformer_pc.") for key in keys)
    return RegionBlipConfig(
        vision_config=blip2_config.vision_config.to_dict(),
        qformer_config=qformer_config,
        point_cloud_qformer_config=dict(qformer_config) if use_point_cloud_qformer else None,
        point_bert_config=point_bert_config,
        text_config=blip2_config.text_config.to_dict(),
        num_query_tokens=blip2_config.num_query_tokens,
        image_token_index=blip2_config.image_token_index,
        # The shipped train yamls leave `enable_aux_regloss` off: only releases with `reg_*` weights have box heads.
        use_box_regression=any(key.startswith(("reg_img_region.", "reg_pc_region.")) for key in keys),
        # A captioning model: the frozen image Q-Former's text side (BERT embeddings, text feed-forward, LM head),
        # which ITC / ITM / ITG need, is in neither the release (frozen) nor transformers' BLIP-2.
        use_itc=False,
        use_itm=False,
        use_itg=False,
    )


def _build_processor(tokenizer: Any, blip2: Any, config: RegionBlipConfig) -> RegionBlipProcessor | None:
    if tokenizer is None and isinstance(blip2, str | Path):
        folder = Path(blip2)
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            tokenizer = folder
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str | Path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except Exception as error:  # noqa: BLE001  (any loader failure becomes one clear conversion error)
            raise ValueError(
                f"`tokenizer` {tokenizer}: transformers could not load it ({type(error).__name__}: {error}); nothing "
                "was written."
            ) from None
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != config.image_token_index:
        raise ValueError(
            f"`tokenizer` maps {IMAGE_TOKEN!r} to id {image_token_id}, but the model's placeholder id "
            f"(image_token_index) is {config.image_token_index}; pass the BLIP-2 processor's tokenizer, which holds "
            f"{IMAGE_TOKEN!r} at that id."
        )
    size = config.vision_config.image_size
    return RegionBlipProcessor(
        BlipImageProcessor(size={"height": size, "width": size}),
        tokenizer,
        num_query_tokens=config.num_query_tokens,
        num_points=8192,
    )


def _resolve_source_folder(source: Path, blip2: Any, point_bert: Any) -> tuple[Path, Any, Any]:
    """A folder `source` holds one `.pth` release, optionally `blip2/` and `point_bert_pretrained.pt` beside it."""
    if not source.is_dir():
        return source, blip2, point_bert
    releases = sorted(path for path in source.iterdir() if path.suffix == ".pth")
    if len(releases) != 1:
        raise ValueError(
            f"`source` folder {source} must hold exactly one released `.pth` checkpoint; found "
            f"{[path.name for path in releases]}. Pass the `.pth` file itself."
        )
    if blip2 is None and (source / "blip2").is_dir():
        blip2 = source / "blip2"
    if point_bert is None and (source / "point_bert_pretrained.pt").is_file():
        point_bert = source / "point_bert_pretrained.pt"
    return releases[0], blip2, point_bert


def convert_regionblip_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    blip2: PreTrainedModel | str | Path | None = None,
    point_bert: PointBertModel | str | Path | None = None,
    config: RegionBlipConfig | None = None,
    tokenizer: Any = None,
    allow_extra_keys: bool = False,
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Convert a released RegionBLIP (LAVIS) checkpoint into a `RegionBlipForConditionalGeneration` folder.

    Args:
        source: the released `.pth` (`{"model": trainable state dict, ...}`), or a folder holding exactly one `.pth`
            and optionally `blip2/` (BLIP-2 folder) and `point_bert_pretrained.pt`, used when the arguments below are
            not given (so `hf-regionmm convert regionblip SRC DST` needs no options).
        destination: folder to create (must not exist, or be empty). It receives `config.json`, safetensors weights,
            `generation_config.json`, a model card and, when a tokenizer is available, the `RegionBlipProcessor`.
        blip2: the `Blip2ForConditionalGeneration` (or a local folder of one) the release was trained on; provides
            the frozen vision tower, Q-Former, LLM and the image modality. Required.
        point_bert: Point-BERT's `point_bert_pretrained.pt` (original format) or a `PointBertModel`; required for the
            point-cloud modalities' frozen encoder.
        config: use this `RegionBlipConfig` instead of the one derived from `blip2`, the Point-BERT defaults (or the
            `PointBertModel`'s config) and the release's keys; its sizes must match the weights.
        tokenizer: the LLM tokenizer with `<image>` at `image_token_index` (object or folder); default: `blip2`'s
            folder, when it has tokenizer files. Without one, no processor is written.
        allow_extra_keys: drop released keys that no rule maps (with a warning) instead of failing.
        dtype: dtype of the converted weights (default float32). With float16 the Q-Formers and queries stay
            float32 (the model's `_keep_in_fp32_modules`, which transformers applies to float16 only).

    Returns:
        `destination` as a `Path`.

    Raises:
        ValueError: anything that would make the result incomplete or unfaithful (unknown or missing keys, shape
        mismatches, a pickle with non-tensor content, a tokenizer whose `<image>` id differs). Nothing is written.
    """
    source, blip2, point_bert = _resolve_source_folder(Path(source), blip2, point_bert)
    destination = Path(destination)
    check_destination(destination, source)
    if config is not None and not isinstance(config, RegionBlipConfig):
        raise TypeError(f"`config` must be a RegionBlipConfig or None; got {type(config).__name__}.")
    target_dtype = resolve_dtype(dtype)
    lavis_state_dict = load_lavis_checkpoint(source)

    point_bert_weights: dict[str, torch.Tensor] = {}
    point_bert_config = None
    if isinstance(point_bert, PointBertModel):
        point_bert_weights = dict(point_bert.state_dict())
        point_bert_config = point_bert.config.to_dict()
    elif isinstance(point_bert, str | Path):
        point_bert_weights = load_point_bert_checkpoint(point_bert)
    elif point_bert is not None:
        raise TypeError(f"`point_bert` must be a path or a PointBertModel; got {type(point_bert).__name__}.")

    blip2_model = _blip2_model(blip2)
    if config is None:
        config = _config_from_sources(blip2_model, lavis_state_dict, point_bert_config)
    processor = _build_processor(tokenizer, blip2, config)
    expected, _ = _expected_model(config)
    base_weights = _identity_image_adapters(expected, target_dtype)
    base_weights.update(_blip2_weights(blip2_model, config, expected))
    base_weights.update({f"model.point_encoder.{key}": tensor for key, tensor in point_bert_weights.items()})
    state_dict = convert_lavis_state_dict(
        lavis_state_dict, config, base_weights=base_weights, allow_extra_keys=allow_extra_keys
    )
    del lavis_state_dict, base_weights, point_bert_weights
    keep_fp32 = tuple(f"model.{name}" for name in RegionBlipForConditionalGeneration._keep_in_fp32_modules)
    model = instantiate_converted(
        RegionBlipForConditionalGeneration, config, state_dict, target_dtype, keep_fp32=keep_fp32
    )
    del state_dict, blip2_model

    return write_converted_checkpoint(
        model,
        processor,
        destination,
        source,
        system="regionblip",
        training_summary=(
            "Converted from a released mightyzau/RegionBLIP (LAVIS) checkpoint with `hf-regionmm convert "
            "regionblip`: the trained weights (point-cloud Q-Former, per-modality LoRA, queries, projections, "
            "PaFE) on top of the BLIP-2 and Point-BERT weights it was trained from, so outputs match the original."
        ),
    )
