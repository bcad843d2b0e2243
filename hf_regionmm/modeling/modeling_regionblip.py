"""RegionBLIP: BLIP-2 extended to image regions, point clouds and point-cloud regions (Zhou et al. 2023, section 3).

Data flow, in the order of this file, for one batch of ONE modality (the paper's semi-hybrid schedule):

1. Modal feature extraction (section 3.1): `vision_tower` = transformers' `Blip2VisionModel` on `pixel_values`
   (image modalities), or `point_encoder` = Point-BERT (`point_bert.py`) on `point_clouds` followed by
   `point_cloud_adapter` (Linear 384 -> ViT width) (point-cloud modalities). Both towers are frozen.
2. Modal feature alignment: the modality's learned queries `query_tokens[modality]` (32 x 768); for region
   modalities PaFE (`region_position_embeddings[modality]`, Linear 4|24 -> 128 -> GELU -> 768) of the box is added to
   every query before the Q-Former's embedding LayerNorm. `qformer` (transformers' `Blip2QFormerModel`, frozen
   BLIP-2 weights) serves the image modalities, `point_cloud_qformer` (a second Q-Former, as in every released
   config) the point-cloud ones. Each Q-Former carries one peft LoRA adapter per modality on query/value of self-
   and cross-attention; `set_modality` selects it.
3. Projection: `multi_modal_projector[modality]` (Linear 768 -> LLM width) turns the 32 query outputs into LLM
   tokens; for region modalities `box_heads[modality]` regresses the box from the mean query output (`L_reg`).
4. LLM comprehension: the projected queries replace the `image_token_index` placeholders of the prompt
   (`<image>` x 32 then the text, as HF BLIP-2); the LLM (OPT decoder, or T5 encoder-decoder with the queries and
   prefix in the encoder) carries one LoRA adapter per modality on q/v, selected together with the Q-Former's.

Training (section 3.2, eq. 2) adds BLIP-2's stage-1 losses on the Q-Former of the batch's modality, as released
(`_forward_modal_align`), when the batch carries Q-Former text (`qformer_input_ids`, e.g. from `RegionBlipCollator`):
ITC (the text's [CLS] feature from the Q-Former's text side, `text_projection` to 256; the queries through
`vision_projections[modality]`; similarity = max over the queries, learnable `temperature`), ITM (`itm_head` on the
query outputs of a joint query + text pass, hard negatives drawn in-batch from the ITC similarities; released for the
image modality only) and ITG (Q-Former captioning: `[DEC]` + caption attends to the queries and causally to itself,
`qformer_text.lm_logits`). `qformer_text` (word + position embeddings, LM head) serves `qformer`,
`point_cloud_qformer_text` serves `point_cloud_qformer`; both reuse the Q-Former layers and the active modality's
LoRA, as transformers' `Blip2QFormerModel` runs text after the queries (`query_length`).

With `modality="image"` and the image adapters untouched (LoRA B starts at zero and stays frozen with
`freeze_image_modality`), outputs equal the BLIP-2 checkpoint's: `RegionBlipForConditionalGeneration.from_blip2`
builds the model from a transformers `Blip2ForConditionalGeneration`.

Converting released (LAVIS) checkpoints -- trainable-only state dicts, see reference/original_repos.md 2b -- means
renaming `Qformer.bert.` -> `model.qformer.` (and `Qformer_pc.bert.` -> `model.point_cloud_qformer.`) with
`embeddings.LayerNorm` -> `layernorm`, `.attention.self.` -> `.attention.attention.`, `.crossattention.self.` ->
`.crossattention.attention.`, `.query.` / `.value.` -> `.query.base_layer.` / `.value.base_layer.`, `lora_A_<m>` / `lora_B_<m>` -> `lora_A.<m>.weight` / `lora_B.<m>.weight` (no transpose;
m: img -> image, img_region -> image_region, pc -> point_cloud, pc_region -> point_cloud_region),
`query_tokens_<m>` -> `model.query_tokens.<m>`, `opt_proj_<m>` / `t5_proj_<m>` -> `model.multi_modal_projector.<m>`,
`img_region_posembed.{0,2}` / `pc_region_posembed.{0,2}` -> `model.region_position_embeddings.<m>.layers.{0,2}`,
`reg_img_region` / `reg_pc_region` -> `model.box_heads.<m>`, `pc_adapter` -> `model.point_cloud_adapter`,
`opt_model.model.decoder.` -> `model.language_model.decoder.`; the Q-Former text side and ITC/ITM/ITG heads:
`Qformer.bert.embeddings.word_embeddings` / `.position_embeddings` -> `model.qformer_text.word_embeddings` /
`.position_embeddings` (`Qformer_pc.bert.` -> `model.point_cloud_qformer_text.`), `Qformer.bert.encoder.layer.N.
intermediate.` / `.output.` -> `model.qformer.encoder.layer.N.intermediate.` / `.output.` (the text feed-forward; the
query one keeps its `_query` names), `Qformer.cls.predictions.transform.dense` -> `model.qformer_text.lm_transform`,
`Qformer.cls.predictions.transform.LayerNorm` -> `model.qformer_text.lm_layer_norm`, `Qformer.cls.predictions.decoder`
(weight) and `Qformer.cls.predictions.bias` -> `model.qformer_text.lm_decoder` (weight, bias) (`Qformer_pc.cls.` ->
`model.point_cloud_qformer_text.`), `stage1_proj_text` (BLIP-2: `text_proj`) -> `model.text_projection`,
`stage1_proj_<m>` (BLIP-2: `vision_proj`, the image modality's) -> `model.vision_projections.<m>`, `img_itm_head`
(BLIP-2: `itm_head`) -> `model.itm_head`, `temp` -> `model.temperature`; the frozen parts come from the BLIP-2 and
Point-BERT checkpoints (`from_blip2`).

Boxes are normalized xyxy in [0, 1] of the image (`region_boxes`, after truncating pixel boxes to whole pixels, as
released) and 8 corners x xyz flattened corner by corner in the point cloud's frame (`region_boxes_3d`).
"""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    AutoModel,
    Blip2QFormerModel,
    Blip2VisionModel,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

from .box_position_embedding import BoxPositionEmbedding
from .configuration_regionblip import MODALITIES, POINT_CLOUD_MODALITIES, REGION_MODALITIES, RegionBlipConfig
from .model_card_hook import ModelCardHookMixin
from .placeholder_tokens import suppress_placeholder_tokens
from .point_bert import PointBertModel

__all__ = [
    "RegionBlipForConditionalGeneration",
    "RegionBlipModel",
    "RegionBlipModelOutput",
    "RegionBlipOutput",
    "RegionBlipPreTrainedModel",
    "RegionBlipQueryOutput",
    "QFormerText",
    "contrastive_loss",
    "infer_modality",
    "qformer_text_inputs",
    "sample_hard_negatives",
]

_BOX_WIDTHS = {"image_region": 4, "point_cloud_region": 24}
_QFORMER_LOSS_NAMES = ("loss_itc", "loss_itm", "loss_itg")
_QFORMER_TEXT_FFN = re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")
# BLIP-2 / LAVIS start the learnable ITC temperature at 0.07.
_INITIAL_TEMPERATURE = 0.07


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class RegionBlipQueryOutput(ModelOutput):
    """Output of `RegionBlipModel.get_query_features` for one modality.

    Args:
        query_embeddings: `(B, num_query_tokens, text hidden)` projected query outputs, the LLM tokens.
        query_output: `(B, num_query_tokens, qformer hidden)` last Q-Former layer on the queries.
        encoder_hidden_states: `(B, T, vision width)` what the Q-Former cross-attended to (ViT tokens, or the adapted
            1 + G Point-BERT tokens).
        box_predictions: `(B, 4)` normalized xyxy (image regions) or `(B, 24)` corners (point-cloud regions) from the
            box head; None for holistic modalities or without `use_box_regression`.
        query_inputs: `(B, num_query_tokens, qformer hidden)` the queries fed to the Q-Former (with PaFE for regions),
            which the ITM and ITG passes run again next to text.
    """

    query_embeddings: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    encoder_hidden_states: torch.FloatTensor | None = None
    box_predictions: torch.FloatTensor | None = None
    query_inputs: torch.FloatTensor | None = None


@dataclass
class RegionBlipModelOutput(ModelOutput):
    """Output of `RegionBlipModel.forward`.

    Args:
        last_hidden_state: `(B, L, text hidden)` last LLM layer (decoder side for T5).
        past_key_values: the LLM's KV cache.
        hidden_states, attentions: the LLM's, when requested.
        query_embeddings: `(B, num_query_tokens, text hidden)` (None on decode steps).
        box_predictions: see `RegionBlipQueryOutput`.
        query_features: the whole `RegionBlipQueryOutput` of the batch (None on decode steps), for the Q-Former losses.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    query_embeddings: torch.FloatTensor | None = None
    box_predictions: torch.FloatTensor | None = None
    query_features: RegionBlipQueryOutput | None = None


@dataclass
class RegionBlipOutput(ModelOutput):
    """Output of `RegionBlipForConditionalGeneration.forward`.

    Args:
        loss: scalar, eq. 2 with the config's weights: `loss_lm + lambda * loss_reg + loss_itc + loss_itm +
            loss_itg`, when `labels` or `qformer_input_ids` are given.
        logits: `(B, L, vocab)` (L shortened by `logits_to_keep`; decoder length for T5).
        loss_dict: detached unweighted terms, always the same keys: `loss_lm` (LLM), `loss_reg` (L1 box regression, 0
            for holistic modalities), `loss_itc`, `loss_itm`, `loss_itg` (0 without Q-Former text, when switched off,
            or for ITM outside `itm_modalities`).
        other fields: as in `RegionBlipModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    query_embeddings: torch.FloatTensor | None = None
    box_predictions: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def infer_modality(
    pixel_values: torch.Tensor | None = None,
    point_clouds: torch.Tensor | None = None,
    region_boxes: torch.Tensor | None = None,
    region_boxes_3d: torch.Tensor | None = None,
) -> str | None:
    """The modality a batch's inputs describe (None when it carries no modality input, e.g. a decode step).

    `pixel_values` -> `"image"`, + `region_boxes` -> `"image_region"`; `point_clouds` -> `"point_cloud"`,
    + `region_boxes_3d` -> `"point_cloud_region"`. One modality per batch (semi-hybrid training).
    """
    if pixel_values is not None and point_clouds is not None:
        raise ValueError(
            "Got both `pixel_values` and `point_clouds`; RegionBLIP takes one modality per batch (semi-hybrid "
            "training). Split the batch by modality."
        )
    if pixel_values is not None:
        if region_boxes_3d is not None:
            raise ValueError("`region_boxes_3d` goes with `point_clouds`, not `pixel_values`; use `region_boxes`.")
        return "image_region" if region_boxes is not None else "image"
    if point_clouds is not None:
        if region_boxes is not None:
            raise ValueError("`region_boxes` goes with `pixel_values`; point-cloud regions use `region_boxes_3d`.")
        return "point_cloud_region" if region_boxes_3d is not None else "point_cloud"
    if region_boxes is not None or region_boxes_3d is not None:
        raise ValueError("Region boxes need their modality input: `pixel_values` or `point_clouds`.")
    return None


def _check_pixel_values(pixel_values: Any, config: RegionBlipConfig) -> bool:
    """Check `pixel_values`; returns whether the ViT's position table must be interpolated (another square size)."""
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be a float tensor (batch, 3, {size}, {size}) from RegionBlipProcessor; got "
            f"{type(pixel_values).__name__}."
        )
    height, width = pixel_values.shape[-2:] if pixel_values.ndim == 4 else (0, 0)
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or height != width or height % patch or height == 0:
        raise ValueError(
            f"`pixel_values` must have shape (batch, 3, S, S) with S a multiple of the patch size {patch} "
            f"(vision_config.image_size = {size} for training; the released image-region evaluation uses 364); got "
            f"{tuple(pixel_values.shape)}. Resize with RegionBlipProcessor (BlipImageProcessor size={{'height': S, "
            "'width': S}})."
        )
    return height != size


def _check_region_boxes(boxes: Any, name: str, width: int, batch_size: int, normalized: bool) -> None:
    if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
        raise TypeError(f"`{name}` must be a float tensor (batch, {width}); got {type(boxes).__name__}.")
    if tuple(boxes.shape) != (batch_size, width):
        raise ValueError(
            f"`{name}` must have shape (batch={batch_size}, {width}), one region per sample; got {tuple(boxes.shape)}."
        )
    if not bool(torch.isfinite(boxes).all()):
        index = int((~torch.isfinite(boxes).all(-1)).nonzero()[0, 0])
        raise ValueError(f"`{name}` contains NaN or inf (sample {index}: {boxes[index].tolist()}).")
    if normalized:
        outside = (boxes < 0) | (boxes > 1)
        if bool(outside.any()):
            index = int(outside.any(-1).nonzero()[0, 0])
            raise ValueError(
                f"`{name}` must be normalized xyxy in [0, 1]; sample {index} = {boxes[index].tolist()}. Pass pixel "
                f"boxes to RegionBlipProcessor(boxes=...), which divides them by the image size."
            )
        inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bool(inverted.any()):
            index = int(inverted.nonzero()[0, 0])
            raise ValueError(
                f"`{name}` must have x2 >= x1 and y2 >= y1; sample {index} = {boxes[index].tolist()}. Pass xyxy boxes."
            )


# ----------------------------------------------------------------------------------------------------------------
# Q-Former text side and the stage-1 losses (BLIP-2's ITC / ITM / ITG, section 3.2)


def qformer_text_inputs(tokenizer: Any, texts: list[str], max_length: int = 32) -> dict[str, torch.Tensor]:
    """Tokenize captions for the Q-Former's text side: `qformer_input_ids`, `qformer_attention_mask`, both `(B, T)`
    long, right-padded to the longest caption, truncated to `max_length` (released `max_txt_len` 32).

    The first token must be the tokenizer's [CLS] / BOS (BERT's tokenizer adds it): ITC reads its feature and ITG
    replaces it with `[DEC]`.
    """
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise TypeError("`texts` must be a non-empty list of strings, one caption per sample.")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"`texts[{index}]` must be a string; got {type(text).__name__}.")
    encoded = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, padding_side="right",
        return_tensors="pt",
    )  # fmt: skip
    first = int(encoded["input_ids"][0, 0])
    if first not in set(tokenizer.all_special_ids):
        raise ValueError(
            "`tokenizer` must prepend a [CLS] / BOS token (its first id is the Q-Former's text feature); got a "
            f"plain token id {first}. Use BERT's tokenizer (LAVIS: bert-base-uncased + `[DEC]`)."
        )
    return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}


def contrastive_loss(similarity: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Symmetric in-batch ITC loss: `similarity` `(B, B)` float, row i = sample i's queries against every text
    (already divided by the temperature), the matching text on the diagonal. Returns the scalar mean of the
    query-to-text and text-to-query cross entropies (label smoothing 0.1 as released)."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"`similarity` must be a square (batch, batch) matrix; got {tuple(similarity.shape)}.")
    targets = torch.arange(similarity.shape[0], device=similarity.device)
    similarity = similarity.float()
    return (
        nn.functional.cross_entropy(similarity, targets, label_smoothing=label_smoothing)
        + nn.functional.cross_entropy(similarity.t(), targets, label_smoothing=label_smoothing)
    ) / 2


@torch.no_grad()
def sample_hard_negatives(
    similarity: torch.Tensor, exclude: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one in-batch negative per row, with probability softmax(similarity row) + 1e-4 (BLIP-2's ITM).

    Args:
        similarity: `(B, B)` float, row i against every candidate; the positive is the diagonal, never drawn.
        exclude: optional `(B, B)` bool, candidates that must not be drawn either (e.g. another sample with the very
            same caption, which would be a false negative); ignored for a row where it would leave no candidate.
        generator: optional `torch.Generator` for reproducible draws.

    Returns:
        `(B,)` long, the chosen candidate index of every row (never the row's own index).
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] < 2:
        raise ValueError(
            f"`similarity` must be a square (batch, batch) matrix with batch >= 2 (in-batch negatives need a second "
            f"sample); got {tuple(similarity.shape)}."
        )
    size = similarity.shape[0]
    weights = torch.softmax(similarity.float(), dim=1) + 1e-4
    diagonal = torch.eye(size, dtype=torch.bool, device=similarity.device)
    weights = weights.masked_fill(diagonal, 0.0)
    if exclude is not None:
        if exclude.shape != similarity.shape:
            raise ValueError(f"`exclude` must have the shape of `similarity` {tuple(similarity.shape)}.")
        excluded = weights.masked_fill(exclude.to(weights.device), 0.0)
        usable = excluded.sum(dim=1, keepdim=True) > 0
        weights = torch.where(usable, excluded, weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def _joint_attention_mask(
    query_length: int, text_mask: torch.Tensor, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Additive `(B, 1, Q + T, Q + T)` mask for one Q-Former pass over queries followed by text.

    Bidirectional (ITM): every token sees the queries and the real text tokens. Causal (ITG, BLIP-2's multimodal
    causal mask): queries see only queries, text token t sees all queries and text tokens <= t.
    """
    batch_size, text_length = text_mask.shape
    length = query_length + text_length
    keys = torch.cat([text_mask.new_ones(batch_size, query_length), text_mask], dim=1).bool()
    allowed = keys[:, None, :].expand(batch_size, length, length).clone()
    if causal:
        allowed[:, :query_length, query_length:] = False
        text_causal = torch.ones(text_length, text_length, dtype=torch.bool, device=text_mask.device).tril()
        allowed[:, query_length:, query_length:] &= text_causal
    mask = torch.zeros(batch_size, 1, length, length, dtype=dtype, device=text_mask.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class QFormerText(nn.Module):
    """The text side of a Q-Former that transformers' `Blip2QFormerModel` leaves out (LAVIS `Qformer.bert.embeddings`
    word + position tables and `Qformer.cls`, BERT's LM head). The embedding LayerNorm stays the Q-Former's own
    `layernorm`, applied to queries and text together as in BERT.

    `embed(input_ids (B, T) long) -> (B, T, hidden)`; `lm_logits(hidden (B, T, hidden)) -> (B, T, vocab)`.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.lm_transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.lm_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        vocab_size, max_length = self.word_embeddings.num_embeddings, self.position_embeddings.num_embeddings
        if input_ids.ndim != 2 or input_ids.shape[1] > max_length:
            raise ValueError(
                f"`qformer_input_ids` must have shape (batch, T) with T <= {max_length}; got {tuple(input_ids.shape)}."
            )
        if bool((input_ids < 0).any()) or bool((input_ids >= vocab_size).any()):
            raise ValueError(
                f"`qformer_input_ids` must be ids of the Q-Former vocabulary [0, {vocab_size}); got ids up to "
                f"{int(input_ids.max())}. Tokenize Q-Former text with the Q-Former's (BERT) tokenizer, not the LLM's."
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]

    def lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.lm_layer_norm(nn.functional.gelu(self.lm_transform(hidden_states)))
        return self.lm_decoder(hidden_states)


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model


class RegionBlipPreTrainedModel(ModelCardHookMixin, PreTrainedModel):
    """Shared class attributes and weight init (queries N(0, 0.02) as BLIP-2's, LoRA B at zero as peft's)."""

    config: RegionBlipConfig
    base_model_prefix = "model"
    # Generation drives the prompt ids; the modality inputs are extra kwargs of the prefill step.
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PointBertBlock", "BoxPositionEmbedding"]
    _skip_keys_device_placement = "past_key_values"
    # The Q-Formers and queries stay in float32, as BLIP-2 keeps its Q-Former (and the released code its LoRA).
    _keep_in_fp32_modules = [
        "query_tokens",
        "qformer",
        "point_cloud_qformer",
        "qformer_text",
        "point_cloud_qformer_text",
    ]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.ParameterDict) and module is getattr(self, "query_tokens", None):
            # The new modalities' queries start as LAVIS draws BLIP-2's (from_blip2 then copies BLIP-2's in).
            for parameter in module.values():
                init.normal_(parameter, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, RegionBlipModel) and module.temperature is not None:
            init.constant_(module.temperature, _INITIAL_TEMPERATURE)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        # The LoRA layers live inside the Q-Formers and the LLM, whose own `_init_weights` re-draw every Linear; peft's
        # identity start (B = 0) is restored afterwards, so a fresh adapter leaves BLIP-2's outputs unchanged.
        # `init.zeros_` skips weights loaded from a checkpoint.
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, LoraLayer):
                for lora_b in module.lora_B.values():
                    init.zeros_(lora_b.weight)


# ----------------------------------------------------------------------------------------------------------------
# Base model


class RegionBlipModel(RegionBlipPreTrainedModel):
    """RegionBLIP without the LM head: modality encoders, Q-Formers, queries, PaFE, projections and the LLM body."""

    def __init__(self, config: RegionBlipConfig):
        super().__init__(config)
        qformer_width = config.qformer_config.hidden_size
        text_width = config.text_hidden_size
        self.vision_tower = Blip2VisionModel._from_config(config.vision_config)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.point_encoder = PointBertModel._from_config(config.point_bert_config)
        self.point_cloud_adapter = nn.Linear(config.point_bert_config.hidden_size, config.vision_config.hidden_size)
        self.point_cloud_qformer = (
            Blip2QFormerModel._from_config(config.point_cloud_qformer_config)
            if config.use_point_cloud_qformer
            else None
        )
        self.query_tokens = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_width)) for m in MODALITIES}
        )
        self.region_position_embeddings = nn.ModuleDict(
            {
                modality: BoxPositionEmbedding(
                    in_features=_BOX_WIDTHS[modality],
                    hidden_size=config.position_embedding_hidden_size,
                    out_features=qformer_width,
                    activation="gelu",
                    layer_norm=False,
                    final_activation=False,
                )
                for modality in REGION_MODALITIES
            }
        )
        self.multi_modal_projector = nn.ModuleDict({m: nn.Linear(qformer_width, text_width) for m in MODALITIES})
        self.box_heads = (
            nn.ModuleDict({m: nn.Linear(qformer_width, _BOX_WIDTHS[m]) for m in REGION_MODALITIES})
            if config.use_box_regression
            else None
        )
        # BLIP-2 stage-1 heads (released `stage1_proj_*`, `img_itm_head`, `temp`) and the Q-Former text sides.
        use_text = config.use_qformer_losses
        self.qformer_text = QFormerText(config.qformer_config) if use_text else None
        self.point_cloud_qformer_text = (
            QFormerText(config.point_cloud_qformer_config) if use_text and config.use_point_cloud_qformer else None
        )
        embed_dim = config.contrastive_embed_dim
        self.vision_projections = (
            nn.ModuleDict({m: nn.Linear(qformer_width, embed_dim) for m in MODALITIES}) if config.use_itc else None
        )
        self.text_projection = nn.Linear(qformer_width, embed_dim) if config.use_itc else None
        self.temperature = nn.Parameter(torch.full((), _INITIAL_TEMPERATURE)) if config.use_itc else None
        self.itm_head = nn.Linear(qformer_width, 2) if config.use_itm and config.itm_modalities else None
        self.language_model = AutoModel.from_config(config.text_config)
        self._inject_lora_adapters()
        self._apply_freezing()
        self.post_init()

    # ---- LoRA and freezing ----------------------------------------------------------------------------------

    def _lora_config(self, target_modules: tuple[str, ...]) -> LoraConfig:
        return LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(target_modules),
        )

    def _inject_lora_adapters(self) -> None:
        qformer_targets = ("query", "value")
        with warnings.catch_warnings():
            # peft warns when a second adapter is injected into the same module; one per modality is the design.
            warnings.simplefilter("ignore", UserWarning)
            for modality in MODALITIES:
                qformer = self.qformer_for(modality)
                inject_adapter_in_model(self._lora_config(qformer_targets), qformer, adapter_name=modality)
                inject_adapter_in_model(
                    self._lora_config(self.config.language_lora_target_modules),
                    self.language_model,
                    adapter_name=modality,
                )
        self._lora_layers = {
            modality: [m for m in self.modules() if isinstance(m, LoraLayer) and modality in m.lora_A]
            for modality in MODALITIES
        }
        self._active_modality: str | None = None
        self.set_modality("image")

    def _apply_freezing(self) -> None:
        config = self.config
        frozen_prefixes = []
        if config.freeze_vision_tower:
            frozen_prefixes.append("vision_tower.")
        if config.freeze_point_encoder:
            frozen_prefixes.append("point_encoder.")
        base_frozen = []
        if config.freeze_qformer:
            # Released `freeze_qformer` freezes all of BLIP-2's Q-Former (BertLMHeadModel), text side included.
            base_frozen += ["qformer.", "qformer_text."]
        if config.freeze_language_model:
            base_frozen.append("language_model.")
        if config.freeze_image_modality:
            frozen_prefixes.append("multi_modal_projector.image.")
        for name, parameter in self.named_parameters():
            is_lora = ".lora_" in name
            if is_lora:
                trainable = not (config.freeze_image_modality and (".image." in name))
            elif any(name.startswith(prefix) for prefix in base_frozen):
                trainable = False
            elif name == "query_tokens.image":
                trainable = not config.freeze_image_modality
            else:
                trainable = not any(name.startswith(prefix) for prefix in frozen_prefixes)
            parameter.requires_grad_(trainable)

    def qformer_for(self, modality: str) -> Blip2QFormerModel:
        """The Q-Former that serves `modality` (`point_cloud_qformer` for point clouds when the config has one)."""
        if modality in POINT_CLOUD_MODALITIES and self.point_cloud_qformer is not None:
            return self.point_cloud_qformer
        return self.qformer

    def qformer_text_for(self, modality: str) -> QFormerText:
        """The text side (embeddings, LM head) of the Q-Former that serves `modality`."""
        if self.qformer_text is None:
            raise ValueError(
                "This model has no Q-Former text side; build it with `use_itc`, `use_itm` or `use_itg` = True."
            )
        if modality in POINT_CLOUD_MODALITIES and self.point_cloud_qformer_text is not None:
            return self.point_cloud_qformer_text
        return self.qformer_text

    @property
    def active_modality(self) -> str | None:
        return self._active_modality

    def set_modality(self, modality: str) -> None:
        """Activate `modality`'s LoRA adapter in its Q-Former and in the LLM (peft `set_adapter`).

        No module is created or replaced, and `requires_grad` of every LoRA weight is left as it was: peft's
        `set_adapter` also freezes the inactive adapters, which would drop the other modalities' LoRA from an
        optimizer built once for semi-hybrid training. So only what decides the forward changes: each LoRA layer's
        active-adapter list (the attribute `set_adapter` ends with), a few microseconds for all layers
        (PERFORMANCE.md: a switch between batches < 1 ms, no module rebuilt).
        """
        if modality not in MODALITIES:
            raise ValueError(f"`modality` must be one of {MODALITIES}; got {modality!r}.")
        if modality == self._active_modality:
            return
        for layer in self._lora_layers[modality]:
            # Bypasses nn.Module.__setattr__'s parameter/module/buffer checks: a plain list attribute.
            layer.__dict__["_active_adapter"] = [modality]
        self._active_modality = modality

    def save_modality_adapter(self, save_directory: str | Path, modality: str) -> list[Path]:
        """Save `modality`'s LoRA weights as two PEFT adapters: `<dir>/qformer/` (its Q-Former) and
        `<dir>/language_model/` (the LLM), each `adapter_config.json` + `adapter_model.safetensors` with PEFT's key
        layout (`base_model.model.<module>.lora_A.weight`), loadable with `load_modality_adapter` or plain peft
        (`PeftModel.from_pretrained(Blip2QFormerModel(...), "<dir>/qformer")`). Returns the two folders."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if modality not in MODALITIES:
            raise ValueError(f"`modality` must be one of {MODALITIES}; got {modality!r}.")
        folders = []
        for name, module in (("qformer", self.qformer_for(modality)), ("language_model", self.language_model)):
            folder = Path(save_directory) / name
            folder.mkdir(parents=True, exist_ok=True)
            state = get_peft_model_state_dict(module, adapter_name=modality)
            save_file(
                {f"base_model.model.{key}": value.detach().cpu().contiguous() for key, value in state.items()},
                str(folder / "adapter_model.safetensors"),
            )
            module.peft_config[modality].save_pretrained(str(folder))
            folders.append(folder)
        return folders

    def load_modality_adapter(self, load_directory: str | Path, modality: str) -> None:
        """Load LoRA weights written by `save_modality_adapter` into `modality`'s adapters (shapes must match)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if modality not in MODALITIES:
            raise ValueError(f"`modality` must be one of {MODALITIES}; got {modality!r}.")
        for name, module in (("qformer", self.qformer_for(modality)), ("language_model", self.language_model)):
            path = Path(load_directory) / name / "adapter_model.safetensors"
            if not path.is_file():
                raise ValueError(
                    f"`load_directory` has no {name}/adapter_model.safetensors; save it with save_modality_adapter."
                )
            prefix = "base_model.model."
            state = {
                key[len(prefix) :] if key.startswith(prefix) else key: v for key, v in load_file(str(path)).items()
            }
            result = set_peft_model_state_dict(module, state, adapter_name=modality)
            missing = [key for key in result.missing_keys if ".lora_" in key and f".{modality}." in key]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"`load_directory` {name} adapter does not fit this model (missing {missing[:3]}, unexpected "
                    f"{list(result.unexpected_keys)[:3]}); was it saved from a model with the same sizes?"
                )

    def train(self, mode: bool = True) -> "RegionBlipModel":
        """As `nn.Module.train`, but frozen towers stay in eval mode (LAVIS `disabled_train`): no dropout, fixed
        BatchNorm statistics in Point-BERT."""
        super().train(mode)
        if self.config.freeze_vision_tower:
            self.vision_tower.eval()
        if self.config.freeze_point_encoder:
            self.point_encoder.eval()
        return self

    # ---- modality features ------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, S, S)` CLIP-normalized pixels -> `(B, 1 + (S / 14)^2, vision width)` ViT tokens (post-LayerNorm,
        what BLIP-2's Q-Former reads). S is `vision_config.image_size` or any other multiple of the patch size."""
        # Other square sizes (364 for the released image-region evaluation) interpolate the position table bicubically,
        # as LAVIS does when it loads EVA-ViT at a new `img_size`.
        interpolate = _check_pixel_values(pixel_values, self.config)
        return self.vision_tower(pixel_values=pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state

    def encode_point_clouds(
        self, point_clouds: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`(B, N, 3)` xyz -> `(B, 1 + num_groups, vision width)`: Point-BERT tokens through `point_cloud_adapter`."""
        tokens = self.point_encoder(point_clouds, generator=generator).last_hidden_state
        return self.point_cloud_adapter(tokens)

    def get_query_features(
        self,
        modality: str,
        pixel_values: torch.Tensor | None = None,
        point_clouds: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_boxes_3d: torch.Tensor | None = None,
    ) -> RegionBlipQueryOutput:
        """Run steps 1-3 for one modality (see the module docstring); activates the modality's adapters.

        Args:
            modality: one of `MODALITIES`; must match the inputs.
            pixel_values: `(B, 3, S, S)` float, CLIP-normalized (image modalities).
            point_clouds: `(B, N, 3)` float xyz (point-cloud modalities).
            region_boxes: `(B, 4)` float normalized xyxy in [0, 1] (`image_region`).
            region_boxes_3d: `(B, 24)` float, 8 box corners x xyz in the point cloud's frame (`point_cloud_region`).
        """
        inferred = infer_modality(pixel_values, point_clouds, region_boxes, region_boxes_3d)
        if inferred != modality:
            raise ValueError(
                f"`modality={modality!r}` does not match the inputs, which describe {inferred!r} (pixel_values -> "
                "image, + region_boxes -> image_region, point_clouds -> point_cloud, + region_boxes_3d -> "
                "point_cloud_region)."
            )
        self.set_modality(modality)
        if modality in POINT_CLOUD_MODALITIES:
            encoder_hidden_states = self.encode_point_clouds(point_clouds)
        else:
            encoder_hidden_states = self.encode_images(pixel_values)
        batch_size = encoder_hidden_states.shape[0]
        queries = self.query_tokens[modality].expand(batch_size, -1, -1)
        boxes = region_boxes if modality == "image_region" else region_boxes_3d
        if modality in REGION_MODALITIES:
            _check_region_boxes(
                boxes,
                "region_boxes" if modality == "image_region" else "region_boxes_3d",
                _BOX_WIDTHS[modality],
                batch_size,
                normalized=modality == "image_region",
            )
            # PaFE: one position vector added to all queries; the Q-Former's embedding LayerNorm comes after it.
            position = self.region_position_embeddings[modality](boxes.to(queries.dtype))
            queries = queries + position.unsqueeze(1).to(queries.dtype)
        attention_mask = torch.ones(encoder_hidden_states.shape[:-1], dtype=torch.long, device=queries.device)
        query_output = self.qformer_for(modality)(
            query_embeds=queries,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=attention_mask,
        ).last_hidden_state
        projector = self.multi_modal_projector[modality]
        query_embeddings = projector(query_output.to(projector.weight.dtype))
        box_predictions = None
        if self.box_heads is not None and modality in REGION_MODALITIES:
            box_predictions = self.box_heads[modality](query_output.mean(dim=1))
        return RegionBlipQueryOutput(
            query_embeddings=query_embeddings,
            query_output=query_output,
            encoder_hidden_states=encoder_hidden_states,
            box_predictions=box_predictions,
            query_inputs=queries,
        )

    # ---- Q-Former text side and stage-1 losses ----------------------------------------------------------------

    def _qformer_text_pass(
        self,
        modality: str,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        query_inputs: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """One pass of `modality`'s Q-Former over `[queries; text]` (or text alone without `query_inputs`).

        Returns the last hidden states `(B, Q + T, hidden)` (Q = 0 without queries). Queries cross-attend to
        `encoder_hidden_states`; text never does (BLIP-2). `causal` gives ITG's multimodal causal mask.
        """
        qformer = self.qformer_for(modality)
        text = self.qformer_text_for(modality)
        text_embeddings = text.embed(input_ids)
        if query_inputs is None:
            return qformer(
                query_embeds=text_embeddings, query_length=0, attention_mask=attention_mask
            ).last_hidden_state
        query_length = query_inputs.shape[1]
        embeddings = torch.cat([query_inputs.to(text_embeddings.dtype), text_embeddings], dim=1)
        mask = _joint_attention_mask(query_length, attention_mask, causal, embeddings.dtype)
        encoder_mask = torch.ones(encoder_hidden_states.shape[:-1], dtype=torch.long, device=embeddings.device)
        return qformer(
            query_embeds=embeddings,
            query_length=query_length,
            attention_mask=mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_mask,
        ).last_hidden_state

    def get_text_features(
        self, modality: str, qformer_input_ids: torch.LongTensor, qformer_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ITC text features: the [CLS] output of `modality`'s Q-Former (with its LoRA) on text alone, through
        `text_projection`, L2-normalised. `qformer_input_ids` `(B, T)` from `qformer_text_inputs`; returns `(B, 256)`."""
        if self.text_projection is None:
            raise ValueError("Text features need the ITC heads; build the model with `use_itc=True`.")
        self.set_modality(modality)
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        hidden = self._qformer_text_pass(modality, qformer_input_ids, qformer_attention_mask)
        return nn.functional.normalize(self.text_projection(hidden[:, 0]), dim=-1)

    def get_query_contrastive_features(self, modality: str, query_output: torch.Tensor) -> torch.Tensor:
        """ITC query features: `(B, Q, qformer hidden)` query outputs through `vision_projections[modality]`,
        L2-normalised, `(B, Q, 256)`."""
        if self.vision_projections is None:
            raise ValueError("Query features for ITC need the ITC heads; build the model with `use_itc=True`.")
        return nn.functional.normalize(self.vision_projections[modality](query_output), dim=-1)

    @staticmethod
    def query_text_similarity(query_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every sample with every text, max over the queries (BLIP-2's ITC aggregation):
        `(B, Q, D)` x `(T, D)` -> `(B, T)`."""
        return torch.einsum("bqd,td->btq", query_features, text_features).amax(dim=-1)

    def qformer_losses(
        self,
        modality: str,
        query: RegionBlipQueryOutput,
        qformer_input_ids: torch.LongTensor,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """BLIP-2's stage-1 losses on `modality`'s Q-Former for one batch (released `_forward_modal_align`).

        Args:
            modality: the batch's modality (its adapters are active).
            query: the batch's `RegionBlipQueryOutput` (from `get_query_features`).
            qformer_input_ids: `(B, T)` long, the captions in the Q-Former vocabulary, [CLS] first.
            qformer_attention_mask: `(B, T)`, 1 on real tokens.

        Returns:
            `{"loss_itc", "loss_itm", "loss_itg"}` scalars (unweighted; 0 where switched off, for ITM outside
            `itm_modalities` or with a batch of one). Negatives are in-batch on this process (LAVIS gathers them
            across GPUs).
        """
        config = self.config
        batch_size = query.query_output.shape[0]
        if qformer_input_ids.ndim != 2 or qformer_input_ids.shape[0] != batch_size:
            raise ValueError(
                f"`qformer_input_ids` must have shape (batch={batch_size}, T), one caption per sample; got "
                f"{tuple(qformer_input_ids.shape)}."
            )
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        if qformer_attention_mask.shape != qformer_input_ids.shape:
            raise ValueError("`qformer_attention_mask` must have the shape of `qformer_input_ids`.")
        zero = query.query_output.new_zeros((), dtype=torch.float32)
        losses = dict.fromkeys(_QFORMER_LOSS_NAMES, zero)
        if config.use_itc:
            text_features = self.get_text_features(modality, qformer_input_ids, qformer_attention_mask)
            query_features = self.get_query_contrastive_features(modality, query.query_output)
            similarity = self.query_text_similarity(query_features, text_features.to(query_features.dtype))
            similarity = similarity / self.temperature.clamp(min=1e-3)
            losses["loss_itc"] = contrastive_loss(similarity, config.contrastive_label_smoothing)
            # ITM draws its hard negatives from the ITC similarities (config validation ties ITM to ITC).
            if config.use_itm and modality in config.itm_modalities and batch_size > 1:
                losses["loss_itm"] = self._itm_loss(
                    modality, query, qformer_input_ids, qformer_attention_mask, similarity.detach()
                )
        if config.use_itg:
            losses["loss_itg"] = self._itg_loss(modality, query, qformer_input_ids, qformer_attention_mask)
        return losses

    def _itm_loss(
        self,
        modality: str,
        query: RegionBlipQueryOutput,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        similarity: torch.Tensor,
    ) -> torch.Tensor:
        batch_size = input_ids.shape[0]
        # Another sample with the very same caption is no negative (templated captions repeat within a batch).
        same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1) & (
            attention_mask[:, None, :] == attention_mask[None, :, :]
        ).all(-1)
        negative_samples = sample_hard_negatives(similarity.t(), exclude=same_text)  # a sample for every text
        negative_texts = sample_hard_negatives(similarity, exclude=same_text)  # a text for every sample
        text_ids = torch.cat([input_ids, input_ids, input_ids[negative_texts]])
        text_mask = torch.cat([attention_mask, attention_mask, attention_mask[negative_texts]])
        samples = torch.cat([torch.arange(batch_size, device=input_ids.device), negative_samples])
        samples = torch.cat([samples, torch.arange(batch_size, device=input_ids.device)])
        # Each sample keeps its own queries (PaFE of its own box) next to its own features.
        hidden = self._qformer_text_pass(
            modality,
            text_ids,
            text_mask,
            query_inputs=query.query_inputs[samples],
            encoder_hidden_states=query.encoder_hidden_states[samples],
        )
        logits = self.itm_head(hidden[:, : query.query_inputs.shape[1]]).mean(dim=1)
        labels = torch.cat(
            [torch.ones(batch_size, dtype=torch.long), torch.zeros(2 * batch_size, dtype=torch.long)]
        ).to(logits.device)
        return nn.functional.cross_entropy(logits.float(), labels)

    def _itg_loss(
        self, modality: str, query: RegionBlipQueryOutput, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        # `[DEC]` replaces [CLS]; running the queries again under the causal mask equals LAVIS's reuse of their
        # cached keys / values (queries never see the text).
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.config.qformer_decoder_start_token_id
        hidden = self._qformer_text_pass(
            modality,
            decoder_ids,
            attention_mask,
            query_inputs=query.query_inputs,
            encoder_hidden_states=query.encoder_hidden_states,
            causal=True,
        )
        logits = self.qformer_text_for(modality).lm_logits(hidden[:, query.query_inputs.shape[1] :])
        labels = decoder_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
        return nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            label_smoothing=self.config.qformer_caption_label_smoothing,
        )

    @torch.no_grad()
    def point_cloud_class_scores(
        self,
        point_clouds: torch.Tensor,
        qformer_input_ids: torch.LongTensor,
        qformer_attention_mask: torch.Tensor | None = None,
        modality: str = "point_cloud",
    ) -> torch.Tensor:
        """Zero-shot point-cloud classification (released ModelNet40 protocol): `(B, N, 3)` clouds against `(C, T)`
        tokenized class prompts -> `(B, C)` cosine scores, max over the queries."""
        if modality != "point_cloud":
            raise ValueError(f"`modality` must be 'point_cloud' for zero-shot classification; got {modality!r}.")
        query = self.get_query_features(modality, point_clouds=point_clouds)
        query_features = self.get_query_contrastive_features(modality, query.query_output)
        text_features = self.get_text_features(modality, qformer_input_ids, qformer_attention_mask)
        return self.query_text_similarity(query_features, text_features.to(query_features.dtype))

    # ---- LLM -------------------------------------------------------------------------------------------------

    def _fill_placeholders(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, query_embeddings: torch.Tensor
    ) -> torch.Tensor:
        placeholder = input_ids == self.config.image_token_index
        expected = query_embeddings.shape[0] * query_embeddings.shape[1]
        counts = placeholder.sum(dim=1)
        if int(counts.sum()) != expected or bool((counts != query_embeddings.shape[1]).any()):
            raise ValueError(
                f"`input_ids` must hold exactly num_query_tokens={query_embeddings.shape[1]} `<image>` placeholders "
                f"(id {self.config.image_token_index}) per sample; got {counts.tolist()}. Build the prompt with "
                "RegionBlipProcessor, which writes them."
            )
        mask = placeholder.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, query_embeddings.to(inputs_embeds.dtype))

    def embed_prompt(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        point_clouds: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_boxes_3d: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        modality: str | None = None,
        past_key_values: Cache | None = None,
    ) -> tuple[torch.Tensor, RegionBlipQueryOutput | None]:
        """LLM input embeddings `(B, L, text hidden)` of the prompt with the modality's projected queries written
        into its `<image>` placeholders, and the query output (None on decode steps); selects the adapters."""
        inferred = infer_modality(pixel_values, point_clouds, region_boxes, region_boxes_3d)
        if modality is not None and inferred is not None and modality != inferred:
            raise ValueError(f"`modality={modality!r}` does not match the inputs, which describe {inferred!r}.")
        query = None
        if inferred is not None:
            query = self.get_query_features(inferred, pixel_values, point_clouds, region_boxes, region_boxes_3d)
        elif modality is not None:
            self.set_modality(modality)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass `input_ids` (from RegionBlipProcessor) or `inputs_embeds`.")
            inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
            if query is not None:
                inputs_embeds = self._fill_placeholders(input_ids, inputs_embeds, query.query_embeddings)
            elif bool((input_ids == self.config.image_token_index).any()) and past_key_values is None:
                raise ValueError(
                    "`input_ids` hold `<image>` placeholders but no modality input was given; pass `pixel_values` "
                    "(+ `region_boxes`) or `point_clouds` (+ `region_boxes_3d`)."
                )
        return inputs_embeds, query

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        point_clouds: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_boxes_3d: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: ModelOutput | tuple | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        modality: str | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> RegionBlipModelOutput:
        """Queries of the batch's modality written into the prompt, then the LLM body.

        Args: see `RegionBlipForConditionalGeneration.forward`. `encoder_outputs` (T5 only): the already encoded
        prompt (generation encodes it once through `get_encoder()`); modality inputs then only select adapters.
        """
        query = None
        if encoder_outputs is not None:
            inferred = infer_modality(pixel_values, point_clouds, region_boxes, region_boxes_3d)
            if inferred or modality:
                self.set_modality(inferred or modality)
        else:
            inputs_embeds, query = self.embed_prompt(
                input_ids, pixel_values, point_clouds, region_boxes, region_boxes_3d, inputs_embeds, modality,
                past_key_values,
            )  # fmt: skip

        if self.config.is_encoder_decoder_language_model:
            outputs = self.language_model(
                inputs_embeds=None if encoder_outputs is not None else inputs_embeds,
                encoder_outputs=encoder_outputs,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
            hidden_states, attentions = outputs.decoder_hidden_states, outputs.decoder_attentions
        else:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
            hidden_states, attentions = outputs.hidden_states, outputs.attentions
        return RegionBlipModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=hidden_states,
            attentions=attentions,
            query_embeddings=None if query is None else query.query_embeddings,
            box_predictions=None if query is None else query.box_predictions,
            query_features=query,
        )


class RegionBlipPromptEncoder:
    """Encoder view of a T5-based `RegionBlipModel` for `GenerationMixin` (not a module: it owns no weights).

    `forward(input_ids, attention_mask, pixel_values | point_clouds, region_boxes | region_boxes_3d)` writes the
    modality's projected queries into the prompt's placeholders and runs the T5 encoder; it returns the encoder's
    `BaseModelOutput` (`last_hidden_state (B, L, d_model)`).
    """

    def __init__(self, model: RegionBlipModel):
        self.model = model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        point_clouds: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_boxes_3d: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        modality: str | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
    ) -> ModelOutput:
        inputs_embeds, _ = self.model.embed_prompt(
            input_ids, pixel_values, point_clouds, region_boxes, region_boxes_3d, inputs_embeds, modality
        )
        return self.model.language_model.get_encoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )

    __call__ = forward


# ----------------------------------------------------------------------------------------------------------------
# Head


class RegionBlipForConditionalGeneration(RegionBlipPreTrainedModel, GenerationMixin):
    """RegionBLIP with the LLM's LM head: captions for images, image regions, point clouds and point-cloud regions."""

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: RegionBlipConfig):
        super().__init__(config)
        self.model = RegionBlipModel(config)
        self.lm_head = nn.Linear(config.text_hidden_size, config.text_config.vocab_size, bias=False)
        if getattr(config.text_config, "tie_word_embeddings", False):
            source = (
                "model.language_model.shared.weight"
                if config.is_encoder_decoder_language_model
                else "model.language_model.decoder.embed_tokens.weight"
            )
            self._tied_weights_keys = {"lm_head.weight": source}
        self.lm_head.requires_grad_(not config.freeze_language_model)
        self.loss_type = "ForCausalLM"
        self.post_init()
        suppress_placeholder_tokens(self, [config.image_token_index])

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def set_modality(self, modality: str) -> None:
        """See `RegionBlipModel.set_modality`."""
        self.model.set_modality(modality)

    @property
    def active_modality(self) -> str | None:
        return self.model.active_modality

    def save_modality_adapter(self, save_directory: str | Path, modality: str) -> list[Path]:
        """See `RegionBlipModel.save_modality_adapter`."""
        return self.model.save_modality_adapter(save_directory, modality)

    def load_modality_adapter(self, load_directory: str | Path, modality: str) -> None:
        """See `RegionBlipModel.load_modality_adapter`."""
        self.model.load_modality_adapter(load_directory, modality)

    def get_query_features(self, modality: str, **inputs: Any) -> RegionBlipQueryOutput:
        """See `RegionBlipModel.get_query_features`."""
        return self.model.get_query_features(modality, **inputs)

    @torch.no_grad()
    def classify_point_clouds(
        self,
        point_clouds: Any,
        class_names: list[str],
        processor: Any,
        prompt_template: str = "a point cloud model of {}.",
    ) -> torch.Tensor:
        """Zero-shot point-cloud classification by Q-Former text features (released ModelNet40 protocol).

        Args:
            point_clouds: one `(N, 3)` xyz array per cloud (N >= `processor.num_points`), or the processed
                `(B, num_points, 3)` float tensor.
            class_names: C class names, each written into `prompt_template`.
            processor: the model's `RegionBlipProcessor`; its `qformer_tokenizer` (BERT) tokenizes the prompts, or,
                for checkpoints whose Q-Former shares the LLM vocabulary (the tiny preset), its `tokenizer`.
            prompt_template: the released `"a point cloud model of {}."`.

        Returns:
            `(B, C)` float cosine scores (max over the queries); `argmax(-1)` is the predicted class.
        """
        if isinstance(class_names, str) or not class_names or not all(isinstance(n, str) for n in class_names):
            raise TypeError("`class_names` must be a non-empty list of strings.")
        if not isinstance(point_clouds, torch.Tensor):
            point_clouds = processor(point_clouds=point_clouds, return_tensors="pt")["point_clouds"]
        tokenizer = getattr(processor, "qformer_tokenizer", None) or processor.tokenizer
        text = qformer_text_inputs(
            tokenizer, [prompt_template.format(name) for name in class_names], self.config.qformer_max_text_length
        )
        was_training = self.training
        self.eval()
        try:
            return self.model.point_cloud_class_scores(
                point_clouds.to(self.device), text["qformer_input_ids"].to(self.device),
                text["qformer_attention_mask"].to(self.device),
            )  # fmt: skip
        finally:
            self.train(was_training)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        point_clouds: torch.FloatTensor | None = None,
        region_boxes: torch.FloatTensor | None = None,
        region_boxes_3d: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: ModelOutput | tuple | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        modality: str | None = None,
        image_sizes: torch.LongTensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> RegionBlipOutput:
        """Caption (or continue a prompt about) one modality per batch.

        Args:
            input_ids: `(B, L)` ids from `RegionBlipProcessor`: `num_query_tokens` `<image>` placeholders, then BOS and
                the prompt (and, in training, the caption). For T5 these go to the encoder.
            pixel_values: `(B, 3, S, S)` float, CLIP-normalized, S = `vision_config.image_size` (image modalities).
            point_clouds: `(B, N, 3)` float xyz, N >= Point-BERT's `num_groups` (point-cloud modalities).
            region_boxes: `(B, 4)` float normalized xyxy in [0, 1], one region per sample -> `image_region`.
            region_boxes_3d: `(B, 24)` float, 8 corners x xyz of one box per sample -> `point_cloud_region`.
            attention_mask: `(B, L)` 1 on real tokens.
            labels: decoder-only LLM: `(B, L)` aligned with `input_ids`, -100 on placeholders, prompt and padding
                (shifted inside the loss). T5: `(B, T)` caption ids for the decoder (`decoder_input_ids` default to
                them shifted right).
            modality: optional check; inferred from which inputs are present. Decode steps (no modality input) keep
                the active adapters.
            image_sizes: `(B, 2)` original (height, width); unused by the model.
            qformer_input_ids: `(B, T)` long, the captions in the Q-Former's (BERT) vocabulary with [CLS] first
                (`qformer_text_inputs`); with them the Q-Former losses ITC / ITM / ITG are computed.
            qformer_attention_mask: `(B, T)`, 1 on real Q-Former text tokens.
            logits_to_keep: compute logits for the last `logits_to_keep` positions only (0 = all).

        Returns:
            `RegionBlipOutput`: `loss` = eq. 2 (LM loss + lambda * L1 box regression + ITC + ITM + ITG, with the
            config's weights), `logits`, `past_key_values`, `query_embeddings`, `box_predictions`, `loss_dict`.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        is_encoder_decoder = self.config.is_encoder_decoder_language_model
        if is_encoder_decoder and labels is not None and decoder_input_ids is None:
            decoder_input_ids = self.model.language_model._shift_right(labels)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            point_clouds=point_clouds,
            region_boxes=region_boxes,
            region_boxes_3d=region_boxes_3d,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            modality=modality,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        if is_encoder_decoder and getattr(self.config.text_config, "scale_decoder_outputs", False):
            # Original T5 (not v1.1 / Flan-T5) rescales the decoder output before its tied LM head.
            hidden_states = hidden_states * self.config.text_config.d_model**-0.5
        logits = self.lm_head(hidden_states)

        loss, loss_dict = None, None
        if labels is not None or qformer_input_ids is not None:
            config = self.config
            lm_loss = logits.new_zeros((), dtype=torch.float32)
            if labels is not None:
                vocab_size = config.text_config.vocab_size
                if is_encoder_decoder:
                    lm_loss = nn.functional.cross_entropy(
                        logits.float().reshape(-1, vocab_size), labels.reshape(-1).to(logits.device), ignore_index=-100
                    )
                else:
                    lm_loss = self.loss_function(
                        logits=logits, labels=labels, vocab_size=vocab_size, num_items_in_batch=num_items_in_batch
                    )
            box_loss = lm_loss.new_zeros(())
            if outputs.box_predictions is not None:
                targets = region_boxes if region_boxes is not None else region_boxes_3d
                box_loss = nn.functional.l1_loss(outputs.box_predictions.float(), targets.float())
            qformer_losses = dict.fromkeys(_QFORMER_LOSS_NAMES, lm_loss.new_zeros(()))
            if qformer_input_ids is not None:
                if not config.use_qformer_losses:
                    raise ValueError(
                        "`qformer_input_ids` were given but the config switches ITC, ITM and ITG off; drop them or "
                        "set `use_itc` / `use_itm` / `use_itg`."
                    )
                if outputs.query_features is None:
                    raise ValueError(
                        "`qformer_input_ids` need the batch's modality input (`pixel_values` or `point_clouds`)."
                    )
                modality = self.model.active_modality
                qformer_losses = self.model.qformer_losses(
                    modality, outputs.query_features, qformer_input_ids.to(logits.device),
                    None if qformer_attention_mask is None else qformer_attention_mask.to(logits.device),
                )  # fmt: skip
            loss = (
                config.language_model_loss_weight * lm_loss
                + config.box_regression_loss_weight * box_loss
                + config.itc_loss_weight * qformer_losses["loss_itc"]
                + config.itm_loss_weight * qformer_losses["loss_itm"]
                + config.itg_loss_weight * qformer_losses["loss_itg"]
            )
            loss_dict = {"loss_lm": lm_loss.detach(), "loss_reg": box_loss.detach()}
            loss_dict.update({name: value.detach() for name, value in qformer_losses.items()})

        return RegionBlipOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            query_embeddings=outputs.query_embeddings,
            box_predictions=outputs.box_predictions,
            loss_dict=loss_dict,
        )

    # ---- generation ---------------------------------------------------------------------------------------------

    _PREFILL_ONLY_INPUTS = ("pixel_values", "point_clouds", "region_boxes", "region_boxes_3d", "image_sizes")

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Modality inputs go to the prefill step only (every step without a KV cache); the adapters selected at
        prefill stay active for the decode steps."""
        modality_inputs = {name: kwargs.pop(name, None) for name in self._PREFILL_ONLY_INPUTS}
        # Q-Former text only feeds the training losses; generation never needs it.
        kwargs.pop("qformer_input_ids", None)
        kwargs.pop("qformer_attention_mask", None)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update({name: value for name, value in modality_inputs.items() if value is not None})
        return model_inputs

    def get_encoder(self, modality: str | None = None) -> Any:
        """T5 presets: the multimodal prompt encoder that generation runs once before decoding (queries written into
        the prompt, then the T5 encoder); otherwise, or with `modality`, the transformers default lookup."""
        if modality is None and self.config.is_encoder_decoder_language_model:
            return RegionBlipPromptEncoder(self.model)
        return super().get_encoder(modality=modality)

    # ---- building from BLIP-2 ----------------------------------------------------------------------------------

    @classmethod
    def from_blip2(
        cls,
        blip2_model_or_path: PreTrainedModel | str | Path,
        *,
        point_bert_config: dict | None = None,
        use_point_cloud_qformer: bool = True,
        **config_overrides: Any,
    ) -> "RegionBlipForConditionalGeneration":
        """Build RegionBLIP around a transformers `Blip2ForConditionalGeneration` (incremental pre-training).

        The vision tower, Q-Former (base weights of both Q-Formers: the point-cloud Q-Former starts as a copy),
        language model and LM head are copied from BLIP-2 and stay frozen; BLIP-2's queries and language projection
        become the `image` modality's and initialise the three new modalities' (which train). LoRA adapters start
        at zero, so `modality="image"` reproduces BLIP-2's outputs exactly.

        Args:
            blip2_model_or_path: a `Blip2ForConditionalGeneration` or a local path / Hub id to load one from.
            point_bert_config: `PointBertConfig` fields (defaults: 384 x 12 blocks, 512 groups of 32).
            use_point_cloud_qformer: build the second Q-Former for point clouds (True in every released config).
            config_overrides: other `RegionBlipConfig` fields (`lora_rank`, `box_regression_loss_weight`, ...).
        """
        from transformers import Blip2ForConditionalGeneration

        if isinstance(blip2_model_or_path, (str, Path)):
            blip2 = Blip2ForConditionalGeneration.from_pretrained(blip2_model_or_path)
        elif isinstance(blip2_model_or_path, Blip2ForConditionalGeneration):
            blip2 = blip2_model_or_path
        else:
            raise TypeError(
                "`blip2_model_or_path` must be a Blip2ForConditionalGeneration or a path to one; got "
                f"{type(blip2_model_or_path).__name__}."
            )
        blip2_config = blip2.config
        qformer_config = blip2_config.qformer_config.to_dict()
        # transformers' BLIP-2 carries no Q-Former text side, so `[DEC]` only has to be a valid id of its vocabulary.
        config_overrides.setdefault(
            "qformer_decoder_start_token_id", min(30522, blip2_config.qformer_config.vocab_size - 1)
        )
        config = RegionBlipConfig(
            vision_config=blip2_config.vision_config.to_dict(),
            qformer_config=qformer_config,
            point_cloud_qformer_config=dict(qformer_config) if use_point_cloud_qformer else None,
            point_bert_config=point_bert_config,
            text_config=blip2_config.text_config.to_dict(),
            num_query_tokens=blip2_config.num_query_tokens,
            image_token_index=blip2_config.image_token_index,
            **config_overrides,
        )
        model = cls(config)
        model.load_blip2_weights(blip2)
        return model

    @torch.no_grad()
    def load_blip2_weights(self, blip2: PreTrainedModel) -> None:
        """Copy a `Blip2ForConditionalGeneration`'s weights into this model (see `from_blip2`)."""
        source = blip2.state_dict()
        llm_prefix = (
            "language_model.model." if not self.config.is_encoder_decoder_language_model else "language_model."
        )
        renames = [
            ("model.vision_tower.", "vision_model."),
            ("model.qformer.", "qformer."),
            ("model.point_cloud_qformer.", "qformer."),
            ("model.language_model.", llm_prefix),
            ("lm_head.", "language_model.lm_head."),
        ]
        target = self.state_dict()
        copied = 0
        for name, tensor in target.items():
            if ".lora_" in name:
                continue
            for prefix, source_prefix in renames:
                if name.startswith(prefix):
                    source_name = source_prefix + name[len(prefix) :].replace(".base_layer.", ".")
                    if source_name not in source and _QFORMER_TEXT_FFN.search(name):
                        # Blip2ForConditionalGeneration has no Q-Former text feed-forward (use_qformer_text_input
                        # off); it keeps its initialisation until a LAVIS checkpoint is converted in.
                        break
                    if source_name not in source:
                        raise ValueError(
                            f"BLIP-2 checkpoint lacks {source_name!r} (for {name!r}); from_blip2 needs a "
                            "Blip2ForConditionalGeneration with the same sub-model layout."
                        )
                    tensor.copy_(source[source_name])
                    copied += 1
                    break
        for modality in MODALITIES:
            self.model.query_tokens[modality].copy_(blip2.query_tokens)
            self.model.multi_modal_projector[modality].load_state_dict(blip2.language_projection.state_dict())
        if copied == 0:
            raise ValueError("No BLIP-2 weight matched; is this a Blip2ForConditionalGeneration?")
