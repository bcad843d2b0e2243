"""Convert a released TAP v1.x checkpoint (`BAAI/tokenize-anything`) into this library's `TapModel` layout.

The release (reference/original_repos.md section 3b) is a *pickle* `models/tap_vit_{b,l,h}_v1_1.pkl` holding a dict
`{parameter name: numpy.ndarray}` -- the `ImageTokenizer` state dict, buffers included -- plus optional concept banks
`concepts/{merged_2560,lvis_1203,coco_80}.pkl`, each a pickled `[weights (1024, K) float32, [K concept names]]` whose
columns are EVA-CLIP text embeddings already multiplied by `logit_scale.exp()`. The original loader calls
`pickle.load`, which runs whatever the file asks for; here every pickle goes through `restricted_load_pickle`, whose
unpickler resolves only the globals a numpy array needs and refuses anything else before it can run.

Key mapping (v1.1 -> `TapModel`; N = block / layer index):

* `image_encoder.patch_embed.proj.*` -> `vision_encoder.patch_embed.*`, input channels reversed: the release reads
  BGR images (cv2), our processor gives RGB;
* `image_encoder.pos_embed.weight` -> `vision_encoder.position_embeddings`;
* `image_encoder.blocks.N.{norm1,attn.qkv,attn.proj,attn.rel_pos_embed.{weight,index},norm2,mlp.fc1,mlp.fc2}` ->
  `vision_encoder.layers.N.*` (same names); `image_encoder.norm` -> `vision_encoder.norm`;
* `image_encoder.cross_conv.N.{conv,norm}{1,2,3}` -> `vision_encoder.cross_blocks.N.*` (SyncBatchNorm -> BatchNorm2d,
  same keys);
* `image_encoder.neck.{lateral_conv,output_conv}.0.{0,1}` -> `vision_encoder.neck.{conv1,norm1}` / `{conv2,norm2}`;
* `prompt_encoder.{point_embed.weight,coord_matrix}` -> same names;
* `image_decoder.transformer.blocks.N.{self_attn,cross_attn_token_to_image,cross_attn_image_to_token}.
  {q_proj,k_proj,v_proj,proj}` -> transformers' SAM two-way transformer `image_decoder.transformer.layers.N.*.
  {q_proj,k_proj,v_proj,out_proj}`; `norm1-4` -> `layer_norm1-4`; `mlp.fc1/fc2` -> `mlp.lin1/lin2`;
  `transformer.final_attn_token_to_image` -> same; `transformer.norm` -> `transformer.layer_norm_final_attn`;
* `image_decoder.{sem_tokens,iou_token,mask_tokens}` -> `image_decoder.{semantic_tokens,iou_token,mask_tokens}`;
  `image_decoder.output_conv.{0,1,3}` -> `image_decoder.{upscale_conv1,upscale_layer_norm,upscale_conv2}`;
* `Predictor.layers.{0..d-1}` (`image_decoder.mask_pred.N`, `iou_pred`, `sem_pred`) -> transformers'
  `SamFeedForward.{proj_in, layers.0..d-3, proj_out}` of `image_decoder.mask_hypernetworks.N`,
  `image_decoder.iou_head`, `concept_head.projection`;
* `text_decoder.encoder` -> `text_decoder.prefix_projection`; `text_decoder.transformer.{tok_embeddings,blocks.N.*,
  norm,text_proj}` -> `text_decoder.{embed_tokens,layers.N.*,norm,lm_head}`.

Dropped: `pixel_mean` / `pixel_rsig` (BGR normalization constants). They become the image processor's RGB
`image_mean` / `image_std`, so a checkpoint with other constants still converts exactly.

Derived when absent (they hold no learned value): `*.num_batches_tracked` (0) and `*.attn.rel_pos_embed.index`
(recomputed from the window size). Every other key must be present and every key must map, or the conversion stops
with the list of offending keys before anything is written.

Modules TAP-v2 (this library) adds or changes, and what the converter does about them:

* concept bank `concept_head.concept_embeddings`: v1.1 keeps it outside the model (`ConceptProjector`, no
  parameters). With `concepts=` it becomes the buffer (rows = the pickle's columns, L2-normalized) and
  `concept_logit_scale` = the columns' common norm, which reproduces the release's logits exactly; without it the
  buffer stays at its init (a seeded random bank) and a warning says concept logits are meaningless;
* config values the weights cannot show are set to the release's: LayerNorm eps 1e-5 (PyTorch's default, which the
  release uses; the v2 default here is 1e-6), text dropout 0.1 (v2: 0.4), 40 caption tokens, `embed_dim / 32`
  decoder heads and `text_hidden / 64` text heads;
* the caption tokenizer (SentencePiece `text_tokenizer.model`, shipped with the *code* of the release, not the
  weights) is not converted here: pass `tokenizer=` (an HF tokenizer folder or object) to save a full `TapProcessor`;
  otherwise only the image processor is saved and a warning says so.

Numerical deviations that remain (warned at conversion): transformers' SAM `upscale_layer_norm` uses eps 1e-6 where
the release's uses 1e-5, and our image processor pads with exactly 0 after normalization where the release pads a
uint8 canvas with the truncated mean. A tiny random checkpoint converted here was checked once against the original
modules (CPU, flash-attn calls replaced by SDPA with a KV cache and an interleaved rotary of flash-attn's documented
semantics): image embeddings, IoU, semantic tokens and text logits agree to ~5e-6, masks to ~3e-5, greedy captions
exactly. Only 16-pixel patches are accepted: for other sizes the release's neck adds pooling / upsampling.

Output: `save_pretrained` folder (config, safetensors weights incl. the concept bank, processor or image processor,
model card), written into a temporary sibling folder and renamed into place only once complete.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hf_regionmm.hub.conversion import (
    check_destination,
    format_keys,
    instantiate_converted,
    resolve_dtype,
    write_converted_checkpoint,
)
from hf_regionmm.modeling.configuration_tap import TapConfig
from hf_regionmm.modeling.modeling_tap import TapModel, default_concept_bank, relative_position_index
from hf_regionmm.processing.image_processing_tap import TapImageProcessor
from hf_regionmm.processing.processing_tap import TapProcessor

__all__ = [
    "TapConversionWarning",
    "UnsafePickleError",
    "convert_tap_checkpoint",
    "convert_tap_state_dict",
    "infer_tap_model_type",
    "load_tap_concepts",
    "load_tap_weights",
    "restricted_load_pickle",
    "tap_config_from_weights",
]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle that is not a plain container of numpy arrays (refused before any of it could run)."""


class TapConversionWarning(UserWarning):
    """Something the converted model does differently from the v1.1 release, or leaves at its initialization."""


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling


def _numpy_attribute(module: str, name: str) -> Any:
    # numpy 2 moved `numpy.core` to `numpy._core` (the old name is a deprecated alias); pickles written by either
    # version name their own spelling, so both resolve to the current object.
    current = module.replace("numpy.core.", "numpy._core.", 1) if module.startswith("numpy.core.") else module
    parts = current.split(".")
    target: Any = np
    for part in parts[1:]:
        target = getattr(target, part)
    return getattr(target, name)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol <= 2 pickles store bytes (numpy's raw array data) as `_codecs.encode(text, "latin1")`; other codecs
    # (zlib, bz2, ...) are refused, so the call can only undo that one transformation.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(
            f"The pickle calls `_codecs.encode` with encoding {encoding!r}; a plain weights pickle only uses 'latin1'. "
            "The file is not a plain weights pickle and was not loaded."
        )
    return text.encode("latin1")


_NUMPY_GLOBALS = (
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    # Protocol 5 pickles rebuild arrays from an in-band buffer with `_frombuffer` instead of `_reconstruct`.
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
)
_OTHER_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}


class _WeightsUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array / dtype / scalar constructors and `OrderedDict`."""

    def __init__(self, file: BinaryIO, source_name: str) -> None:
        super().__init__(file)
        self.source_name = source_name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_attribute(module, name)
        if (module, name) in _OTHER_GLOBALS:
            return _OTHER_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"Refusing to load {self.source_name}: the pickle references the global `{module}.{name}`, which a plain "
            "weights pickle (a dict of numpy arrays) never needs. The file is not a plain weights pickle; nothing in "
            "it was executed. Only load such files from a source you trust, with the original code."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f"Refusing to load {self.source_name}: it uses pickle persistent ids (as torch.save does), so it is not a "
            "plain weights pickle of numpy arrays."
        )


def _check_leaves(value: Any, path: str, source_name: str) -> None:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufcUS":
            raise UnsafePickleError(
                f"Refusing {source_name}: `{path}` is a numpy array of dtype {value.dtype}; weights pickles hold "
                "numeric (or string) arrays only."
            )
        return
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biufcUS":
            raise UnsafePickleError(f"Refusing {source_name}: `{path}` is a numpy scalar of dtype {value.dtype}.")
        return
    if isinstance(value, (str, int, float)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise UnsafePickleError(
                    f"Refusing {source_name}: `{path}` has a key of type {type(key).__name__}; expected str keys."
                )
            _check_leaves(item, f"{path}[{key!r}]", source_name)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_leaves(item, f"{path}[{index}]", source_name)
        return
    raise UnsafePickleError(
        f"Refusing {source_name}: `{path}` is a {type(value).__name__}; a weights pickle may hold only numpy arrays, "
        "str, int, float, list, tuple and dict."
    )


def restricted_load_pickle(path_or_file: str | os.PathLike | BinaryIO) -> Any:
    """Unpickle a file that must be plain data: numpy arrays inside dicts / lists / tuples of str, int and float.

    Only numpy's array, dtype and scalar constructors (`numpy.core.multiarray._reconstruct`, `scalar`,
    `numpy.core.numeric._frombuffer`, `numpy.ndarray`, `numpy.dtype`, in their `numpy.core` and `numpy._core`
    spellings), `collections.OrderedDict` and latin-1 `_codecs.encode` (protocol-2 bytes) can be resolved; any other
    global (`os.system`, `builtins.eval`, `torch._utils._rebuild_tensor_v2`, ...) stops loading *before* it is called.
    Object-dtype arrays and other leaf types are refused after loading.

    Args:
        path_or_file: a path, or a binary file object opened for reading.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError (a `pickle.UnpicklingError` and a `ValueError`): the pickle names a refused global, uses
            persistent ids, or holds a refused leaf; the message names it.
        ValueError: the file is truncated or not a pickle.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        path = Path(path_or_file)
        if not path.is_file():
            raise ValueError(f"`path_or_file` {path} is not a file.")
        with path.open("rb") as handle:
            return _restricted_load_from(handle, path.name)
    if not hasattr(path_or_file, "read") or not hasattr(path_or_file, "readline"):
        raise TypeError(f"`path_or_file` must be a path or a binary file object; got {type(path_or_file).__name__}.")
    return _restricted_load_from(path_or_file, getattr(path_or_file, "name", "the pickle"))


def _restricted_load_from(handle: BinaryIO, source_name: str) -> Any:
    try:
        loaded = _WeightsUnpickler(handle, str(source_name)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(
            f"{source_name} is not a readable pickle ({type(error).__name__}: {error}); the file may be truncated."
        ) from None
    _check_leaves(loaded, "root", str(source_name))
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# Reading the release files


def load_tap_weights(path_or_file: str | os.PathLike | BinaryIO) -> dict[str, torch.Tensor]:
    """Read a v1.x `tap_vit_*.pkl` as `{original key: tensor}` (CPU, sharing memory with the unpickled arrays).

    Raises `UnsafePickleError` for anything but plain arrays and `ValueError` if it is not a flat
    `{str: numeric array}` dict.
    """
    loaded = restricted_load_pickle(path_or_file)
    name = getattr(path_or_file, "name", str(path_or_file))
    if not isinstance(loaded, Mapping) or not loaded:
        raise ValueError(
            f"{name} must hold a non-empty dict of parameter name -> numpy array (a tap_vit_*.pkl); got "
            f"{type(loaded).__name__}."
        )
    weights = {}
    for key, value in loaded.items():
        if (
            not isinstance(key, str)
            or not isinstance(value, (np.ndarray, np.generic))
            or value.dtype.kind not in "biuf"
        ):
            raise ValueError(
                f"{name} must map parameter names to numeric numpy arrays; entry {key!r} is "
                f"{type(value).__name__}{' of dtype ' + str(value.dtype) if hasattr(value, 'dtype') else ''}."
            )
        array = np.asarray(value)
        # Arrays rebuilt from immutable pickle bytes are read-only; torch needs writable memory.
        weights[key] = torch.from_numpy(array if array.flags.writeable else array.copy())
    return weights


def load_tap_concepts(path_or_file: str | os.PathLike | BinaryIO) -> tuple[torch.Tensor, list[str], float]:
    """Read a release concept bank `concepts/*.pkl` (`[weights (D, K), names]`, columns = unit text embeddings x
    `logit_scale.exp()`).

    Returns:
        embeddings `(K, D)` float32 (rows L2-normalized), the K names, and the logit scale (the columns' norm).

    Raises:
        ValueError: wrong layout, names that do not match the columns, or columns of different norms (the bank then
            cannot be written as `cos * scale`).
    """
    loaded = restricted_load_pickle(path_or_file)
    name = getattr(path_or_file, "name", str(path_or_file))
    if not isinstance(loaded, (list, tuple)) or len(loaded) != 2:
        raise ValueError(f"{name} must hold [weights (embed_dim, num_concepts), concept names], as concepts/*.pkl do.")
    weights, names = loaded
    if not isinstance(weights, np.ndarray) or weights.ndim != 2 or weights.dtype.kind != "f":
        raise ValueError(f"{name}: the first item must be a float (embed_dim, num_concepts) array.")
    if isinstance(names, np.ndarray):
        names = names.tolist()
    if not isinstance(names, (list, tuple)) or not all(isinstance(item, str) for item in names):
        raise ValueError(f"{name}: the second item must be a list of concept names (str).")
    if len(names) != weights.shape[1]:
        raise ValueError(
            f"{name} has {weights.shape[1]} concept columns but {len(names)} names; they must match one to one."
        )
    columns = torch.from_numpy(np.ascontiguousarray(weights.T, dtype=np.float32))
    norms = columns.norm(dim=-1)
    scale = float(norms.median())
    if not scale > 0 or float(((norms - scale).abs() / scale).max()) > 1e-3:
        raise ValueError(
            f"{name}: concept columns have norms from {float(norms.min()):.4g} to {float(norms.max()):.4g}; the "
            "release's columns are unit text embeddings times one logit scale. A bank of unequal norms cannot be "
            "expressed as cosine similarity x `concept_logit_scale`."
        )
    return columns / norms[:, None], list(names), scale


# ----------------------------------------------------------------------------------------------------------------
# Config from shapes


_VIT_NAMES = {"b": "tap-vit-b", "l": "tap-vit-l", "h": "tap-vit-h"}
_ENCODER = "image_encoder."
_DECODER = "image_decoder."
_TEXT = "text_decoder."
_DROPPED_KEYS = ("pixel_mean", "pixel_rsig")
_RELEASED_PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
_RELEASED_PIXEL_STD_BGR = (57.375, 57.12, 58.395)


def _count(weights: Mapping[str, Any], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(match.group(1)) for key in weights if (match := regex.match(key))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"`source` numbers the modules matching {pattern!r} as {sorted(indices)}; expected 0..n-1.")
    return len(indices)


def _shape(weights: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in weights:
        raise ValueError(
            f"`source` lacks {key!r}, which the converter needs to read the model size; is this a "
            "tokenize-anything tap_vit_*.pkl?"
        )
    return tuple(weights[key].shape)


def _normalize_model_type(model_type: str) -> str:
    match = re.fullmatch(r"(?:tap[-_])?(?:vit[-_])?([blh])(?:[-_]v1[-_]?[01])?", model_type.strip().lower())
    if match is None:
        raise ValueError(
            f"`model_type` must be one of 'vit-b', 'vit-l', 'vit-h' (or 'tap_vit_l'); got {model_type!r}."
        )
    return match.group(1)


def infer_tap_model_type(weights: Mapping[str, torch.Tensor]) -> str | None:
    """'vit-b', 'vit-l' or 'vit-h' when the image encoder's width, depth and heads are a released size, else None."""
    width = _shape(weights, f"{_ENCODER}patch_embed.proj.weight")[0]
    depth = _count(weights, rf"{re.escape(_ENCODER)}blocks\.(\d+)\.")
    heads = _shape(weights, f"{_ENCODER}blocks.0.attn.rel_pos_embed.weight")[0]
    for size, preset in _VIT_NAMES.items():
        config = TapConfig.from_preset(preset)
        if (config.vision_hidden_size, config.vision_num_hidden_layers, config.vision_num_attention_heads) == (
            width,
            depth,
            heads,
        ):
            return f"vit-{size}"
    return None


def tap_config_from_weights(
    weights: Mapping[str, torch.Tensor],
    *,
    model_type: str | None = None,
    text_max_length: int = 40,
    decoder_num_attention_heads: int | None = None,
    text_num_attention_heads: int | None = None,
    **overrides: Any,
) -> TapConfig:
    """Build the `TapConfig` that matches a v1.x state dict's shapes.

    Sizes come from the weights; what they cannot show takes the release's value (LayerNorm eps 1e-5, text dropout
    0.1, `embed_dim // 32` decoder heads, `text_hidden // 64` text heads, `text_max_length` 40).

    Args:
        weights: original key -> tensor.
        model_type: 'vit-b' / 'vit-l' / 'vit-h' to assert the size (ValueError if the weights are another size).
        text_max_length, decoder_num_attention_heads, text_num_attention_heads: override the release values.
        overrides: further `TapConfig` fields (e.g. `num_concepts`, `concept_names`, token ids).
    """
    inferred = infer_tap_model_type(weights)
    if model_type is not None:
        wanted = f"vit-{_normalize_model_type(model_type)}"
        if inferred != wanted:
            raise ValueError(
                f"`model_type` is {wanted!r} but the weights have the shapes of {inferred or 'no released size'}; "
                "pass the matching model_type (or none, to infer it)."
            )
    patch = _shape(weights, f"{_ENCODER}patch_embed.proj.weight")
    width, patch_size = patch[0], patch[-1]
    if patch_size != 16:
        raise ValueError(
            f"`source` has {patch_size}-pixel patches; the release's `SimpleFeaturePyramid` neck is a plain 1x1 + 3x3 "
            "conv only for 16-pixel patches (other sizes add pooling / upsampling this layout does not model)."
        )
    num_patches = _shape(weights, f"{_ENCODER}pos_embed.weight")[0]
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"`source` pos_embed has {num_patches} rows, not a square grid of patches.")
    heads, table = _shape(weights, f"{_ENCODER}blocks.0.attn.rel_pos_embed.weight")
    window = (round(table**0.5) + 1) // 2
    if (2 * window - 1) ** 2 != table:
        raise ValueError(f"`source` rel_pos_embed tables have {table} entries, not (2 * window - 1)^2.")
    embed_dim = _shape(weights, "prompt_encoder.point_embed.weight")[1]
    cross_qkv = _shape(weights, f"{_DECODER}transformer.blocks.0.cross_attn_token_to_image.q_proj.weight")[0]
    iou_depth = _count(weights, rf"{re.escape(_DECODER)}iou_pred\.layers\.(\d+)\.")
    concept_depth = _count(weights, rf"{re.escape(_DECODER)}sem_pred\.layers\.(\d+)\.")
    if concept_depth != 3:
        raise ValueError(f"`source` sem_pred has {concept_depth} layers; TAP's concept MLP has 3.")
    text_width = _shape(weights, f"{_TEXT}transformer.tok_embeddings.weight")[1]
    fields: dict[str, Any] = {
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "vision_hidden_size": width,
        "vision_num_hidden_layers": _count(weights, rf"{re.escape(_ENCODER)}blocks\.(\d+)\."),
        "vision_num_attention_heads": heads,
        "vision_mlp_ratio": _ratio(_shape(weights, f"{_ENCODER}blocks.0.mlp.fc1.weight")[0], width),
        "vision_window_size": window,
        "vision_num_cross_blocks": _count(weights, rf"{re.escape(_ENCODER)}cross_conv\.(\d+)\."),
        # The release builds its LayerNorms with PyTorch's default eps.
        "vision_layer_norm_eps": 1e-5,
        "embed_dim": embed_dim,
        "decoder_num_hidden_layers": _count(weights, rf"{re.escape(_DECODER)}transformer\.blocks\.(\d+)\."),
        "decoder_num_attention_heads": decoder_num_attention_heads or max(embed_dim // 32, 1),
        "decoder_mlp_dim": _shape(weights, f"{_DECODER}transformer.blocks.0.mlp.fc1.weight")[0],
        "decoder_attention_downsample_rate": max(embed_dim // cross_qkv, 1),
        "num_mask_outputs": _shape(weights, f"{_DECODER}mask_tokens.weight")[0],
        "iou_head_hidden_dim": _shape(weights, f"{_DECODER}iou_pred.layers.0.weight")[0],
        "iou_head_depth": iou_depth,
        "concept_hidden_size": _shape(weights, f"{_DECODER}sem_pred.layers.0.weight")[0],
        "concept_embed_dim": _shape(weights, f"{_DECODER}sem_pred.layers.{concept_depth - 1}.weight")[0],
        "text_hidden_size": text_width,
        "text_num_hidden_layers": _count(weights, rf"{re.escape(_TEXT)}transformer\.blocks\.(\d+)\."),
        "text_num_attention_heads": text_num_attention_heads or max(text_width // 64, 1),
        "text_mlp_ratio": _ratio(_shape(weights, f"{_TEXT}transformer.blocks.0.mlp.fc1.weight")[0], text_width),
        "text_vocab_size": _shape(weights, f"{_TEXT}transformer.tok_embeddings.weight")[0],
        "text_max_length": text_max_length,
        "text_dropout": 0.1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    fields.update(overrides)
    try:
        return TapConfig(**fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"The shapes in `source` do not describe a valid TAP model: {error}") from None


def _ratio(inner: int, width: int) -> int | float:
    ratio = inner / width
    return int(ratio) if ratio.is_integer() else ratio


# ----------------------------------------------------------------------------------------------------------------
# Key mapping

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_ATTENTION_PROJECTIONS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "proj": "out_proj"}
_DECODER_NORMS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "norm3": "layer_norm3", "norm4": "layer_norm4"}
_RULES: tuple[tuple[str, str], ...] = (
    (r"image_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_encoder.patch_embed.\1"),
    (r"image_encoder\.pos_embed\.weight", "vision_encoder.position_embeddings"),
    (
        r"image_encoder\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
        r"vision_encoder.layers.\1.\2.\3",
    ),
    (
        r"image_encoder\.blocks\.(\d+)\.attn\.rel_pos_embed\.(weight|index)",
        r"vision_encoder.layers.\1.attn.rel_pos_embed.\2",
    ),
    (r"image_encoder\.norm\.(weight|bias)", r"vision_encoder.norm.\1"),
    (r"image_encoder\.cross_conv\.(\d+)\.(conv[123])\.weight", r"vision_encoder.cross_blocks.\1.\2.weight"),
    (rf"image_encoder\.cross_conv\.(\d+)\.(norm[123])\.{_BN}", r"vision_encoder.cross_blocks.\1.\2.\3"),
    (r"image_encoder\.neck\.lateral_conv\.0\.0\.weight", "vision_encoder.neck.conv1.weight"),
    (rf"image_encoder\.neck\.lateral_conv\.0\.1\.{_BN}", r"vision_encoder.neck.norm1.\1"),
    (r"image_encoder\.neck\.output_conv\.0\.0\.weight", "vision_encoder.neck.conv2.weight"),
    (rf"image_encoder\.neck\.output_conv\.0\.1\.{_BN}", r"vision_encoder.neck.norm2.\1"),
    (r"prompt_encoder\.(point_embed\.weight|coord_matrix)", r"prompt_encoder.\1"),
    (
        r"image_decoder\.transformer\.blocks\.(\d+)\.(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
        r"\.(q_proj|k_proj|v_proj|proj)\.(weight|bias)",
        "attention",
    ),
    (r"image_decoder\.transformer\.blocks\.(\d+)\.(norm[1234])\.(weight|bias)", "decoder_norm"),
    (
        r"image_decoder\.transformer\.blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)",
        r"image_decoder.transformer.layers.\1.mlp.lin\2.\3",
    ),
    (r"image_decoder\.transformer\.final_attn_token_to_image\.(q_proj|k_proj|v_proj|proj)\.(weight|bias)", "final"),
    (r"image_decoder\.transformer\.norm\.(weight|bias)", r"image_decoder.transformer.layer_norm_final_attn.\1"),
    (r"image_decoder\.sem_tokens\.weight", "image_decoder.semantic_tokens.weight"),
    (r"image_decoder\.(iou_token|mask_tokens)\.weight", r"image_decoder.\1.weight"),
    (r"image_decoder\.output_conv\.0\.(weight|bias)", r"image_decoder.upscale_conv1.\1"),
    (r"image_decoder\.output_conv\.1\.(weight|bias)", r"image_decoder.upscale_layer_norm.\1"),
    (r"image_decoder\.output_conv\.3\.(weight|bias)", r"image_decoder.upscale_conv2.\1"),
    (r"image_decoder\.mask_pred\.(\d+)\.layers\.(\d+)\.(weight|bias)", "predictor"),
    (r"image_decoder\.iou_pred\.layers\.(\d+)\.(weight|bias)", "predictor"),
    (r"image_decoder\.sem_pred\.layers\.(\d+)\.(weight|bias)", "predictor"),
    (r"text_decoder\.encoder\.weight", "text_decoder.prefix_projection.weight"),
    (r"text_decoder\.transformer\.tok_embeddings\.weight", "text_decoder.embed_tokens.weight"),
    (
        r"text_decoder\.transformer\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|norm1|norm2)\.(weight|bias)",
        r"text_decoder.layers.\1.\2.\3",
    ),
    (r"text_decoder\.transformer\.norm\.(weight|bias)", r"text_decoder.norm.\1"),
    (r"text_decoder\.transformer\.text_proj\.weight", "text_decoder.lm_head.weight"),
)
_COMPILED_RULES = tuple((re.compile(pattern), target) for pattern, target in _RULES)
_PREDICTORS = (
    (
        re.compile(r"image_decoder\.mask_pred\.(\d+)\.layers\.(\d+)\.(weight|bias)"),
        "image_decoder.mask_hypernetworks.{}",
    ),
    (re.compile(r"image_decoder\.iou_pred\.layers\.(\d+)\.(weight|bias)"), "image_decoder.iou_head"),
    (re.compile(r"image_decoder\.sem_pred\.layers\.(\d+)\.(weight|bias)"), "concept_head.projection"),
)


def _predictor_layer(layer: int, depth: int) -> str:
    """The release's `Predictor.layers.i` as transformers' `SamFeedForward` (`proj_in`, `layers.*`, `proj_out`)."""
    if layer == 0:
        return "proj_in"
    if layer == depth - 1:
        return "proj_out"
    return f"layers.{layer - 1}"


def _rename(key: str, config: TapConfig) -> str | None:
    """This library's name for an original key, or None when the key is not part of the v1.x layout."""
    for regex, target in _COMPILED_RULES:
        match = regex.fullmatch(key)
        if match is None:
            continue
        if target == "attention":
            block, module, projection, kind = match.groups()
            return f"image_decoder.transformer.layers.{block}.{module}.{_ATTENTION_PROJECTIONS[projection]}.{kind}"
        if target == "decoder_norm":
            block, norm, kind = match.groups()
            return f"image_decoder.transformer.layers.{block}.{_DECODER_NORMS[norm]}.{kind}"
        if target == "final":
            projection, kind = match.groups()
            return f"image_decoder.transformer.final_attn_token_to_image.{_ATTENTION_PROJECTIONS[projection]}.{kind}"
        if target == "predictor":
            return _rename_predictor(key, config)
        return match.expand(target)
    return None


def _rename_predictor(key: str, config: TapConfig) -> str | None:
    for regex, prefix in _PREDICTORS:
        match = regex.fullmatch(key)
        if match is None:
            continue
        if prefix.endswith("{}"):
            head, layer, kind = match.groups()
            prefix, depth = prefix.format(head), 3
        else:
            layer, kind = match.groups()
            depth = config.iou_head_depth if "iou_head" in prefix else 3
        if int(layer) >= depth:
            return None
        return f"{prefix}.{_predictor_layer(int(layer), depth)}.{kind}"
    return None


def _is_derivable(model_key: str) -> bool:
    return model_key.endswith(".num_batches_tracked") or model_key.endswith(".attn.rel_pos_embed.index")


def _derived_value(model_key: str, shape: torch.Size, config: TapConfig) -> torch.Tensor:
    if model_key.endswith(".num_batches_tracked"):
        return torch.zeros((), dtype=torch.long)
    return relative_position_index(config.vision_window_size)


def _expected_state(config: TapConfig) -> dict[str, tuple[torch.Size, torch.dtype]]:
    # The meta device allocates nothing, so even ViT-H costs only its Python objects.
    with torch.device("meta"):
        model = TapModel(config)
    return {name: (tensor.shape, tensor.dtype) for name, tensor in model.state_dict().items()}


def convert_tap_state_dict(
    weights: Mapping[str, torch.Tensor],
    config: TapConfig,
    concept_embeddings: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Rename a v1.x state dict to `TapModel` keys and adapt the values (see the module docstring).

    Args:
        weights: original key -> tensor (as `load_tap_weights` returns it). Not modified.
        config: the target config (`tap_config_from_weights`), which decides the expected keys and shapes.
        concept_embeddings: `(num_concepts, concept_embed_dim)` bank from `load_tap_concepts`, or None for the
            seeded placeholder bank.

    Returns:
        Exactly `TapModel(config).state_dict()`'s keys, with matching shapes.

    Raises:
        ValueError: listing original keys that do not map, weights the checkpoint lacks, or shape mismatches.
    """
    expected = _expected_state(config)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in weights.items():
        if key in _DROPPED_KEYS:
            continue
        renamed = _rename(key, config)
        if renamed is None or renamed not in expected:
            unknown.append(key)
            continue
        if renamed == "vision_encoder.patch_embed.weight":
            if tensor.ndim != 4 or tensor.shape[1] != 3:
                raise ValueError(
                    f"`source` {key} must have shape (width, 3, patch, patch); got {tuple(tensor.shape)}."
                )
            # BGR -> RGB: the release normalizes cv2 (BGR) images, our processor yields RGB.
            tensor = tensor.flip(1).contiguous()
        converted[renamed] = tensor
        sources[renamed] = key
    if unknown:
        raise ValueError(
            f"`source` has {len(unknown)} weights that are not part of the TAP v1.x layout (no mapping for them): "
            f"{format_keys(sorted(unknown))}. Nothing was written; a checkpoint with other modules cannot be "
            "converted faithfully."
        )
    bank_key = "concept_head.concept_embeddings"
    if concept_embeddings is None:
        concept_embeddings = default_concept_bank(config.num_concepts, config.concept_embed_dim)
    converted[bank_key] = concept_embeddings.to(torch.float32)
    sources[bank_key] = "concepts"
    for key, (shape, _) in expected.items():
        if key not in converted and _is_derivable(key):
            converted[key] = _derived_value(key, shape, config)
            sources[key] = "(derived)"
    missing = sorted(key for key in expected if key not in converted)
    if missing:
        raise ValueError(
            f"`source` lacks {len(missing)} weights the converted model needs (model names): {format_keys(missing)}. "
            "Nothing was written; the pickle is incomplete or not a tokenize-anything checkpoint."
        )
    mismatched = [
        f"{sources[key]} {tuple(converted[key].shape)} -> {key} {tuple(shape)}"
        for key, (shape, _) in expected.items()
        if converted[key].shape != shape
    ]
    if mismatched:
        raise ValueError(
            f"`source` has {len(mismatched)} weights whose shapes do not match the inferred config: "
            f"{format_keys(mismatched)}. Nothing was written."
        )
    return {
        key: converted[key].to(dtype) if not converted[key].is_floating_point() else converted[key]
        for key, (_, dtype) in expected.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# Conversion


def _image_processor(weights: Mapping[str, torch.Tensor], config: TapConfig) -> TapImageProcessor:
    mean_bgr = weights.get("pixel_mean")
    rsig_bgr = weights.get("pixel_rsig")
    mean = _RELEASED_PIXEL_MEAN_BGR if mean_bgr is None else tuple(float(v) for v in mean_bgr.float())
    std = _RELEASED_PIXEL_STD_BGR if rsig_bgr is None else tuple(1.0 / float(v) for v in rsig_bgr.float())
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ValueError(f"`source` pixel_mean / pixel_rsig must be 3 positive BGR values; got {mean} / {std}.")
    size, mask_size = config.image_size, config.mask_size
    # The release's constants are BGR in 0..255; the processor normalizes RGB after rescaling to 0..1.
    return TapImageProcessor(
        size={"longest_edge": size},
        pad_size={"height": size, "width": size},
        mask_size={"longest_edge": mask_size},
        mask_pad_size={"height": mask_size, "width": mask_size},
        image_mean=[value / 255.0 for value in mean[::-1]],
        image_std=[value / 255.0 for value in std[::-1]],
    )


def _load_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)) or not Path(tokenizer).is_dir():
        raise ValueError(
            f"`tokenizer` must be a tokenizer object or a folder AutoTokenizer can load; got {tokenizer!r}. Convert the "
            "release's SentencePiece `text_tokenizer.model` once with `LlamaTokenizer(vocab_file=...)"
            ".save_pretrained(folder)` (needs sentencepiece)."
        )
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except Exception as error:  # noqa: BLE001  (any loader failure becomes one clear conversion error)
        raise ValueError(
            f"`tokenizer` folder {tokenizer} could not be loaded ({type(error).__name__}: {error}); nothing was written."
        ) from None


def _token_ids(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> dict[str, int]:
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"`tokenizer` has {len(tokenizer)} tokens but the text decoder has {vocab_size} rows; it is not the "
            "caption tokenizer of this checkpoint."
        )
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("`tokenizer` needs BOS and EOS tokens (the release's SentencePiece model has ids 1 and 2).")
    if tokenizer.pad_token_id is None:
        # The SentencePiece model has no pad piece (the release pads with an id past the vocabulary); padding only
        # fills positions after EOS, so the unknown token serves.
        if tokenizer.unk_token is None:
            raise ValueError("`tokenizer` has neither a pad nor an unk token; set `tokenizer.pad_token` first.")
        tokenizer.pad_token = tokenizer.unk_token
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _resolve_source(source: Path, model_type: str | None) -> tuple[Path, Path | None]:
    """The weights pickle and, for a downloaded release folder, its default concept bank."""
    if source.is_file():
        return source, None
    if not source.is_dir():
        raise ValueError(
            f"`source` {source} does not exist; pass a tap_vit_*.pkl or the BAAI/tokenize-anything folder."
        )
    candidates = sorted((source / "models").glob("tap_vit_*.pkl")) or sorted(source.glob("tap_vit_*.pkl"))
    if model_type is not None:
        size = _normalize_model_type(model_type)
        candidates = [path for path in candidates if path.name.startswith(f"tap_vit_{size}_")]
    newest = [path for path in candidates if path.name.endswith("_v1_1.pkl")] or candidates
    if len(newest) != 1:
        found = [path.name for path in candidates] or "none"
        raise ValueError(
            f"`source` folder {source} must hold exactly one tap_vit_*.pkl to convert (found {found}); pass the file "
            "itself or `model_type=`."
        )
    bank = source / "concepts" / "merged_2560.pkl"
    return newest[0], bank if bank.is_file() else None


def _warn(message: str) -> None:
    warnings.warn(message, TapConversionWarning, stacklevel=3)


def convert_tap_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    concepts: str | os.PathLike | None = None,
    model_type: str | None = None,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype | str | None = None,
    text_max_length: int = 40,
    decoder_num_attention_heads: int | None = None,
    text_num_attention_heads: int | None = None,
) -> Path:
    """Convert a released TAP v1.x checkpoint into a `TapModel` folder (`hf-regionmm convert tap SRC DST`).

    Args:
        source: a `tap_vit_{b,l,h}_v1_1.pkl` (v1.0 works too), or a downloaded `BAAI/tokenize-anything` folder
            (`models/tap_vit_*.pkl`, and `concepts/merged_2560.pkl` is used when `concepts` is None).
        destination: folder to create (must not exist, or be empty): `config.json`, `model.safetensors` (concept
            bank included), the processor (or only the image processor without `tokenizer`) and a model card.
        concepts: a `concepts/*.pkl` concept bank (`merged_2560`, `lvis_1203`, `coco_80`), read with the restricted
            unpickler; its names go to `config.concept_names`, its norm to `concept_logit_scale`.
        model_type: 'vit-b', 'vit-l' or 'vit-h' to check the size (inferred from the shapes otherwise; other sizes
            convert as a custom config); also picks the file from a release folder.
        tokenizer: the caption tokenizer (an HF tokenizer folder or object) to save a full `TapProcessor`.
        dtype: weights dtype; default the checkpoint's own floating dtype (float16 in the release) if uniform.
        text_max_length, decoder_num_attention_heads, text_num_attention_heads: release values the weights cannot
            show (40, embed_dim / 32, text width / 64).

    Returns:
        `destination` as a `Path`.

    Raises:
        UnsafePickleError: a pickle names anything but numpy array constructors (it is never executed).
        ValueError: unknown or missing keys, shape mismatches, a bad concept bank or tokenizer, an existing
            destination. Nothing is written then.
    """
    source = Path(source)
    destination = Path(destination)
    weights_path, default_bank = _resolve_source(source, model_type)
    check_destination(destination, source)
    concepts_path = Path(concepts) if concepts is not None else default_bank

    weights = load_tap_weights(weights_path)
    overrides: dict[str, Any] = {}
    bank = None
    if concepts_path is not None:
        bank, names, logit_scale = load_tap_concepts(concepts_path)
        overrides.update(concept_names=names, num_concepts=len(names), concept_logit_scale=logit_scale)
    loaded_tokenizer = _load_tokenizer(tokenizer) if tokenizer is not None else None
    if loaded_tokenizer is not None:
        vocab_rows = _shape(weights, f"{_TEXT}transformer.tok_embeddings.weight")[0]
        overrides.update(_token_ids(loaded_tokenizer, vocab_rows))
    config = tap_config_from_weights(
        weights,
        model_type=model_type,
        text_max_length=text_max_length,
        decoder_num_attention_heads=decoder_num_attention_heads,
        text_num_attention_heads=text_num_attention_heads,
        **overrides,
    )
    if bank is not None and bank.shape[1] != config.concept_embed_dim:
        raise ValueError(
            f"`concepts` {concepts_path.name} has {bank.shape[1]}-d embeddings but the checkpoint's concept MLP "
            f"outputs {config.concept_embed_dim}-d; the bank belongs to another model."
        )
    target_dtype = resolve_dtype(dtype, (t for key, t in weights.items() if key not in _DROPPED_KEYS))
    image_processor = _image_processor(weights, config)
    size = infer_tap_model_type(weights) or "custom size"
    derived = [key for key in weights if key.endswith(".num_batches_tracked") or key.endswith(".rel_pos_embed.index")]
    state_dict = convert_tap_state_dict(weights, config, bank)
    del weights
    model = instantiate_converted(TapModel, config, state_dict, target_dtype)
    del state_dict

    _warn(
        "TAP v1.x -> hf_regionmm TapModel: the BGR normalization (pixel_mean / pixel_rsig) moved to the image "
        "processor as RGB mean/std and the patch embedding's input channels were reversed to read RGB; padded "
        "pixels normalize to exactly 0 (the release pads with the truncated uint8 mean); transformers' SAM "
        "upscale LayerNorm uses eps 1e-6 (release 1e-5); text dropout 0.1 and LayerNorm eps 1e-5 as released."
    )
    if not derived:
        _warn(
            "`source` holds no num_batches_tracked / rel_pos_embed.index buffers; they were derived (0 / recomputed)."
        )
    if bank is None:
        _warn(
            "No concept bank was given (`concepts=`, e.g. concepts/merged_2560.pkl): the converted model keeps a "
            "seeded random placeholder bank, so its concept_logits are meaningless until "
            "`model.set_concept_bank(...)`."
        )
    if loaded_tokenizer is None:
        _warn(
            "No caption tokenizer was given (`tokenizer=`): only the image processor is saved. Add the release's "
            "SentencePiece text_tokenizer.model (converted to an HF tokenizer) to build a TapProcessor for captions."
        )

    processor = (
        TapProcessor(image_processor, loaded_tokenizer, max_caption_length=config.text_max_length)
        if loaded_tokenizer is not None
        else image_processor  # no caption tokenizer: the image processor alone, as before
    )
    return write_converted_checkpoint(
        model,
        processor,
        destination,
        source,
        system="tap",
        training_summary=(
            f"Converted ({size}) from the original baaivision/tokenize-anything release ({weights_path.name}) "
            "with `hf-regionmm convert tap`; the mapping and the remaining numerical deviations are listed in "
            "hf_regionmm/hub/convert_tap.py."
        ),
    )
