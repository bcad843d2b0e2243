"""u-LLaVA: image/video chat, referring segmentation (`[SEG]`) and grounding (`[LOC]`) (Xu et al. 2024, sec. 3).

Data flow, in the order of this file:

1. Vision (section 3.1): `vision_tower` = transformers' CLIP vision model on the white-padded 224x224 image; the
   patch tokens of hidden state `vision_feature_layer` (-2, CLS dropped) go through `multi_modal_projector` and
   replace the `<image_patch>` tokens (256 between `<img_beg>` and `</img_end>`). A video of T frames gives T
   temporal tokens (mean over patches of each frame) followed by 256 spatial tokens (mean over frames of each
   patch), projected the same way, in place of the `<video_patch>` tokens.
2. Language model: `language_model` (Llama/Vicuna) + `lm_head`; the 11 u-LLaVA tokens are the last ids of its
   vocabulary (released layout).
3. Pixel head (section 3.2, "mask-aware tuning"): the LLM state of each `[SEG]` token (`seg_token_offset`:
   "previous" = the state of the token before it, as released; "self" = its own state) -> `seg_projector` (hidden ->
   hidden -> 256) -> one sparse prompt of SAM's `sam_mask_decoder` (dense prompt = `no_mask_embed`, single-mask
   output) on the `sam_vision_encoder` embedding of the SAM input (longest side 1024, padded) -> low-resolution
   mask logits -> upsampled to the SAM input, cropped to the resized image, resized to the ORIGINAL image size.
4. Region head (section 3.2, "region-aware tuning"): the state of each `[LOC]` token -> `loc_projector` (hidden ->
   hidden -> 256) -> `loc_head` (256 -> 256 -> 128 -> 4) -> 4 numbers -> a box by `config.loc_box_activation`
   (`decode_location`; default centre + size through a sigmoid, so every box is valid), normalized xyxy of the
   white-padded square image (released `pad_normalize_xyxy`: pixel + centring offset, divided by max(height, width)).
   A fresh decoder starts at `config.loc_prior_box` for every input.
5. Losses (eq. 3): CE (1.0) + mask BCE (2.0) + dice (0.5) + box L1 (1.0) + GIoU (1.0), every term in `loss_dict`.
6. LoRA (section 4.1, stage II "if LoRA is employed"; `LanguageModelLoraMixin`): `add_language_model_lora` puts LoRA
   on the LLM (released: r=8, alpha=16 on q/v) and keeps the modules stage II trains fully (projector, `seg_projector`,
   `loc_projector`, `loc_head`, SAM's mask decoder) as `modules_to_save`, so one PEFT adapter folder holds all of it;
   `merge_language_model_lora` folds it back into plain weights.

SAM parts are transformers' own modules (`SamVisionEncoder`, `SamPromptEncoder`, `SamMaskDecoder`), so converted
SAM weights keep transformers' SAM key names under `model.sam_*`.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.sam.modeling_sam import (
    SamMaskDecoder,
    SamPositionalEmbedding,
    SamPromptEncoder,
    SamVisionEncoder,
)
from transformers.utils import ModelOutput

from .box_ops import generalized_box_iou, validate_boxes
from .configuration_ullava import ULlavaConfig
from .language_lora import LanguageModelLoraMixin
from .mask_losses import bce_mask_loss, dice_loss
from .model_card_hook import ModelCardHookMixin
from .placeholder_tokens import suppress_placeholder_tokens

__all__ = [
    "ULlavaCausalLMOutputWithPast",
    "ULlavaForConditionalGeneration",
    "ULlavaModel",
    "ULlavaModelOutputWithPast",
    "ULlavaPrediction",
    "ULlavaPreTrainedModel",
    "decode_location",
    "encode_location",
    "order_box_corners",
    "sam_resized_size",
]

LOSS_TERMS = ("lm_loss", "mask_bce", "mask_dice", "box_l1", "box_giou")


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class ULlavaModelOutputWithPast(ModelOutput):
    """Output of `ULlavaModel.forward`.

    Args:
        last_hidden_state: `(B, L, hidden)` last LLM layer (after the final norm).
        past_key_values: the LLM's KV cache.
        hidden_states, attentions: the LLM's, when requested.
        image_hidden_states: `(num_images, num_image_tokens, hidden)` projected image tokens (None without images).
        video_hidden_states: `(num_videos, T + num_image_tokens, hidden)` projected video tokens (None without videos).
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    video_hidden_states: torch.FloatTensor | None = None


@dataclass
class ULlavaCausalLMOutputWithPast(ModelOutput):
    """Output of `ULlavaForConditionalGeneration.forward`.

    Args:
        loss: scalar, eq. (3): weighted sum of the `loss_dict` terms (only with `labels`).
        logits: `(B, L, vocab)` (`L` shortened by `logits_to_keep`).
        pred_masks: per sample, `(k_b, H_b, W_b)` float mask logits at the ORIGINAL image size, one per `[SEG]` token
            in order (k_b may be 0); None when no `[SEG]` was decoded (no `[SEG]` or no `sam_pixel_values`).
        pred_boxes: `(B, N, 4)` float boxes of the `[LOC]` tokens in order, normalized xyxy of the white-padded square
            image (`decode_location` of the decoder outputs: valid boxes with the default `"center_size"`), zero-padded;
            None without `[LOC]`.
        pred_boxes_mask: `(B, N)` bool, True on real boxes.
        loss_dict: detached unweighted terms `lm_loss`, `mask_bce`, `mask_dice`, `box_l1`, `box_giou` (0 when a term
            has no target in the batch; the keys are always the same).
        other fields: as in `ULlavaModelOutputWithPast`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    video_hidden_states: torch.FloatTensor | None = None
    pred_masks: list[torch.FloatTensor] | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_boxes_mask: torch.BoolTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


@dataclass
class ULlavaPrediction(ModelOutput):
    """Result of `ULlavaForConditionalGeneration.predict` on generated sequences.

    Args:
        masks: per sample, `(k_b, H_b, W_b)` bool masks at the ORIGINAL image size, one per generated `[SEG]`
            (`k_b = 0` when the answer has none).
        mask_logits: the same as float logits.
        boxes: per sample, `(n_b, 4)` float normalized xyxy (white-padded square frame) of each generated `[LOC]`,
            corners ordered (x1 <= x2, y1 <= y2) and clamped to [0, 1].
        rec_boxes: per sample, one `(4,)` normalized xyxy box fused by `config.rec_fusion` from the first `[LOC]`
            box and the first `[SEG]` mask's box, or None when neither exists.
    """

    masks: list[torch.BoolTensor] | None = None
    mask_logits: list[torch.FloatTensor] | None = None
    boxes: list[torch.FloatTensor] | None = None
    rec_boxes: list[torch.FloatTensor | None] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers


def sam_resized_size(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """Size of an image after SAM's `ResizeLongestSide(longest_side)`: `(round(h * s), round(w * s))`,
    `s = longest_side / max(h, w)` (rounded half up, as segment-anything and transformers' SAM processor)."""
    scale = longest_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def decode_location(raw: torch.Tensor, activation: str) -> torch.Tensor:
    """`(..., 4)` location-decoder outputs -> `(..., 4)` normalized xyxy boxes (white-padded square frame).

    `activation` (`config.loc_box_activation`):
        `"center_size"`: `(cx, cy, w, h) = sigmoid(raw)`, box `(cx - w/2, cy - h/2, cx + w/2, cy + h/2)`: x2 >= x1 and
            y2 >= y1 for every input, so GIoU always has a gradient; corners may pass the square's edge by up to w/2.
        `"sigmoid"`: `sigmoid(raw)` read as xyxy (in [0, 1]; corners may come out swapped).
        `"none"`: `raw` read as xyxy (released: unbounded, corners may come out swapped).
    """
    if activation == "center_size":
        center, size = raw[..., :2].sigmoid(), raw[..., 2:].sigmoid()
        return torch.cat([center - size / 2, center + size / 2], dim=-1)
    if activation == "sigmoid":
        return raw.sigmoid()
    if activation == "none":
        return raw
    raise ValueError(f"`activation` must be 'center_size', 'sigmoid' or 'none'; got {activation!r}.")


def encode_location(boxes: torch.Tensor, activation: str) -> torch.Tensor:
    """Inverse of `decode_location` for valid boxes: `(..., 4)` normalized xyxy strictly inside (0, 1) (x2 > x1,
    y2 > y1; width and height < 1) -> the `(..., 4)` decoder outputs that decode to them (used to set the prior)."""
    if activation == "center_size":
        center = (boxes[..., :2] + boxes[..., 2:]) / 2
        size = boxes[..., 2:] - boxes[..., :2]
        return torch.logit(torch.cat([center, size], dim=-1))
    if activation == "sigmoid":
        return torch.logit(boxes)
    if activation == "none":
        return boxes.clone()
    raise ValueError(f"`activation` must be 'center_size', 'sigmoid' or 'none'; got {activation!r}.")


def order_box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """`(..., 4)` boxes with corners in any order -> `(x_min, y_min, x_max, y_max)` (differentiable).

    The location decoder predicts 4 free numbers; GIoU and the outputs need valid xyxy boxes.
    """
    x_min = torch.minimum(boxes[..., 0], boxes[..., 2])
    x_max = torch.maximum(boxes[..., 0], boxes[..., 2])
    y_min = torch.minimum(boxes[..., 1], boxes[..., 3])
    y_max = torch.maximum(boxes[..., 1], boxes[..., 3])
    return torch.stack([x_min, y_min, x_max, y_max], dim=-1)


def mask_logits_to_box(mask_logits: torch.Tensor, threshold: float, height: int, width: int) -> torch.Tensor | None:
    """`(H, W)` logits at the original size -> the box of the foreground pixels, normalized xyxy of the white-padded
    square (pixel-edge convention: a mask over columns c0..c1 gives x1 = c0, x2 = c1 + 1); None if the mask is empty."""
    foreground = mask_logits > threshold
    if not bool(foreground.any()):
        return None
    rows = foreground.any(dim=1).nonzero().squeeze(1)
    cols = foreground.any(dim=0).nonzero().squeeze(1)
    box = torch.tensor(
        [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)], device=mask_logits.device
    )
    side = max(height, width)
    # Same centring as the processor's white padding (the odd pixel goes right / bottom).
    offset = torch.tensor([(side - width) // 2, (side - height) // 2] * 2, device=mask_logits.device)
    return (box + offset) / side


# ----------------------------------------------------------------------------------------------------------------
# Small modules


class ULlavaMultiModalProjector(nn.Module):
    """CLIP tokens `(..., C_vision)` -> LLM embeddings `(..., hidden)`: `"linear"` (released `vision_projector`) or
    `"mlp2x_gelu"` (Linear, GELU, Linear)."""

    def __init__(self, config: ULlavaConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, hidden_size)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(vision_tokens)
        if hasattr(self, "linear_2"):
            hidden = self.linear_2(self.act(hidden))
        return hidden


def _two_layer_projector(hidden_size: int, out_dim: int) -> nn.Sequential:
    """Linear(hidden, hidden) -> ReLU -> Linear(hidden, out) -> Dropout(0): released `seg_projector` / `det_projector`
    (indices 0 and 2 hold the weights, as in the released key names)."""
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out_dim), nn.Dropout(0.0)
    )


def _location_head(in_dim: int, hidden_sizes: tuple[int, ...]) -> nn.Sequential:
    """MLP in_dim -> hidden_sizes... -> 4 with ReLU between (released `det_decoder`: 256 -> 256 -> 128 -> 4)."""
    layers: list[nn.Module] = []
    width = in_dim
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model


class ULlavaPreTrainedModel(ModelCardHookMixin, PreTrainedModel):
    """Shared class attributes and weight init of the u-LLaVA models."""

    config: ULlavaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "SamVisionLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SamPositionalEmbedding):
            # SAM's random Fourier features: normal with std `scale`, as transformers' SamPreTrainedModel does.
            init.normal_(module.positional_embedding, std=module.scale)
        loc_head = getattr(self, "loc_head", None)
        if loc_head is not None and module is loc_head[-1]:
            # Zero biases would start every box at the point (0.5, 0.5, 0.5, 0.5), where GIoU has no gradient and
            # x1/x2 swap from sample to sample; start at a valid prior box instead (DETR-style reference box).
            prior = torch.tensor(self.config.loc_prior_box, dtype=torch.float32)
            init.copy_(module.bias, encode_location(prior, self.config.loc_box_activation).to(module.bias.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Input checks


def _check_pixel_values(pixel_values: Any, name: str, leading: str, size: int, channels: int = 3) -> None:
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError(
            f"`{name}` must be a float tensor ({leading}, {channels}, {size}, {size}) from ULlavaProcessor; got "
            f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}."
        )
    expected_ndim = 4 if leading == "num_images" else 5
    if pixel_values.ndim != expected_ndim or tuple(pixel_values.shape[-3:]) != (channels, size, size):
        raise ValueError(
            f"`{name}` must have shape ({leading}, {channels}, {size}, {size}) (built by ULlavaProcessor for this "
            f"config); got {tuple(pixel_values.shape)}."
        )


def _token_positions(input_ids: torch.LongTensor, token_id: int) -> list[torch.Tensor]:
    """Per sample, the positions of `token_id` in order."""
    return [(row == token_id).nonzero().squeeze(1) for row in input_ids]


# ----------------------------------------------------------------------------------------------------------------
# Base model


class ULlavaModel(ULlavaPreTrainedModel):
    """u-LLaVA without heads: CLIP vision tower, projector, LLM, and the SAM vision encoder / prompt encoder / mask
    decoder used by the `[SEG]` head."""

    def __init__(self, config: ULlavaConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = ULlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        sam_config = config.sam_config
        # SAM's attention picks its kernel from the sub-config; eager keeps CPU and GPU numerics identical.
        sam_config.mask_decoder_config._attn_implementation = "eager"
        self.sam_vision_encoder = SamVisionEncoder(sam_config.vision_config)
        self.sam_prompt_encoder = SamPromptEncoder(sam_config)
        self.sam_mask_decoder = SamMaskDecoder(sam_config.mask_decoder_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ---- 1. vision ------------------------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, S, S)` CLIP-normalized images -> `(N, grid^2, C_vision)` patch tokens of `vision_feature_layer`."""
        dtype = next(self.vision_tower.parameters()).dtype
        outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        hidden = outputs.hidden_states[self.config.vision_feature_layer]
        return hidden[:, -self.config.num_image_tokens :]

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """transformers' VLM convention: `pooler_output` = projected image tokens `(N, num_image_tokens, hidden)`,
        `last_hidden_state` = the CLIP patch tokens `(N, num_image_tokens, C_vision)`."""
        _check_pixel_values(pixel_values, "pixel_values", "num_images", self.config.image_size)
        tokens = self.encode_images(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=self.multi_modal_projector(tokens))

    def get_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """`(V, T, 3, S, S)` frames -> `(V, T + num_image_tokens, hidden)`: T temporal tokens (mean over the patches
        of each frame), then the spatial tokens (mean over frames of each patch), projected (section 3.1)."""
        _check_pixel_values(
            pixel_values_videos, "pixel_values_videos", "num_videos, num_frames", self.config.image_size
        )
        num_videos, num_frames = pixel_values_videos.shape[:2]
        if num_frames != self.config.num_video_frames:
            raise ValueError(
                f"`pixel_values_videos` has {num_frames} frames per video but the model takes "
                f"num_video_frames={self.config.num_video_frames}; ULlavaProcessor samples that many frames "
                "uniformly from any clip."
            )
        tokens = self.encode_images(pixel_values_videos.flatten(0, 1))
        tokens = tokens.reshape(num_videos, num_frames, *tokens.shape[1:])
        temporal = tokens.mean(dim=2)
        spatial = tokens.mean(dim=1)
        return self.multi_modal_projector(torch.cat([temporal, spatial], dim=1))

    def _scatter_visual_tokens(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor | None,
        token_id: int,
        tokens_per_item: int,
        name: str,
        token: str,
    ) -> torch.Tensor:
        placeholder = input_ids == token_id
        counts = placeholder.sum(1)
        num_items = 0 if features is None else features.shape[0]
        if bool((counts % tokens_per_item != 0).any()) or int(counts.sum()) != num_items * tokens_per_item:
            raise ValueError(
                f"The prompts hold {counts.tolist()} `{token}` tokens per sample but `{name}` gives {num_items} "
                f"item(s) of {tokens_per_item} tokens each; every item needs exactly {tokens_per_item} `{token}` "
                "tokens in order. Build the text and inputs together with ULlavaProcessor."
            )
        if num_items == 0:
            return inputs_embeds
        return inputs_embeds.masked_scatter(placeholder.unsqueeze(-1), features.to(inputs_embeds.dtype))

    # ---- 2. language model -----------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> ULlavaModelOutputWithPast:
        """Embed text, write image/video tokens into their placeholders, run the LLM.

        Args:
            input_ids: `(B, L)` token ids; an image is `<img_beg>` + `num_image_tokens` x `<image_patch>` +
                `</img_end>`, a video `<vid_beg>` + `(T + num_image_tokens)` x `<video_patch>` + `</vid_end>`.
            pixel_values: `(num_images, 3, S, S)` CLIP inputs, one per image in the batch in order of appearance
                (sample by sample), S = `config.image_size`.
            pixel_values_videos: `(num_videos, T, 3, S, S)`, T = `config.num_video_frames`.
            attention_mask: `(B, past + L)`; position_ids default to `cumsum(attention_mask) - 1` (left padding).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass `input_ids` (a prompt from ULlavaProcessor) or `inputs_embeds`.")
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("Pass either `input_ids` or `inputs_embeds`, not both.")
        image_features = video_features = None
        if inputs_embeds is not None and (pixel_values is not None or pixel_values_videos is not None):
            raise ValueError(
                "With `pixel_values` / `pixel_values_videos`, pass `input_ids` (not `inputs_embeds`): the visual "
                "tokens are written at the `<image_patch>` / `<video_patch>` ids."
            )
        if inputs_embeds is None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
                raise ValueError(
                    f"`input_ids` must be a (batch, seq_len) int tensor; got "
                    f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}."
                )
            vocab = self.config.text_config.vocab_size
            if bool(((input_ids < 0) | (input_ids >= vocab)).any()):
                raise ValueError(
                    f"`input_ids` holds ids outside the vocabulary [0, {vocab}); use ULlavaProcessor's tokenizer."
                )
            inputs_embeds = self.get_input_embeddings()(input_ids)
            is_decode_step = past_key_values is not None and past_key_values.get_seq_length() > 0
            if pixel_values is not None or not is_decode_step:
                if pixel_values is not None:
                    image_features = self.get_image_features(pixel_values).pooler_output
                inputs_embeds = self._scatter_visual_tokens(
                    input_ids,
                    inputs_embeds,
                    image_features,
                    self.config.image_patch_token_id,
                    self.config.num_image_tokens,
                    "pixel_values",
                    "<image_patch>",
                )
            if pixel_values_videos is not None or not is_decode_step:
                if pixel_values_videos is not None:
                    video_features = self.get_video_features(pixel_values_videos)
                inputs_embeds = self._scatter_visual_tokens(
                    input_ids,
                    inputs_embeds,
                    video_features,
                    self.config.video_patch_token_id,
                    self.config.num_video_tokens,
                    "pixel_values_videos",
                    "<video_patch>",
                )
        seq_len = inputs_embeds.shape[1]
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != inputs_embeds.shape[0]:
                raise ValueError(
                    f"`attention_mask` must be a 2-D (batch, seq_len) mask; got {tuple(attention_mask.shape)}."
                )
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return ULlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            video_hidden_states=video_features,
        )

    # ---- 3. SAM ----------------------------------------------------------------------------------------------------

    def get_sam_image_embeddings(self, sam_pixel_values: torch.Tensor) -> torch.Tensor:
        """`(N, 3, S_sam, S_sam)` SAM inputs (longest side resized to S_sam, padded bottom/right) -> `(N, C, g, g)`
        image embeddings, `g = S_sam / sam patch size` (64 for SAM ViT-H at 1024)."""
        _check_pixel_values(sam_pixel_values, "sam_pixel_values", "num_images", self.config.sam_image_size)
        dtype = next(self.sam_vision_encoder.parameters()).dtype
        return self.sam_vision_encoder(sam_pixel_values.to(dtype)).last_hidden_state

    def sam_image_positional_embeddings(self) -> torch.Tensor:
        """`(1, C, g, g)` dense positional encoding of the SAM embedding grid (cell centres), as `SamModel` builds it
        from the prompt encoder's shared random Fourier features."""
        size = self.config.sam_config.prompt_encoder_config.image_embedding_size
        weight = self.sam_prompt_encoder.shared_embedding.positional_embedding
        grid = torch.ones((size, size), device=weight.device, dtype=weight.dtype)
        y_embed = (grid.cumsum(dim=0) - 0.5) / size
        x_embed = (grid.cumsum(dim=1) - 0.5) / size
        embedding = self.sam_prompt_encoder.shared_embedding(torch.stack([x_embed, y_embed], dim=-1))
        return embedding.permute(2, 0, 1).unsqueeze(0)

    def decode_masks(self, image_embedding: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """One image, k prompts -> `(k, 4g, 4g)` low-resolution mask logits (SAM single-mask output).

        Args:
            image_embedding: `(C, g, g)` from `get_sam_image_embeddings`.
            prompt_embeddings: `(k, C)` projected `[SEG]` states, each one sparse prompt token.
        """
        num_prompts = prompt_embeddings.shape[0]
        dense = self.sam_prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, *image_embedding.shape[-2:]
        )
        sparse = prompt_embeddings.reshape(1, num_prompts, 1, -1).to(image_embedding.dtype)
        masks, _ = self.sam_mask_decoder(
            image_embeddings=image_embedding.unsqueeze(0),
            image_positional_embeddings=self.sam_image_positional_embeddings().to(image_embedding.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(image_embedding.dtype),
            multimask_output=False,
        )
        return masks[0, :, 0]

    def postprocess_masks(self, low_res_masks: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """`(k, h, w)` low-resolution logits -> `(k, H, W)` logits at the original image size: bilinear to the SAM
        input, crop the resized (unpadded) image, bilinear to `original_size = (H, W)` (SAM's `postprocess_masks`)."""
        side = self.config.sam_image_size
        height, width = original_size
        resized_height, resized_width = sam_resized_size(height, width, side)
        masks = nn.functional.interpolate(
            low_res_masks.unsqueeze(1).float(), size=(side, side), mode="bilinear", align_corners=False
        )
        masks = masks[..., :resized_height, :resized_width]
        masks = nn.functional.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        return masks[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# Head


def _final_states_of_generation(generated_hidden_states: Any, sequences: torch.LongTensor) -> torch.Tensor:
    """`(B, L_total - 1, hidden)` final LLM states of `sequences` from `generate`'s per-step hidden states: the
    prefill's over the prompt, then one per decode step (the last generated token is never fed back)."""
    if not isinstance(generated_hidden_states, (tuple, list)) or not generated_hidden_states:
        raise TypeError(
            "`generated_hidden_states` must be the `hidden_states` of `generate(..., output_hidden_states=True, "
            f"return_dict_in_generate=True)`; got {type(generated_hidden_states).__name__}."
        )
    states = torch.cat([step[-1] for step in generated_hidden_states], dim=1)
    if states.shape[0] != sequences.shape[0] or states.shape[1] != sequences.shape[1] - 1:
        raise ValueError(
            f"`generated_hidden_states` cover {states.shape[1]} positions of {states.shape[0]} sequences, but "
            f"`sequences` {tuple(sequences.shape)} needs {sequences.shape[1] - 1}; pass the `sequences` and "
            "`hidden_states` of the same `generate` call."
        )
    return states


class ULlavaForConditionalGeneration(LanguageModelLoraMixin, ULlavaPreTrainedModel, GenerationMixin):
    """u-LLaVA with `lm_head`, the `[SEG]` mask head (`seg_projector` + SAM) and the `[LOC]` box head
    (`loc_projector` + `loc_head`).

    Released key names (`OPPOMKLab/u-LLaVA` HEAD) map as: `llm.model.*` -> `model.language_model.*`,
    `llm.lm_head` -> `lm_head`, `llm.vision_encoder.*` -> `model.vision_tower.*`, `llm.vision_projector` ->
    `model.multi_modal_projector.linear_1`, `seg_projector.*` (old checkpoints: `text_hidden_fcs.0.*`) ->
    `seg_projector.*`, `det_projector.*` -> `loc_projector.*`, `det_decoder.*` -> `loc_head.*`,
    `visual_model.{image_encoder,prompt_encoder,mask_decoder}` -> `model.sam_{vision_encoder,prompt_encoder,
    mask_decoder}` (after transformers' SAM key conversion).
    """

    _tied_weights_keys: dict[str, str] = {}
    # LoRA (`add_language_model_lora`): LoRA inside the LLM; the modules stage II trains fully are saved with the
    # adapter (the released LoRA run also trains `lm_head` and the embeddings fully; here the base LLM stays frozen).
    language_model_prefix: ClassVar[str] = "model.language_model"
    lora_modules_to_save: ClassVar[tuple[str, ...]] = (
        "model.multi_modal_projector",
        "seg_projector",
        "loc_projector",
        "loc_head",
        "model.sam_mask_decoder",
    )

    def __init__(self, config: ULlavaConfig):
        super().__init__(config)
        self.model = ULlavaModel(config)
        hidden_size = config.text_config.hidden_size
        self.lm_head = nn.Linear(hidden_size, config.text_config.vocab_size, bias=False)
        self.seg_projector = _two_layer_projector(hidden_size, config.sam_prompt_dim)
        self.loc_projector = _two_layer_projector(hidden_size, config.loc_projector_dim)
        self.loc_head = _location_head(config.loc_projector_dim, config.loc_head_hidden_sizes)
        self.loss_type = "ForCausalLM"
        self.post_init()
        suppress_placeholder_tokens(
            self, [config.image_patch_token_id, config.video_patch_token_id, config.new_token_id("[PAD]")]
        )

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    # ---- special-token states ----------------------------------------------------------------------------------

    def _special_states(
        self, input_ids: torch.LongTensor, hidden_states: torch.Tensor, token_id: int
    ) -> tuple[list[torch.Tensor], list[int]]:
        """Per sample, `(k_b, hidden)` LLM states contributed by each occurrence of `token_id` (in order) under
        `config.seg_token_offset`; also the counts `k_b`."""
        shift = 1 if self.config.seg_token_offset == "previous" else 0
        states, counts = [], []
        for row, positions in enumerate(_token_positions(input_ids, token_id)):
            if bool((positions - shift < 0).any()):
                raise ValueError(
                    "A `[SEG]`/`[LOC]` token is the first token of a sequence, but seg_token_offset='previous' reads "
                    "the state of the token before it; put the special tokens in the answer."
                )
            states.append(hidden_states[row, positions - shift])
            counts.append(int(positions.numel()))
        return states, counts

    def _image_rows(self, input_ids: torch.LongTensor) -> list[int | None]:
        """Index into `pixel_values` / `sam_pixel_values` of each sample's (first) image; None without an image."""
        counts = (input_ids == self.config.image_patch_token_id).sum(1) // self.config.num_image_tokens
        rows, next_row = [], 0
        for count in counts.tolist():
            rows.append(next_row if count > 0 else None)
            next_row += count
        return rows

    def _predict_masks(
        self,
        input_ids: torch.LongTensor,
        hidden_states: torch.Tensor,
        sam_pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        states, counts = self._special_states(input_ids, hidden_states, self.config.seg_token_id)
        image_rows = self._image_rows(input_ids)
        if image_sizes is None:
            raise ValueError(
                "`image_sizes` (num_images, 2) original (height, width) is required with `sam_pixel_values`: masks "
                "are returned at the original image size. ULlavaProcessor returns it."
            )
        if tuple(image_sizes.shape) != (sam_pixel_values.shape[0], 2):
            raise ValueError(
                f"`image_sizes` must have shape (num_images={sam_pixel_values.shape[0]}, 2); got "
                f"{tuple(image_sizes.shape)}."
            )
        needed = sorted({row for row, count in zip(image_rows, counts) if count and row is not None})
        embeddings = {}
        if needed:
            computed = self.model.get_sam_image_embeddings(sam_pixel_values[needed])
            embeddings = dict(zip(needed, computed))
        masks = []
        for sample, (sample_states, count, row) in enumerate(zip(states, counts, image_rows)):
            if count == 0:
                height, width = (0, 0) if row is None else (int(v) for v in image_sizes[row])
                masks.append(hidden_states.new_zeros(0, height, width, dtype=torch.float32))
                continue
            if row is None:
                raise ValueError(
                    f"Sample {sample} has {count} `[SEG]` token(s) but no image (`<image_patch>` tokens); a mask "
                    "needs an image. Pass the image with the text through ULlavaProcessor."
                )
            prompts = self.seg_projector(sample_states)
            low_res = self.model.decode_masks(embeddings[row], prompts)
            height, width = (int(v) for v in image_sizes[row])
            masks.append(self.model.postprocess_masks(low_res, (height, width)))
        return masks

    def _run_heads(
        self,
        input_ids: torch.LongTensor,
        hidden_states: torch.Tensor,
        sam_pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None, torch.BoolTensor | None]:
        """Mask head on the `[SEG]` states (when `sam_pixel_values` are given) and box head on the `[LOC]` states of
        `hidden_states (B, >= L - 1, hidden)`, the final LLM states of `input_ids (B, L)`; None where a sequence has
        no such token."""
        pred_masks = pred_boxes = pred_boxes_mask = None
        if sam_pixel_values is not None and bool((input_ids == self.config.seg_token_id).any()):
            pred_masks = self._predict_masks(input_ids, hidden_states, sam_pixel_values, image_sizes)
        if bool((input_ids == self.config.loc_token_id).any()):
            pred_boxes, pred_boxes_mask = self._predict_boxes(input_ids, hidden_states)
        return pred_masks, pred_boxes, pred_boxes_mask

    def _predict_boxes(
        self, input_ids: torch.LongTensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.BoolTensor]:
        states, counts = self._special_states(input_ids, hidden_states, self.config.loc_token_id)
        flat = torch.cat(states)
        boxes = decode_location(self.loc_head(self.loc_projector(flat)), self.config.loc_box_activation)
        batch_size, max_count = input_ids.shape[0], max(counts)
        padded = boxes.new_zeros(batch_size, max_count, 4)
        mask = torch.zeros(batch_size, max_count, dtype=torch.bool, device=boxes.device)
        for sample, count in enumerate(counts):
            mask[sample, :count] = True
        padded = padded.masked_scatter(mask.unsqueeze(-1), boxes.float())
        return padded, mask

    # ---- losses ------------------------------------------------------------------------------------------------

    def _mask_losses(
        self, pred_masks: list[torch.Tensor] | None, seg_masks: Any, input_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over all masks of the batch of BCE (per-pixel mean) and dice, at the original image size."""
        if not isinstance(seg_masks, (list, tuple)) or len(seg_masks) != input_ids.shape[0]:
            raise ValueError(
                f"`seg_masks` must be a list with one (k_b, H_b, W_b) tensor per sample ({input_ids.shape[0]}), k_b "
                "= number of `[SEG]` tokens of sample b (0 allowed); ULlavaProcessor builds it from `ground_masks`."
            )
        counts = (input_ids == self.config.seg_token_id).sum(1).tolist()
        total = sum(int(target.shape[0]) for target in seg_masks if target is not None)
        zero = self.lm_head.weight.new_zeros(())
        if total == 0:
            return zero, zero
        bce, dice = zero, zero
        for sample, (target, count) in enumerate(zip(seg_masks, counts)):
            num_targets = 0 if target is None else int(target.shape[0])
            if num_targets == 0:
                continue
            if num_targets != count:
                raise ValueError(
                    f"`seg_masks[{sample}]` holds {num_targets} mask(s) but sample {sample} has {count} `[SEG]` "
                    "token(s); give one ground-truth mask per `[SEG]`, in order."
                )
            logits = pred_masks[sample]
            if tuple(target.shape[-2:]) != tuple(logits.shape[-2:]):
                raise ValueError(
                    f"`seg_masks[{sample}]` has size {tuple(target.shape[-2:])} but the image is "
                    f"{tuple(logits.shape[-2:])} (`image_sizes`); masks must be at the original image size."
                )
            target = target.to(device=logits.device, dtype=logits.dtype)
            bce = bce + bce_mask_loss(logits, target, num_masks=total)
            dice = dice + dice_loss(logits, target, num_masks=total)
        return bce, dice

    def _box_losses(
        self,
        pred_boxes: torch.Tensor | None,
        pred_boxes_mask: torch.Tensor | None,
        loc_boxes: Any,
        loc_boxes_mask: Any,
        input_ids: torch.LongTensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 (mean over boxes and coordinates) and 1 - GIoU (mean over boxes) between the `[LOC]` boxes (corners
        ordered) and the targets, both normalized xyxy of the white-padded square."""
        zero = self.lm_head.weight.new_zeros(())
        if not isinstance(loc_boxes, torch.Tensor) or loc_boxes.ndim != 3 or loc_boxes.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"`loc_boxes` must be a (batch={input_ids.shape[0]}, N, 4) float tensor of normalized xyxy boxes; got "
                f"{tuple(loc_boxes.shape) if isinstance(loc_boxes, torch.Tensor) else type(loc_boxes).__name__}."
            )
        if loc_boxes_mask is None:
            loc_boxes_mask = torch.ones(loc_boxes.shape[:2], dtype=torch.bool, device=loc_boxes.device)
        loc_boxes_mask = loc_boxes_mask.bool()
        targets = loc_boxes[loc_boxes_mask]
        validate_boxes(targets, "loc_boxes", fmt="xyxy")
        counts = (input_ids == self.config.loc_token_id).sum(1).to(loc_boxes_mask.device)
        if not torch.equal(loc_boxes_mask.sum(1), counts):
            raise ValueError(
                f"`loc_boxes` gives {loc_boxes_mask.sum(1).tolist()} box(es) per sample but the text has "
                f"{counts.tolist()} `[LOC]` token(s); give one ground-truth box per `[LOC]`, in order."
            )
        if targets.shape[0] == 0:
            return zero, zero
        predictions = order_box_corners(pred_boxes[pred_boxes_mask])
        targets = targets.to(predictions)
        l1 = (predictions - targets).abs().mean()
        giou = torch.diagonal(generalized_box_iou(predictions, targets, validate=False))
        return l1, (1 - giou).mean()

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        sam_pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        seg_masks: list[torch.Tensor] | None = None,
        loc_boxes: torch.FloatTensor | None = None,
        loc_boxes_mask: torch.BoolTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> ULlavaCausalLMOutputWithPast:
        """Chat over images/videos, with mask and box heads on the `[SEG]`/`[LOC]` tokens of the sequence.

        Args:
            input_ids: `(B, L)` ids from `ULlavaProcessor` (see `ULlavaModel.forward` for the visual placeholders).
            pixel_values: `(num_images, 3, S, S)` white-padded square CLIP inputs, S = `config.image_size`.
            pixel_values_videos: `(num_videos, T, 3, S, S)`.
            sam_pixel_values: `(num_images, 3, S_sam, S_sam)` SAM inputs (rows aligned with `pixel_values`), needed to
                decode `[SEG]` masks; `image_sizes`: `(num_images, 2)` original (height, width) of those images.
            attention_mask, position_ids, past_key_values, use_cache: as for a causal LM.
            labels: `(B, L)` next-token targets (-100 on the prompt).
            seg_masks: per sample a `(k_b, H_b, W_b)` {0, 1} tensor at the original image size, one mask per `[SEG]`
                token of the sample (k_b = 0 / None for samples without mask targets).
            loc_boxes, loc_boxes_mask: `(B, N, 4)` normalized xyxy targets (white-padded square frame) and `(B, N)`
                bool, one box per `[LOC]` token in order.
            logits_to_keep: compute logits for the last `logits_to_keep` positions only (0 = all).

        The heads run on full sequences only (no KV cache yet): in training, and in `predict` after `generate`.

        Returns:
            `ULlavaCausalLMOutputWithPast` (see its docstring).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        is_decode_step = past_key_values is not None and past_key_values.get_seq_length() > 0
        if input_ids is not None and pixel_values is None and pixel_values_videos is None and not is_decode_step:
            has_seg = bool((input_ids == self.config.seg_token_id).any())
            if has_seg and (seg_masks is not None or sam_pixel_values is not None):
                raise ValueError(
                    "The text holds `[SEG]` but no image was given (`pixel_values` is None); a mask needs an image: "
                    "pass `images=` to ULlavaProcessor together with the text."
                )
        if input_ids is not None and pixel_values is not None and sam_pixel_values is not None:
            if sam_pixel_values.shape[0] != pixel_values.shape[0]:
                raise ValueError(
                    f"`sam_pixel_values` has {sam_pixel_values.shape[0]} images but `pixel_values` has "
                    f"{pixel_values.shape[0]}; both come from the same images (ULlavaProcessor)."
                )
        if labels is not None and input_ids is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}; got {tuple(labels.shape)}."
            )

        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))

        pred_masks = pred_boxes = pred_boxes_mask = None
        if input_ids is not None and not is_decode_step:
            has_seg = sam_pixel_values is not None and bool((input_ids == self.config.seg_token_id).any())
            if has_seg and pixel_values is None:
                raise ValueError("`sam_pixel_values` need `pixel_values` of the same images.")
            if not has_seg and seg_masks is not None and any(t is not None and t.shape[0] for t in seg_masks):
                raise ValueError(
                    "`seg_masks` need `sam_pixel_values` (the SAM inputs of the images) to predict masks; "
                    "ULlavaProcessor returns them with `images=`."
                )
            pred_masks, pred_boxes, pred_boxes_mask = self._run_heads(
                input_ids, hidden_states, sam_pixel_values, image_sizes
            )

        loss, loss_dict = None, None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
            zero = lm_loss.new_zeros(())
            bce = dice = l1 = giou = zero
            if seg_masks is not None:
                bce, dice = self._mask_losses(pred_masks, seg_masks, input_ids)
            if loc_boxes is not None:
                l1, giou = self._box_losses(pred_boxes, pred_boxes_mask, loc_boxes, loc_boxes_mask, input_ids)
            config = self.config
            loss = (
                config.ce_loss_weight * lm_loss
                + config.bce_loss_weight * bce
                + config.dice_loss_weight * dice
                + config.l1_loss_weight * l1
                + config.giou_loss_weight * giou
            )
            loss_dict = {
                name: value.detach() for name, value in zip(LOSS_TERMS, (lm_loss, bce, dice, l1, giou), strict=True)
            }

        return ULlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            video_hidden_states=outputs.video_hidden_states,
            pred_masks=pred_masks,
            pred_boxes=pred_boxes,
            pred_boxes_mask=pred_boxes_mask,
            loss_dict=loss_dict,
        )

    # ---- after generation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self,
        sequences: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        sam_pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        generated_hidden_states: tuple | None = None,
        **kwargs: Any,
    ) -> ULlavaPrediction:
        """Run the mask and box heads on the `[SEG]`/`[LOC]` tokens of generated sequences.

        One teacher-forced pass over `sequences` (prompt + answer, as `generate` returns them) gives the same LLM
        states as generation did (causal attention), so the masks and boxes belong to the generated answer. Pass
        `generated_hidden_states` to skip that pass: the heads then read the states generation computed.

        Args:
            sequences: `(B, L_total)` output of `generate`.
            pixel_values, sam_pixel_values, image_sizes, pixel_values_videos: the processor outputs of the prompt.
            attention_mask: `(B, L_prompt)` prompt mask (extended with ones over the generated tokens) or
                `(B, L_total)`.
            generated_hidden_states: `outputs.hidden_states` of `generate(..., output_hidden_states=True,
                return_dict_in_generate=True)` (per step, per layer), whose `sequences` are passed. The LLM and its
                vision tower do not run again (the SAM encoder still does, for masks). Needs
                `config.seg_token_offset="previous"` (the released setting): the state of the last generated token
                is never computed; with "current" the teacher-forced pass runs as without it.

        Returns:
            `ULlavaPrediction`: masks at the original image size, boxes normalized xyxy (white-padded square frame)
            and one fused REC box per sample (`config.rec_fusion`). `processor.post_process_segmentation` /
            `post_process_grounding` turn them into original-image pixels.
        """
        if attention_mask is not None and attention_mask.shape[1] < sequences.shape[1]:
            extra = attention_mask.new_ones(attention_mask.shape[0], sequences.shape[1] - attention_mask.shape[1])
            attention_mask = torch.cat([attention_mask, extra], dim=1)
        if generated_hidden_states is not None and self.config.seg_token_offset == "previous":
            states = _final_states_of_generation(generated_hidden_states, sequences)
            pred_masks, pred_boxes, pred_boxes_mask = self._run_heads(sequences, states, sam_pixel_values, image_sizes)
        else:
            outputs = self(
                input_ids=sequences,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                sam_pixel_values=sam_pixel_values,
                image_sizes=image_sizes,
                attention_mask=attention_mask,
                use_cache=False,
                logits_to_keep=1,
                **kwargs,
            )
            pred_masks, pred_boxes, pred_boxes_mask = outputs.pred_masks, outputs.pred_boxes, outputs.pred_boxes_mask
        batch_size = sequences.shape[0]
        threshold = self.config.mask_threshold
        image_rows = self._image_rows(sequences)
        mask_logits = pred_masks
        if mask_logits is None:
            # No [SEG] was generated: an empty (0, H, W) stack per sample keeps the per-sample layout.
            mask_logits = []
            for row in image_rows:
                height, width = (0, 0) if row is None or image_sizes is None else (int(v) for v in image_sizes[row])
                mask_logits.append(torch.zeros(0, height, width, device=sequences.device))
        boxes: list[torch.Tensor] = []
        for sample in range(batch_size):
            if pred_boxes is None:
                boxes.append(sequences.new_zeros(0, 4, dtype=torch.float32))
            else:
                sample_boxes = pred_boxes[sample][pred_boxes_mask[sample]]
                boxes.append(order_box_corners(sample_boxes).clamp(0.0, 1.0))
        rec_boxes: list[torch.Tensor | None] = []
        for sample in range(batch_size):
            box = boxes[sample][0] if boxes[sample].shape[0] else None
            mask_box = None
            if mask_logits[sample].shape[0] and image_rows[sample] is not None:
                height, width = (int(v) for v in image_sizes[image_rows[sample]])
                mask_box = mask_logits_to_box(mask_logits[sample][0], threshold, height, width)
            fusion = self.config.rec_fusion
            if fusion == "mask" and mask_box is not None:
                fused = mask_box
            elif fusion == "mean" and mask_box is not None and box is not None:
                fused = (box + mask_box.to(box)) / 2
            else:
                fused = box if box is not None else mask_box
            rec_boxes.append(fused)
        return ULlavaPrediction(
            masks=[logits > threshold for logits in mask_logits],
            mask_logits=mask_logits,
            boxes=boxes,
            rec_boxes=rec_boxes,
        )

    # ---- generation --------------------------------------------------------------------------------------------

    _PREFILL_ONLY_INPUTS = (
        "pixel_values",
        "pixel_values_videos",
        "sam_pixel_values",
        "image_sizes",
        "seg_masks",
        "loc_boxes",
        "loc_boxes_mask",
    )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Visual inputs go to the prefill step only (or to every step without a KV cache)."""
        visual_inputs = {name: kwargs.pop(name, None) for name in self._PREFILL_ONLY_INPUTS}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        for name in self._PREFILL_ONLY_INPUTS:
            model_inputs.pop(name, None)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update({name: value for name, value in visual_inputs.items() if value is not None})
        # The SAM encoder is not needed while generating: masks come from `predict` after `generate`.
        for name in ("sam_pixel_values", "seg_masks", "loc_boxes", "loc_boxes_mask"):
            model_inputs.pop(name, None)
        return model_inputs
