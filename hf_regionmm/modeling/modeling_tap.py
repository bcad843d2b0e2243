"""TAP-v2's promptable tokenizer: prompt (points, box, sketch) -> 4 masks + 9 tokens -> concept + caption.

Pan et al. 2025, "Consistent multimodal pre-training for visual tokenization", section 3.1 (Figures 4-5) and 3.3.
Data flow, in the order of this file:

1. Image encoder (`TapVisionEncoder`): a ViT whose blocks all attend inside non-overlapping 16x16 windows with an
   index-based relative-position bias (one `(heads, 31 * 31)` table per block, read through a stored index); SAM's
   global attention is replaced by residual 3x3 bottleneck conv blocks after blocks `k * depth / 4 - 1`, which
   exchange information across windows; a 1x1 + 3x3 conv neck (BatchNorm, not SyncBatchNorm) gives a
   `(batch, 256, 64, 64)` map for a 1024-pixel input.
2. Prompt encoder (`TapPromptEncoder`): every prompt is a set of labelled points in the padded model frame
   (0 negative, 1 positive, 2/3 box corners, 4 padding); a random Fourier feature of `(x + 0.5) / image_size` plus a
   learned label embedding. There is no mask-embedding path (section 3.1: mask prompts from a previous stage are not
   fed back).
3. Image decoder (`TapImageDecoder`): transformers' SAM two-way transformer on the tokens `[4 semantic, 1 IoU,
   4 mask, prompt points]`; hypernetwork MLPs turn the mask tokens into 4 masks at 4x the feature grid, an MLP turns
   the IoU token into 4 IoU scores. Routing (section 3.3 "Mask selection"): a box prompt takes output 0, point and
   sketch prompts take the best of outputs 1-3 by predicted IoU; the semantic token of the same output is kept.
4. Concept head (`TapConceptHead`, eq. 2): semantic token -> 3-layer MLP (256 -> 1024 -> 1024 -> 1024) -> cosine
   similarity with a bank of concept text embeddings x `1 / tau`. The bank is a buffer saved in safetensors and
   swappable with `TapModel.set_concept_bank`.
5. Text decoder (`TapTextDecoder`, Figure 5): the semantic token, projected to 512-d, is the first position of a
   pre-LN causal transformer with interleaved rotary embeddings, followed by BOS and the caption; greedy decoding
   with a key/value cache (`TapModel.generate_captions`).
6. Losses (section 3.1 "Pre-training loss"): `L = L_concept + alpha * L_seg + beta * L_cap` with the concept KL,
   focal:dice = 20:1 (+ SAM's IoU MSE) and caption cross-entropy, every term reported in `loss_dict`.
7. TAP-v2-Chat (section 3.2, Figure 6; end of the file): the same image encoder without its neck, a projector of
   residual 3x3 conv blocks (zero-initialized last layer), a 2x2 token merge and a two-layer MLP, and an LLM
   (Phi-2) whose `<image>` slots receive the `(grid / 2)^2` visual tokens (`TapChatForConditionalGeneration`).
   The LLM is tuned with LoRA (section 3.2 "Training methods"): `add_language_model_lora` adds a peft adapter on
   its attention projections that also carries the projector and the last k ViT blocks, so one PEFT adapter folder
   holds everything a TAP-Chat stage trains; `merge_language_model_lora` folds it back into plain weights.

Coordinates: prompts are absolute pixel `(x, y)` in the resized and padded `image_size x image_size` model frame
(the processor maps original-image pixels into it); masks are logits in the same frame at `mask_size` resolution.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig
from transformers.models.sam.modeling_sam import SamFeedForward, SamLayerNorm, SamTwoWayTransformer
from transformers.utils import ModelOutput

from .configuration_tap import TAP_PAD_LABEL, TapChatConfig, TapConfig
from .language_lora import LanguageModelLoraMixin
from .mask_losses import MaskLoss
from .model_card_hook import ModelCardHookMixin
from .placeholder_tokens import suppress_placeholder_tokens

__all__ = [
    "TapChatForConditionalGeneration",
    "TapChatModel",
    "TapChatPreTrainedModel",
    "TapChatProjector",
    "TapConceptHead",
    "TapImageDecoder",
    "TapImageSegmentationOutput",
    "TapModel",
    "TapPreTrainedModel",
    "TapPromptEncoder",
    "TapTextDecoder",
    "TapVisionEncoder",
]

# The released prompt encoder's constant (`coord_matrix` features are computed with this truncated pi).
_RELEASED_PI = 3.1415926
# transformers' SAM processor pads points with this label; the model accepts it as well as TAP's own 4.
_SAM_PAD_LABEL = -10
# Points may overshoot the model frame by this many pixels (rounding) before they are rejected.
_PIXEL_TOLERANCE = 1.0
_LOSS_NAMES = ("loss_concept", "loss_mask_focal", "loss_mask_dice", "loss_iou", "loss_caption")


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class TapImageSegmentationOutput(ModelOutput):
    """Output of `TapModel.forward`. `B` images, `P` prompts per image, `M = num_mask_outputs` (4).

    Args:
        loss: scalar total loss (when targets are given).
        loss_dict: unweighted terms `loss_concept`, `loss_mask_focal`, `loss_mask_dice`, `loss_iou`, `loss_caption`
            (always all five; zero for a term without targets).
        pred_masks: `(B, P, M, mask_size, mask_size)` float mask logits in the padded model frame (`(B, P, 1, ...)`,
            the routed mask, with `multimask_output=False`).
        iou_scores: `(B, P, M)` float predicted IoU of each mask (`(B, P, 1)` with `multimask_output=False`).
        mask_index: `(B, P)` int64, the routed output: 0 for box prompts, `1 + argmax(iou_scores[..., 1:])` else.
        semantic_tokens: `(B, P, M, embed_dim)` float, the decoder's semantic token of every output.
        selected_semantic_tokens: `(B, P, embed_dim)`, the semantic token of the output used for concept and caption
            (the routed one; in training with `mask_labels`, the output the mask loss supervises).
        semantic_embeddings: `(B, P, concept_embed_dim)` float, `V_P` of eq. 2 for the selected token.
        concept_logits: `(B, P, num_concepts)` float, `cos(V_P, T_C) / tau`.
        caption_logits: `(B, P, L - 1, text_vocab_size)` when `caption_ids` is given: logits for caption tokens
            2..L (the position of token t predicts token t + 1); rows of prompts without caption are zero.
        prompt_mask: `(B, P)` bool, True for real prompts (False for padding prompts).
        image_embeddings: `(B, embed_dim, grid, grid)` float, the neck output (reusable with `image_embeddings=`).
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    pred_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    mask_index: torch.LongTensor | None = None
    semantic_tokens: torch.FloatTensor | None = None
    selected_semantic_tokens: torch.FloatTensor | None = None
    semantic_embeddings: torch.FloatTensor | None = None
    concept_logits: torch.FloatTensor | None = None
    caption_logits: torch.FloatTensor | None = None
    prompt_mask: torch.BoolTensor | None = None
    image_embeddings: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# 1. Image encoder


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention. `query/key/value`: `(N, heads, L, d)`; `attention_mask`: additive float or bool (True =
    attend), broadcastable to `(N, heads, Lq, Lk)`. Returns `(N, Lq, heads, d)` and the weights."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _attention_function(config: TapConfig) -> Callable:
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


def relative_position_index(window_size: int) -> torch.Tensor:
    """`(w * w, w * w)` int64 index into a `(2w - 1)^2` table: entry `(i, j)` encodes the offset of window token i
    from token j, `(dy + w - 1) * (2w - 1) + (dx + w - 1)` (row-major tokens)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(
        1
    )
    offsets = coords[:, :, None] - coords[:, None, :] + (window_size - 1)
    return offsets[0] * (2 * window_size - 1) + offsets[1]


class TapRelativePositionBias(nn.Module):
    """Index-based relative position bias of one window-attention block (section 3.1): a learned `(heads, (2w-1)^2)`
    table read through a stored `(w^2, w^2)` index, instead of SAM's query-dependent decomposed embedding."""

    def __init__(self, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.weight = nn.Parameter(torch.zeros(num_heads, (2 * window_size - 1) ** 2))
        # Persistent: the released checkpoints carry it (`attn.rel_pos_embed.index`).
        self.register_buffer("index", relative_position_index(window_size), persistent=True)

    def forward(self) -> torch.Tensor:
        """Returns the additive bias `(1, heads, w^2, w^2)`."""
        return self.weight[:, self.index].unsqueeze(0)


class TapVisionAttention(nn.Module):
    """Multi-head self-attention inside one window, with a fused q/k/v projection and the relative-position bias."""

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.vision_num_attention_heads
        self.head_dim = config.vision_hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.vision_hidden_size, 3 * config.vision_hidden_size)
        self.proj = nn.Linear(config.vision_hidden_size, config.vision_hidden_size)
        self.rel_pos_embed = TapRelativePositionBias(self.num_heads, config.vision_window_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states`: `(num_windows_total, w * w, hidden)` -> same shape."""
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attention = _attention_function(self.config)
        output, _ = attention(
            self, query, key, value, self.rel_pos_embed(), dropout=0.0, scaling=self.scaling, is_causal=False
        )
        return self.proj(output.reshape(batch, length, width))


class TapVisionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class TapVisionLayer(GradientCheckpointingLayer):
    """Pre-LN ViT block whose attention runs inside non-overlapping `w x w` windows of the feature grid."""

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        self.window_size = config.vision_window_size
        self.norm1 = nn.LayerNorm(config.vision_hidden_size, eps=config.vision_layer_norm_eps)
        self.attn = TapVisionAttention(config)
        self.norm2 = nn.LayerNorm(config.vision_hidden_size, eps=config.vision_layer_norm_eps)
        self.mlp = TapVisionMLP(config.vision_hidden_size, int(config.vision_hidden_size * config.vision_mlp_ratio))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states`: `(B, grid, grid, hidden)` channels-last -> same shape."""
        batch, height, width, channels = hidden_states.shape
        w = self.window_size
        windows = (
            self.norm1(hidden_states)
            .reshape(batch, height // w, w, width // w, w, channels)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(-1, w * w, channels)
        )
        attended = (
            self.attn(windows)
            .reshape(batch, height // w, width // w, w, w, channels)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(batch, height, width, channels)
        )
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.norm2(hidden_states))


class TapCrossWindowBlock(nn.Module):
    """Residual bottleneck (1x1 -> BN -> GELU -> 3x3 -> BN -> GELU -> 1x1 -> BN, width hidden / 2, bias-free) that
    lets neighbouring windows exchange information, replacing SAM's global-attention blocks (section 3.1)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        bottleneck = hidden_size // 2
        self.conv1 = nn.Conv2d(hidden_size, bottleneck, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(bottleneck)
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.conv3 = nn.Conv2d(bottleneck, hidden_size, 1, bias=False)
        self.norm3 = nn.BatchNorm2d(hidden_size)
        self.norm3.zero_init = True
        self.activation = nn.GELU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features`: `(B, hidden, grid, grid)` -> same shape."""
        residual = self.activation(self.norm1(self.conv1(features)))
        residual = self.activation(self.norm2(self.conv2(residual)))
        return features + self.norm3(self.conv3(residual))


class TapVisionNeck(nn.Module):
    """1x1 conv + BN to `embed_dim`, then 3x3 conv + BN (the released single-level `SimpleFeaturePyramid`)."""

    def __init__(self, hidden_size: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(hidden_size, embed_dim, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(embed_dim)
        self.conv2 = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(embed_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.norm1(self.conv1(features))))


class TapVisionEncoder(nn.Module):
    """The image encoder: `(B, 3, S, S)` normalized pixels -> `(B, embed_dim, S / patch, S / patch)` features."""

    def __init__(self, config: TapConfig, add_neck: bool = True) -> None:
        super().__init__()
        self.grid_size = config.vision_grid_size
        self.patch_embed = nn.Conv2d(3, config.vision_hidden_size, config.patch_size, stride=config.patch_size)
        # A learned absolute position per patch of the fixed 1024-pixel (padded) input, as released.
        self.position_embeddings = nn.Parameter(
            torch.zeros(self.grid_size * self.grid_size, config.vision_hidden_size)
        )
        self.layers = nn.ModuleList(TapVisionLayer(config) for _ in range(config.vision_num_hidden_layers))
        self.cross_block_indices = config.vision_cross_block_indices
        self.cross_blocks = nn.ModuleList(
            TapCrossWindowBlock(config.vision_hidden_size) for _ in self.cross_block_indices
        )
        self.norm = nn.LayerNorm(config.vision_hidden_size, eps=config.vision_layer_norm_eps)
        # TAP-Chat reads the ViT features before the neck, so it builds the encoder without one.
        self.neck = TapVisionNeck(config.vision_hidden_size, config.embed_dim) if add_neck else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.neck is None:
            raise ValueError("This encoder was built with add_neck=False; use `encode_hidden_states`.")
        return self.neck(self.encode_hidden_states(pixel_values).permute(0, 3, 1, 2))

    def encode_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, S, S)` -> `(B, grid, grid, vision_hidden_size)` channels-last ViT features (before the neck)."""
        hidden_states = self.patch_embed(pixel_values).permute(0, 2, 3, 1)
        hidden_states = hidden_states + self.position_embeddings.reshape(self.grid_size, self.grid_size, -1)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states)
            if index == last:
                # Released order: the final LayerNorm sits between the last block and its conv block.
                hidden_states = self.norm(hidden_states)
            if index in self.cross_block_indices:
                block = self.cross_blocks[self.cross_block_indices.index(index)]
                hidden_states = block(hidden_states.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return hidden_states


# ----------------------------------------------------------------------------------------------------------------
# 2. Prompt encoder


class TapPromptEncoder(nn.Module):
    """Labelled prompt points -> embeddings; also the dense positional encoding of the feature grid.

    Labels: 0 negative point, 1 positive point, 2 / 3 top-left / bottom-right box corner, 4 padding (its positional
    part is zeroed, so a padding point carries only `point_embed[4]`).
    """

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.point_embed = nn.Embedding(5, config.embed_dim)
        # Random Fourier features; a checkpoint must carry its own matrix (it is not re-drawn on load).
        self.register_buffer("coord_matrix", torch.zeros(2, config.embed_dim // 2), persistent=True)
        self.point_embed.unit_init = True

    def encode_coordinates(self, coordinates: torch.Tensor) -> torch.Tensor:
        """`coordinates`: `(..., 2)` float `(x, y)` in [0, 1] -> `(..., embed_dim)` `[sin r, cos r]`, with
        `r = (4 pi c - 2 pi) @ coord_matrix`."""
        projected = (coordinates * (4 * _RELEASED_PI) - 2 * _RELEASED_PI) @ self.coord_matrix.to(coordinates.dtype)
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def forward(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`points`: `(B, P, N, 2)` float pixel `(x, y)` in the padded model frame; `labels`: `(B, P, N)` int64 in
        0..4. Returns `(B, P, N, embed_dim)`."""
        coordinates = ((points + 0.5) / self.image_size).clamp(0.0, 1.0)
        positional = self.encode_coordinates(coordinates) * (labels != TAP_PAD_LABEL).unsqueeze(-1).to(points.dtype)
        return positional + self.point_embed(labels)

    def dense_positional_embeddings(self, grid_size: int) -> torch.Tensor:
        """`(embed_dim, grid, grid)`: the encoding of every feature-grid cell centre `((i + 0.5) / grid)`."""
        centres = (torch.arange(grid_size, device=self.coord_matrix.device, dtype=self.coord_matrix.dtype) + 0.5) / (
            grid_size
        )
        grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
        return self.encode_coordinates(torch.stack([grid_x, grid_y], dim=-1)).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# 3. Image decoder


class TapImageDecoder(nn.Module):
    """Two-way transformer (transformers' SAM blocks) -> 4 masks, 4 IoU scores and 4 semantic tokens per prompt."""

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        embed_dim = config.embed_dim
        self.num_outputs = config.num_mask_outputs
        self.transformer_config = SamMaskDecoderConfig(
            hidden_size=embed_dim,
            hidden_act="relu",
            mlp_dim=config.decoder_mlp_dim,
            num_hidden_layers=config.decoder_num_hidden_layers,
            num_attention_heads=config.decoder_num_attention_heads,
            attention_downsample_rate=config.decoder_attention_downsample_rate,
            num_multimask_outputs=config.num_mask_outputs - 1,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )
        # The SAM blocks read the attention implementation from their own config; follow the TAP model's choice.
        self.transformer_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.transformer = SamTwoWayTransformer(self.transformer_config)
        self.semantic_tokens = nn.Embedding(self.num_outputs, embed_dim)
        self.iou_token = nn.Embedding(1, embed_dim)
        self.mask_tokens = nn.Embedding(self.num_outputs, embed_dim)
        for tokens in (self.semantic_tokens, self.iou_token, self.mask_tokens):
            tokens.unit_init = True
        self.upscale_conv1 = nn.ConvTranspose2d(embed_dim, embed_dim // 4, kernel_size=2, stride=2)
        self.upscale_layer_norm = SamLayerNorm(embed_dim // 4, data_format="channels_first")
        self.upscale_conv2 = nn.ConvTranspose2d(embed_dim // 4, embed_dim // 8, kernel_size=2, stride=2)
        self.activation = nn.GELU()
        self.mask_hypernetworks = nn.ModuleList(
            SamFeedForward(embed_dim, embed_dim, embed_dim // 8, 3) for _ in range(self.num_outputs)
        )
        self.iou_head = SamFeedForward(embed_dim, config.iou_head_hidden_dim, self.num_outputs, config.iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_positional_embeddings: torch.Tensor,
        prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            image_embeddings: `(B, C, G, G)` neck features.
            image_positional_embeddings: `(C, G, G)` dense positional encoding.
            prompt_embeddings: `(B, P, N, C)` prompt point embeddings.

        Returns:
            masks `(B, P, M, 4G, 4G)` logits, iou `(B, P, M)`, semantic tokens `(B, P, M, C)`.
        """
        batch, channels, height, width = image_embeddings.shape
        num_prompts = prompt_embeddings.shape[1]
        # Token order of the release: [semantic tokens, IoU token, mask tokens, prompt points].
        output_tokens = torch.cat([self.semantic_tokens.weight, self.iou_token.weight, self.mask_tokens.weight])
        output_tokens = output_tokens.to(prompt_embeddings.dtype).expand(batch, num_prompts, -1, -1)
        tokens = torch.cat([output_tokens, prompt_embeddings], dim=2)
        keys = image_embeddings.repeat_interleave(num_prompts, 0)
        positions = image_positional_embeddings.unsqueeze(0).expand(batch * num_prompts, -1, -1, -1)
        queries, keys = self.transformer(
            point_embeddings=tokens,
            image_embeddings=keys,
            image_positional_embeddings=positions,
            attention_similarity=None,
        )
        semantic_out = queries[:, :, : self.num_outputs]
        iou_out = queries[:, :, self.num_outputs]
        mask_out = queries[:, :, self.num_outputs + 1 : 2 * self.num_outputs + 1]

        features = keys.transpose(2, 3).reshape(batch * num_prompts, channels, height, width)
        upscaled = self.activation(self.upscale_layer_norm(self.upscale_conv1(features)))
        upscaled = self.activation(self.upscale_conv2(upscaled))
        hyper = torch.stack([mlp(mask_out[:, :, i]) for i, mlp in enumerate(self.mask_hypernetworks)], dim=2)
        _, upscaled_channels, mask_height, mask_width = upscaled.shape
        upscaled = upscaled.reshape(batch, num_prompts, upscaled_channels, mask_height * mask_width)
        masks = (hyper @ upscaled).reshape(batch, num_prompts, self.num_outputs, mask_height, mask_width)
        return masks, self.iou_head(iou_out), semantic_out


def route_masks(iou_scores: torch.Tensor, is_box_prompt: torch.Tensor) -> torch.Tensor:
    """Routing of section 3.3: box prompts -> output 0, point / sketch prompts -> `1 + argmax(iou[..., 1:])`.

    Args:
        iou_scores: `(..., M)` predicted IoU per output.
        is_box_prompt: `(...)` bool.

    Returns:
        `(...)` int64 output index.
    """
    best_point_output = iou_scores[..., 1:].argmax(dim=-1) + 1
    return torch.where(is_box_prompt, torch.zeros_like(best_point_output), best_point_output)


# ----------------------------------------------------------------------------------------------------------------
# 4. Concept head


class TapConceptHead(nn.Module):
    """Semantic token -> `V_P` (3-layer MLP) -> `cos(V_P, T_C) * concept_logit_scale` over the concept bank."""

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        self.logit_scale = float(config.concept_logit_scale)
        self.projection = SamFeedForward(config.embed_dim, config.concept_hidden_size, config.concept_embed_dim, 3)
        # `T_C`: one text embedding per concept (EVA-CLIP 'a {}' in the paper), kept L2-normalized.
        self.register_buffer(
            "concept_embeddings", torch.zeros(config.num_concepts, config.concept_embed_dim), persistent=True
        )

    def forward(self, semantic_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`semantic_tokens`: `(..., embed_dim)` -> `V_P` `(..., concept_embed_dim)`, logits `(..., num_concepts)`."""
        embeddings = self.projection(semantic_tokens)
        bank = F.normalize(self.concept_embeddings.to(embeddings.dtype), dim=-1)
        logits = F.normalize(embeddings, dim=-1) @ bank.t() * self.logit_scale
        return embeddings, logits


def default_concept_bank(num_concepts: int, embed_dim: int) -> torch.Tensor:
    """A fixed random unit-norm bank `(num_concepts, embed_dim)` (seed 0) for freshly initialized models; real
    checkpoints carry CLIP text embeddings (`TapModel.set_concept_bank`)."""
    generator = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(num_concepts, embed_dim, generator=generator), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# 5. Text decoder


def interleaved_rotary(states: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """GPT-J style (interleaved) rotary embedding, as the release's `apply_rotary_emb(interleaved=True)`.

    Args:
        states: `(N, heads, L, d)` queries or keys; channel pairs `(2i, 2i + 1)` are rotated together.
        positions: `(L,)` int64 absolute positions (the semantic prefix is position 0).
        theta: rotary base.
    """
    head_dim = states.shape[-1]
    frequencies = theta ** (-torch.arange(0, head_dim, 2, device=states.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * frequencies[None, :]
    cos, sin = angles.cos().to(states.dtype), angles.sin().to(states.dtype)
    even, odd = states[..., 0::2], states[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class TapTextAttention(nn.Module):
    """Causal self-attention with fused q/k/v, interleaved rotary and an optional key/value cache."""

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.text_num_attention_heads
        self.head_dim = config.text_hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.theta = float(config.text_rope_theta)
        self.is_causal = False
        self.qkv = nn.Linear(config.text_hidden_size, 3 * config.text_hidden_size)
        self.proj = nn.Linear(config.text_hidden_size, config.text_hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`hidden_states`: `(N, L, d)`; `positions`: `(L,)`; `attention_mask`: `(1, 1, L, L_past + L)` bool.
        Returns the output `(N, L, d)` and the updated `(key, value)` cache, each `(N, heads, L_past + L, d_head)`."""
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        query = interleaved_rotary(query, positions, self.theta)
        key = interleaved_rotary(key, positions, self.theta)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        attention = _attention_function(self.config)
        output, _ = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.text_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.proj(output.reshape(batch, length, width)), (key, value)


class TapTextLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))` (GELU MLP), dropout on both."""

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.text_hidden_size)
        self.attn = TapTextAttention(config)
        self.norm2 = nn.LayerNorm(config.text_hidden_size)
        self.mlp = TapVisionMLP(config.text_hidden_size, int(config.text_hidden_size * config.text_mlp_ratio))
        self.dropout = nn.Dropout(config.text_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attended, cache = self.attn(self.norm1(hidden_states), positions, attention_mask, past_key_value)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.norm2(hidden_states))), cache


class TapTextDecoder(nn.Module):
    """Caption decoder prompted by one semantic token (Figure 5): `[proj(semantic token), BOS, w_1, ...]`."""

    def __init__(self, config: TapConfig) -> None:
        super().__init__()
        self.prefix_projection = nn.Linear(config.embed_dim, config.text_hidden_size, bias=False)
        self.embed_tokens = nn.Embedding(config.text_vocab_size, config.text_hidden_size)
        self.layers = nn.ModuleList(TapTextLayer(config) for _ in range(config.text_num_hidden_layers))
        self.norm = nn.LayerNorm(config.text_hidden_size)
        self.lm_head = nn.Linear(config.text_hidden_size, config.text_vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        semantic_tokens: torch.Tensor | None = None,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run the decoder on new positions.

        Args:
            input_ids: `(N, L)` int64 caption tokens (starting with BOS on the first call).
            semantic_tokens: `(N, embed_dim)`; required on the first call (no cache), prepended at position 0.
            past_key_values: the cache returned by a previous call, or None.

        Returns:
            logits `(N, L', text_vocab_size)` for every new position (`L' = L + 1` on the first call: the prefix
            position comes first), and the updated cache (one `(key, value)` per layer).
        """
        hidden_states = self.embed_tokens(input_ids)
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if past_key_values is None:
            if semantic_tokens is None:
                raise ValueError("`semantic_tokens` is required on the first decoder call (there is no cache yet).")
            prefix = self.prefix_projection(semantic_tokens.to(hidden_states.dtype)).unsqueeze(1)
            hidden_states = torch.cat([prefix, hidden_states], dim=1)
        length = hidden_states.shape[1]
        positions = torch.arange(past_length, past_length + length, device=hidden_states.device)
        key_positions = torch.arange(past_length + length, device=hidden_states.device)
        attention_mask = (key_positions[None, :] <= positions[:, None])[None, None]
        new_cache = []
        for index, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[index]
            hidden_states, cache = layer(hidden_states, positions, attention_mask, past)
            new_cache.append(cache)
        return self.lm_head(self.norm(hidden_states)), new_cache


# ----------------------------------------------------------------------------------------------------------------
# Model


class TapPreTrainedModel(ModelCardHookMixin, PreTrainedModel):
    """Class attributes and weight init shared by the TAP models."""

    config: TapConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["TapVisionLayer", "TapTextLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Embedding) and getattr(module, "unit_init", False):
            # SAM and TAP build the decoder's output tokens and the prompt label embeddings with PyTorch's N(0, 1)
            # default. At transformers' std 0.02 they are ~50x smaller than the unit-scale Fourier prompt features:
            # the first decoder self-attention (which has no residual) then gives all 9 output tokens the same
            # uniform average, so semantic, mask and IoU tokens start indistinguishable and never learn to look at
            # the prompted region (measured: token->image attention inside the object 0.10 = its area share).
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, TapPromptEncoder):
            init.normal_(module.coord_matrix, mean=0.0, std=1.0)
        elif isinstance(module, TapConceptHead):
            bank = module.concept_embeddings
            init.copy_(bank, default_concept_bank(bank.shape[0], bank.shape[1]).to(bank.device, bank.dtype))
        else:
            _init_encoder_module(module, self.config.initializer_range)


@torch.no_grad()
def _init_encoder_module(module: nn.Module, std: float) -> None:
    """Init rules of the image encoder and the conv blocks, shared by `TapModel` and `TapChatModel`."""
    if isinstance(module, TapRelativePositionBias):
        init.trunc_normal_(module.weight, std=std)
        init.copy_(module.index, relative_position_index(module.window_size))
    elif isinstance(module, TapVisionEncoder):
        init.trunc_normal_(module.position_embeddings, std=std)
    elif isinstance(module, nn.BatchNorm2d):
        # The last BN of a conv block starts at zero so the block starts as the identity (on top of the MAE ViT in
        # TAP, on top of the region-level features in TAP-Chat's projector, section 3.2).
        (init.zeros_ if getattr(module, "zero_init", False) else init.ones_)(module.weight)
        init.zeros_(module.bias)
        init.zeros_(module.running_mean)
        init.ones_(module.running_var)
        init.zeros_(module.num_batches_tracked)


class TapModel(TapPreTrainedModel):
    r"""TAP-v2's promptable tokenizer: image + prompts -> masks, IoU scores, semantic tokens, concepts, captions.

    The forward signature follows `SamModel` (`pixel_values`, `input_points`, `input_labels`, `input_boxes`,
    `image_embeddings`, `multimask_output`; outputs `pred_masks`, `iou_scores`), so the model also loads through
    `AutoModelForMaskGeneration`. Captions come from `generate_captions` (TAP's own greedy loop with a KV cache).
    """

    # The loss is a mean per prompt/token of this process's batch; the Trainer must not rescale it by a global count.
    accepts_loss_kwargs = False

    def __init__(self, config: TapConfig) -> None:
        super().__init__(config)
        self.vision_encoder = TapVisionEncoder(config)
        self.prompt_encoder = TapPromptEncoder(config)
        self.image_decoder = TapImageDecoder(config)
        self.concept_head = TapConceptHead(config)
        self.text_decoder = TapTextDecoder(config)
        self.post_init()

    # ------------------------------------------------------------------------------------------------------------
    # concept bank

    @property
    def concept_names(self) -> list[str] | None:
        return None if self.config.concept_names is None else list(self.config.concept_names)

    def set_concept_bank(self, embeddings: torch.Tensor, names: list[str] | tuple[str, ...] | None = None) -> None:
        """Replace the concept bank `T_C` (saved with the model in safetensors; `config.num_concepts` and
        `config.concept_names` follow).

        Args:
            embeddings: `(num_concepts, concept_embed_dim)` float text embeddings (e.g. CLIP 'a {}'); they are
                L2-normalized here.
            names: one name per row, or None.
        """
        if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
            raise TypeError("`embeddings` must be a float tensor of shape (num_concepts, concept_embed_dim).")
        expected_dim = self.config.concept_embed_dim
        if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] != expected_dim:
            raise ValueError(
                f"`embeddings` must have shape (num_concepts, {expected_dim}); got {tuple(embeddings.shape)}. "
                f"Use text embeddings of the width of `config.concept_embed_dim`."
            )
        if not bool(torch.isfinite(embeddings).all()) or bool((embeddings.norm(dim=-1) == 0).any()):
            raise ValueError("`embeddings` must be finite with no all-zero row (rows are L2-normalized).")
        if names is not None:
            names = [str(name) for name in names]
            if len(names) != embeddings.shape[0]:
                raise ValueError(
                    f"`names` has {len(names)} entries but `embeddings` has {embeddings.shape[0]} rows; give one name "
                    f"per concept."
                )
        buffer = self.concept_head.concept_embeddings
        self.concept_head.concept_embeddings = F.normalize(embeddings.detach().to(buffer.device, buffer.dtype), dim=-1)
        self.config.num_concepts = embeddings.shape[0]
        self.config.concept_names = names

    # ------------------------------------------------------------------------------------------------------------
    # encoders

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, 3, S, S)` normalized pixels -> `(B, embed_dim, grid, grid)` (what the mask-generation pipeline
        caches per image)."""
        self._check_pixel_values(pixel_values)
        return self.vision_encoder(pixel_values)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.image_size
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
            raise TypeError(f"`pixel_values` must be a float tensor of shape (batch, 3, {size}, {size}).")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"`pixel_values` must have shape (batch, 3, {size}, {size}); got {tuple(pixel_values.shape)}. Use "
                f"TapProcessor / TapImageProcessor, which resize the longest side to {size} and pad."
            )

    def _prompt_points(
        self,
        input_points: torch.Tensor | None,
        input_labels: torch.Tensor | None,
        input_boxes: torch.Tensor | None,
        batch_size: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the prompts and merge them into `(B, P, N, 2)` points and `(B, P, N)` TAP labels (0..4)."""
        size = self.config.image_size
        point_sets, label_sets = [], []
        if input_points is not None:
            if not isinstance(input_points, torch.Tensor) or not input_points.is_floating_point():
                raise TypeError("`input_points` must be a float tensor of shape (batch, prompts, points, 2).")
            if input_points.ndim != 4 or input_points.shape[-1] != 2 or input_points.shape[0] != batch_size:
                raise ValueError(
                    f"`input_points` must have shape ({batch_size}, prompts, points, 2) (pixel x, y in the "
                    f"{size}x{size} model frame); got {tuple(input_points.shape)}."
                )
            if input_labels is None:
                labels = torch.ones(input_points.shape[:-1], dtype=torch.long, device=input_points.device)
            else:
                if not isinstance(input_labels, torch.Tensor) or input_labels.is_floating_point():
                    raise TypeError("`input_labels` must be an integer tensor of shape (batch, prompts, points).")
                if tuple(input_labels.shape) != tuple(input_points.shape[:-1]):
                    raise ValueError(
                        f"`input_labels` must have shape {tuple(input_points.shape[:-1])} (one label per point); got "
                        f"{tuple(input_labels.shape)}."
                    )
                labels = input_labels.long()
                labels = torch.where(labels == _SAM_PAD_LABEL, torch.full_like(labels, TAP_PAD_LABEL), labels)
                unknown = sorted(set(labels.unique().tolist()) - set(range(TAP_PAD_LABEL + 1)))
                if unknown:
                    raise ValueError(
                        f"`input_labels` has labels {unknown}; use 0 negative, 1 positive, 2/3 box corners, 4 (or -10) "
                        f"padding."
                    )
            real = labels != TAP_PAD_LABEL
            real_points = input_points[real]
            if not bool(torch.isfinite(real_points).all()):
                raise ValueError("`input_points` contains NaN or inf; every prompt coordinate must be finite.")
            outside = (real_points < -_PIXEL_TOLERANCE) | (real_points > size + _PIXEL_TOLERANCE)
            if bool(outside.any()):
                bad = real_points[outside.any(-1)][0].tolist()
                raise ValueError(
                    f"`input_points` has a point {bad} outside the {size}x{size} model frame. Pass pixel coordinates of "
                    f"the resized, padded input (TapProcessor converts original-image pixels)."
                )
            point_sets.append(torch.where(real.unsqueeze(-1), input_points, torch.zeros_like(input_points)))
            label_sets.append(labels)
        if input_boxes is not None:
            if not isinstance(input_boxes, torch.Tensor) or not input_boxes.is_floating_point():
                raise TypeError("`input_boxes` must be a float tensor of shape (batch, prompts, 4).")
            if input_boxes.ndim != 3 or input_boxes.shape[-1] != 4 or input_boxes.shape[0] != batch_size:
                raise ValueError(
                    f"`input_boxes` must have shape ({batch_size}, prompts, 4) (pixel xyxy in the {size}x{size} "
                    f"model frame); got {tuple(input_boxes.shape)}."
                )
            if not bool(torch.isfinite(input_boxes).all()):
                raise ValueError("`input_boxes` contains NaN or inf; every box coordinate must be finite.")
            inverted = (input_boxes[..., 2] < input_boxes[..., 0]) | (input_boxes[..., 3] < input_boxes[..., 1])
            if bool(inverted.any()):
                index = inverted.nonzero()[0].tolist()
                raise ValueError(
                    f"`input_boxes` must have x2 >= x1 and y2 >= y1; got box {index} = "
                    f"{input_boxes[tuple(index)].tolist()}. Pass absolute pixel xyxy boxes."
                )
            if bool(((input_boxes < -_PIXEL_TOLERANCE) | (input_boxes > size + _PIXEL_TOLERANCE)).any()):
                raise ValueError(
                    f"`input_boxes` has a box outside the {size}x{size} model frame; pass pixel xyxy of the resized, "
                    f"padded input (TapProcessor converts original-image pixels)."
                )
            if point_sets and point_sets[0].shape[1] != input_boxes.shape[1]:
                raise ValueError(
                    f"`input_points` has {point_sets[0].shape[1]} prompts per image but `input_boxes` has "
                    f"{input_boxes.shape[1]}; a box and the points of one prompt must share its index."
                )
            point_sets.append(input_boxes.reshape(batch_size, input_boxes.shape[1], 2, 2))
            corner_labels = torch.tensor([2, 3], dtype=torch.long, device=input_boxes.device)
            label_sets.append(corner_labels.expand(batch_size, input_boxes.shape[1], 2))
        if not point_sets:
            raise ValueError(
                "TAP needs a visual prompt: pass `input_points` (+ `input_labels`) and/or `input_boxes` "
                "(the processor builds them from `points=`, `boxes=` and `sketches=`)."
            )
        points = torch.cat(point_sets, dim=2).to(device)
        labels = torch.cat(label_sets, dim=2).to(device)
        if points.shape[1] == 0 or points.shape[2] == 0:
            raise ValueError(f"The prompts are empty (shape {tuple(points.shape)}); give at least one prompt point.")
        return points, labels

    # ------------------------------------------------------------------------------------------------------------
    # forward

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
        mask_labels: torch.Tensor | None = None,
        concept_targets: torch.Tensor | None = None,
        caption_ids: torch.Tensor | None = None,
        concept_loss_weight: float | None = None,
        seg_loss_weight: float | None = None,
        caption_loss_weight: float | None = None,
        original_sizes: torch.Tensor | None = None,
        reshaped_input_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> TapImageSegmentationOutput:
        r"""Tokenize the prompted regions of a batch of images.

        Args:
            pixel_values: `(B, 3, S, S)` float, normalized, resized (longest side S) and padded bottom/right.
            input_points: `(B, P, N, 2)` float pixel `(x, y)` in the padded `S x S` model frame.
            input_labels: `(B, P, N)` int: 0 negative, 1 positive, 2/3 box corners, 4 or -10 padding (default: all 1).
                A prompt with a box corner is a box prompt; a prompt with only padding is a padding prompt.
            input_boxes: `(B, P, 4)` float pixel xyxy in the model frame; appended to prompt `p`'s points as its two
                corners (labels 2, 3).
            image_embeddings: `(B, embed_dim, grid, grid)` from `get_image_embeddings`, instead of `pixel_values`.
            multimask_output: return all `M` masks (True) or only the routed one.
            mask_labels: `(B, P, mask_size, mask_size)` float/bool ground-truth masks in the padded model frame.
            concept_targets: `(B, P, num_concepts)` float target distributions `P_target` (rows sum to 1).
            caption_ids: `(B, P, L)` int64 caption tokens `[BOS, w_1, ..., EOS, pad...]`; an all-pad row means no
                caption for that prompt. `L <= text_max_length`.
            concept_loss_weight, seg_loss_weight, caption_loss_weight: override the config's loss weights for
                this call (the trainer sets the paper stage's alpha, beta).
            original_sizes, reshaped_input_sizes: processor bookkeeping for `post_process_masks`; ignored here.
            kwargs: only transformers' generic `return_dict` / `output_attentions` / `output_hidden_states`
                (ignored); anything else is a TypeError, so a misspelt target cannot be dropped silently.

        Returns:
            [`TapImageSegmentationOutput`]; `loss` is set when any of `mask_labels`, `concept_targets`,
            `caption_ids` is given.
        """
        unknown = sorted(set(kwargs) - {"return_dict", "output_attentions", "output_hidden_states"})
        if unknown:
            raise TypeError(f"TapModel.forward got unexpected arguments {unknown}; see its docstring for the inputs.")
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("Pass exactly one of `pixel_values` and `image_embeddings`.")
        if pixel_values is not None:
            self._check_pixel_values(pixel_values)
            image_embeddings = self.vision_encoder(pixel_values)
        else:
            grid = self.config.vision_grid_size
            expected = (self.config.embed_dim, grid, grid)
            if image_embeddings.ndim != 4 or tuple(image_embeddings.shape[1:]) != expected:
                raise ValueError(
                    f"`image_embeddings` must have shape (batch, {expected[0]}, {grid}, {grid}); got "
                    f"{tuple(image_embeddings.shape)}. Compute them with `model.get_image_embeddings(pixel_values)`."
                )
        batch_size = image_embeddings.shape[0]
        points, labels = self._prompt_points(
            input_points, input_labels, input_boxes, batch_size, image_embeddings.device
        )
        prompt_mask = (labels != TAP_PAD_LABEL).any(dim=-1)
        is_box_prompt = ((labels == 2) | (labels == 3)).any(dim=-1)

        prompt_embeddings = self.prompt_encoder(points.to(image_embeddings.dtype), labels)
        dense_positions = self.prompt_encoder.dense_positional_embeddings(image_embeddings.shape[-1])
        masks, iou_scores, semantic_tokens = self.image_decoder(
            image_embeddings, dense_positions.to(image_embeddings.dtype), prompt_embeddings
        )
        mask_index = route_masks(iou_scores, is_box_prompt)

        losses: dict[str, torch.Tensor] = {}
        selected_index = mask_index
        if mask_labels is not None:
            targets = self._check_mask_labels(mask_labels, masks)
            selected_index = self._supervised_output(masks, targets, is_box_prompt)
            losses.update(self._segmentation_losses(masks, iou_scores, targets, selected_index, prompt_mask))
        selected_tokens = _gather_output(semantic_tokens, selected_index)
        semantic_embeddings, concept_logits = self.concept_head(selected_tokens)
        if concept_targets is not None:
            losses["loss_concept"] = self._concept_loss(concept_logits, concept_targets, prompt_mask)
        caption_logits = None
        if caption_ids is not None:
            caption_logits, losses["loss_caption"] = self._caption_loss(selected_tokens, caption_ids, prompt_mask)

        loss = loss_dict = None
        if losses:
            zero = image_embeddings.new_zeros(())
            loss_dict = {name: losses.get(name, zero) for name in _LOSS_NAMES}
            config = self.config
            alpha = config.seg_loss_weight if seg_loss_weight is None else seg_loss_weight
            beta = config.caption_loss_weight if caption_loss_weight is None else caption_loss_weight
            gamma = config.concept_loss_weight if concept_loss_weight is None else concept_loss_weight
            segmentation = (
                config.focal_loss_weight * loss_dict["loss_mask_focal"]
                + config.dice_loss_weight * loss_dict["loss_mask_dice"]
                + config.iou_loss_weight * loss_dict["loss_iou"]
            )
            loss = gamma * loss_dict["loss_concept"] + alpha * segmentation + beta * loss_dict["loss_caption"]

        if not multimask_output:
            masks = _gather_output(masks, mask_index).unsqueeze(2)
            iou_scores = iou_scores.gather(-1, mask_index.unsqueeze(-1))
        return TapImageSegmentationOutput(
            loss=loss,
            loss_dict=loss_dict,
            pred_masks=masks,
            iou_scores=iou_scores,
            mask_index=mask_index,
            semantic_tokens=semantic_tokens,
            selected_semantic_tokens=selected_tokens,
            semantic_embeddings=semantic_embeddings,
            concept_logits=concept_logits,
            caption_logits=caption_logits,
            prompt_mask=prompt_mask,
            image_embeddings=image_embeddings,
        )

    # ------------------------------------------------------------------------------------------------------------
    # losses

    def _check_mask_labels(self, mask_labels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        expected = (*masks.shape[:2], *masks.shape[-2:])
        if not isinstance(mask_labels, torch.Tensor) or tuple(mask_labels.shape) != expected:
            got = tuple(mask_labels.shape) if isinstance(mask_labels, torch.Tensor) else type(mask_labels).__name__
            raise ValueError(
                f"`mask_labels` must have shape {expected} (one {masks.shape[-1]}x{masks.shape[-1]} mask per prompt "
                f"in the padded model frame); got {got}. Let TapProcessor(masks=...) resize and pad them."
            )
        return mask_labels.to(masks.dtype)

    @torch.no_grad()
    def _supervised_output(
        self, masks: torch.Tensor, targets: torch.Tensor, is_box_prompt: torch.Tensor
    ) -> torch.Tensor:
        """The output each prompt's mask loss trains: 0 for boxes; for points the output of 1..M-1 with the lowest
        `20 * focal + dice` (SAM's minimum-loss assignment over the ambiguous outputs). Returns `(B, P)` int64."""
        logits = masks.flatten(-2).float()
        target = targets.flatten(-2).float().unsqueeze(2).expand_as(logits)
        probabilities = logits.sigmoid()
        cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        truth = probabilities * target + (1 - probabilities) * (1 - target)
        focal = ((0.25 * target + 0.75 * (1 - target)) * cross_entropy * (1 - truth) ** 2).mean(-1)
        dice = 1 - (2 * (probabilities * target).sum(-1) + 1) / (probabilities.sum(-1) + target.sum(-1) + 1)
        cost = self.config.focal_loss_weight * focal + self.config.dice_loss_weight * dice
        best_point_output = cost[..., 1:].argmin(dim=-1) + 1
        return torch.where(is_box_prompt, torch.zeros_like(best_point_output), best_point_output)

    def _segmentation_losses(
        self,
        masks: torch.Tensor,
        iou_scores: torch.Tensor,
        targets: torch.Tensor,
        selected_index: torch.Tensor,
        prompt_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        zero = masks.sum() * 0.0
        if not bool(prompt_mask.any()):
            return {"loss_mask_focal": zero, "loss_mask_dice": zero, "loss_iou": zero}
        chosen = _gather_output(masks, selected_index)[prompt_mask]
        mask_loss = MaskLoss(focal_weight=1.0, dice_weight=1.0)(chosen, targets[prompt_mask])
        # IoU head (routing scores): MSE against the real IoU of every output the prompt type may route to.
        with torch.no_grad():
            predicted = masks > 0
            truth = (targets > 0.5).unsqueeze(2)
            intersection = (predicted & truth).flatten(-2).sum(-1).float()
            union = (predicted | truth).flatten(-2).sum(-1).float()
            actual_iou = intersection / union.clamp(min=1.0)
        is_box = selected_index == 0
        candidates = torch.ones_like(iou_scores, dtype=torch.bool)
        candidates[..., 0] = is_box
        candidates[..., 1:] = ~is_box.unsqueeze(-1)
        candidates &= prompt_mask.unsqueeze(-1)
        iou_loss = F.mse_loss(iou_scores[candidates], actual_iou.to(iou_scores.dtype)[candidates])
        return {
            "loss_mask_focal": mask_loss["loss_mask_focal"],
            "loss_mask_dice": mask_loss["loss_mask_dice"],
            "loss_iou": iou_loss,
        }

    def _concept_loss(
        self, concept_logits: torch.Tensor, concept_targets: torch.Tensor, prompt_mask: torch.Tensor
    ) -> torch.Tensor:
        """`KL(P_target || P_pred)` (eq. 3; `F.kl_div(log P_pred, P_target)`), averaged over real prompts."""
        expected = tuple(concept_logits.shape)
        if not isinstance(concept_targets, torch.Tensor) or tuple(concept_targets.shape) != expected:
            got = tuple(concept_targets.shape) if isinstance(concept_targets, torch.Tensor) else type(concept_targets)
            raise ValueError(
                f"`concept_targets` must have shape {expected} (batch, prompts, num_concepts={expected[-1]}); got "
                f"{got}. The targets must be distributions over this model's concept bank."
            )
        targets = concept_targets.to(concept_logits.dtype)[prompt_mask]
        if targets.numel() and (
            not bool(torch.isfinite(targets).all())
            or bool((targets < 0).any())
            or not torch.allclose(targets.sum(-1), torch.ones_like(targets[:, 0]), atol=1e-3)
        ):
            raise ValueError("`concept_targets` rows of real prompts must be non-negative and sum to 1 (softmax).")
        if targets.shape[0] == 0:
            return concept_logits.sum() * 0.0
        log_predictions = F.log_softmax(concept_logits[prompt_mask].float(), dim=-1)
        return F.kl_div(log_predictions, targets.float(), reduction="sum") / targets.shape[0]

    def _caption_loss(
        self, selected_tokens: torch.Tensor, caption_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy of the captions (`L_cap`), averaged over caption tokens."""
        batch, num_prompts = prompt_mask.shape
        if not isinstance(caption_ids, torch.Tensor) or caption_ids.is_floating_point():
            raise TypeError("`caption_ids` must be an int64 tensor of shape (batch, prompts, length).")
        if caption_ids.ndim != 3 or tuple(caption_ids.shape[:2]) != (batch, num_prompts):
            raise ValueError(
                f"`caption_ids` must have shape ({batch}, {num_prompts}, length); got {tuple(caption_ids.shape)}."
            )
        length = caption_ids.shape[-1]
        if not 2 <= length <= self.config.text_max_length:
            raise ValueError(
                f"`caption_ids` length must be in [2, text_max_length={self.config.text_max_length}] (BOS, words, "
                f"EOS); got {length}. Truncate the captions."
            )
        vocab = self.config.text_vocab_size
        if bool(((caption_ids < 0) | (caption_ids >= vocab)).any()):
            raise ValueError(f"`caption_ids` has ids outside [0, text_vocab_size={vocab}); check the tokenizer.")
        pad = self.config.pad_token_id
        has_caption = prompt_mask & (caption_ids != pad).any(-1)
        logits = selected_tokens.new_zeros(batch, num_prompts, length - 1, vocab)
        if not bool(has_caption.any()):
            return logits, sum(p.sum() for p in self.text_decoder.parameters()) * 0.0
        ids = caption_ids[has_caption]
        decoder_logits, _ = self.text_decoder(ids[:, :-1], selected_tokens[has_caption])
        # Position 0 is the semantic prefix; positions 1.. (BOS, w_1, ...) predict w_1, w_2, ..., EOS.
        token_logits = decoder_logits[:, 1:]
        targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad, -100)
        loss = F.cross_entropy(token_logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
        logits = logits.index_put((has_caption,), token_logits.to(logits.dtype))
        return logits, loss

    # ------------------------------------------------------------------------------------------------------------
    # captions

    @torch.no_grad()
    def generate_captions(
        self, semantic_tokens: torch.Tensor, max_new_tokens: int | None = None, use_cache: bool = True
    ) -> torch.Tensor:
        """Greedy captions for semantic tokens (section 3.3 "Region captioning": up to 40 tokens, KV cache).

        Args:
            semantic_tokens: `(..., embed_dim)` float, e.g. `outputs.selected_semantic_tokens` `(B, P, embed_dim)`.
            max_new_tokens: tokens to write after BOS (default and maximum `text_max_length - 1` = 39).
            use_cache: reuse keys/values of earlier positions (True) or recompute the whole sequence each step.

        Returns:
            `(..., T)` int64 token ids after BOS, ending with EOS where the caption ended; later positions hold
            `pad_token_id`. Decode with `TapProcessor.post_process_captions`.
        """
        config = self.config
        limit = config.text_max_length - 1
        max_new_tokens = limit if max_new_tokens is None else max_new_tokens
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= limit:
            raise ValueError(f"`max_new_tokens` must be an integer in [1, {limit}] (text_max_length - 1).")
        if semantic_tokens.shape[-1] != config.embed_dim:
            raise ValueError(
                f"`semantic_tokens` must end with embed_dim={config.embed_dim}; got {tuple(semantic_tokens.shape)}."
            )
        leading = semantic_tokens.shape[:-1]
        tokens = semantic_tokens.reshape(-1, config.embed_dim)
        count = tokens.shape[0]
        sequence = torch.full((count, 1), config.bos_token_id, dtype=torch.long, device=tokens.device)
        finished = torch.zeros(count, dtype=torch.bool, device=tokens.device)
        generated = []
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None:
                logits, cache = self.text_decoder(sequence[:, -1:], past_key_values=cache)
            else:
                logits, cache = self.text_decoder(sequence, tokens)
            next_token = logits[:, -1].argmax(dim=-1)
            next_token = torch.where(finished, torch.full_like(next_token, config.pad_token_id), next_token)
            generated.append(next_token)
            sequence = torch.cat([sequence, next_token[:, None]], dim=1)
            finished |= next_token == config.eos_token_id
            if bool(finished.all()):
                break
        return torch.stack(generated, dim=1).reshape(*leading, -1)


def _gather_output(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick output `index[b, p]` of `values` `(B, P, M, ...)` -> `(B, P, ...)`."""
    expanded = index.reshape(*index.shape, 1, *([1] * (values.ndim - 3))).expand(*index.shape, 1, *values.shape[3:])
    return values.gather(2, expanded).squeeze(2)


# ----------------------------------------------------------------------------------------------------------------
# TAP-v2-Chat (section 3.2 "Descriptive tokenization", Figure 6)


class TapChatProjector(nn.Module):
    """Image projector: residual 3x3 conv blocks on the ViT feature map (last BN zero-initialized, so they start as
    the identity), a 2x2 merge of neighbouring patch tokens, and a two-layer MLP to the LLM width.

    `(B, grid, grid, C)` -> `(B, (grid / 2)^2, llm_hidden)`, tokens in row-major order of the merged grid.
    """

    def __init__(self, config: TapChatConfig) -> None:
        super().__init__()
        vision_hidden = config.vision_config.vision_hidden_size
        text_hidden = config.text_config.hidden_size
        self.blocks = nn.ModuleList(TapCrossWindowBlock(vision_hidden) for _ in range(config.projector_num_blocks))
        self.linear_1 = nn.Linear(4 * vision_hidden, text_hidden)
        self.activation = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.permute(0, 3, 1, 2)
        for block in self.blocks:
            features = block(features)
        batch, channels, height, width = features.shape
        # 2x2 merge: each merged token concatenates its (top-left, top-right, bottom-left, bottom-right) patches.
        merged = (
            features.reshape(batch, channels, height // 2, 2, width // 2, 2)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(batch, (height // 2) * (width // 2), 4 * channels)
        )
        return self.linear_2(self.activation(self.linear_1(merged)))


class TapChatPreTrainedModel(ModelCardHookMixin, PreTrainedModel):
    """Class attributes and weight init shared by the TAP-Chat models."""

    config: TapChatConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["TapVisionLayer"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        _init_encoder_module(module, self.config.vision_config.initializer_range)


@dataclass
class TapChatModelOutputWithPast(ModelOutput):
    """Output of `TapChatModel.forward`: the LLM's `last_hidden_state` `(B, L, D)`, `past_key_values`, and
    `image_hidden_states` `(B, num_image_tokens, D)` (the projected visual tokens, when images were given)."""

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


class TapChatModel(TapChatPreTrainedModel):
    """TAP image encoder (no neck) -> `multi_modal_projector` -> visual tokens written over the `<image>` slots of
    the LLM input embeddings."""

    def __init__(self, config: TapChatConfig) -> None:
        super().__init__(config)
        # The encoder's attention modules read the implementation from the vision sub-config (as SamModel does).
        config.vision_config._attn_implementation = config._attn_implementation
        self.vision_tower = TapVisionEncoder(config.vision_config, add_neck=False)
        self.multi_modal_projector = TapChatProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """`(B, 3, S, S)` -> `pooler_output` `(B, num_image_tokens, llm_hidden)` visual tokens."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"`pixel_values` must have shape (batch, 3, {size}, {size}); got {tuple(pixel_values.shape)}. Use "
                f"TapChatProcessor, which resizes the longest side to {size} and pads."
            )
        features = self.vision_tower.encode_hidden_states(pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=features, pooler_output=self.multi_modal_projector(features)
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        original_sizes: torch.Tensor | None = None,
        reshaped_input_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> TapChatModelOutputWithPast:
        """
        Args:
            input_ids: `(B, L)` with `num_image_tokens` `<image>` ids per image (the processor expands them).
            pixel_values: `(B, 3, S, S)` one image per sample, or None after the prefill step of generation.
            attention_mask, position_ids, past_key_values, inputs_embeds, use_cache: as for the LLM.
            original_sizes, reshaped_input_sizes: processor bookkeeping, ignored (trl's fused LM head calls this
                model directly with the whole processor batch).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.get_input_embeddings()(input_ids)
        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values).pooler_output.to(inputs_embeds.dtype)
            if input_ids is None:
                raise ValueError("`pixel_values` needs `input_ids` to locate the `<image>` slots.")
            slots = input_ids == self.config.image_token_id
            expected = self.config.num_image_tokens
            counts = slots.sum(dim=1)
            if image_features.shape[0] != input_ids.shape[0] or bool((counts != expected).any()):
                raise ValueError(
                    f"Every sample needs exactly {expected} `<image>` tokens (one image each); got {counts.tolist()} "
                    f"for {image_features.shape[0]} images. Build the prompt with TapChatProcessor."
                )
            inputs_embeds = inputs_embeds.masked_scatter(
                slots.unsqueeze(-1), image_features.reshape(-1, inputs_embeds.shape[-1])
            )
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return TapChatModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class TapChatForConditionalGeneration(LanguageModelLoraMixin, TapChatPreTrainedModel, GenerationMixin):
    """TAP-v2-Chat: `TapChatModel` + the LLM head; `generate` answers USER/ASSISTANT prompts about an image."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {}
    language_model_prefix: ClassVar[str] = "model.language_model"
    lora_modules_to_save: ClassVar[tuple[str, ...]] = ("model.multi_modal_projector",)

    def __init__(self, config: TapChatConfig) -> None:
        super().__init__(config)
        self.model = TapChatModel(config)
        # Phi's head has a bias (as released); Llama-style heads do not.
        bias = config.text_config.model_type == "phi"
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=bias)
        self.post_init()
        suppress_placeholder_tokens(self, [config.image_token_id])

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    # ---- LoRA (section 3.2 "Training methods": the LLM is tuned with LoRA, the last k ViT blocks and the projector
    # ---- fully; `LanguageModelLoraMixin` adds, saves and merges it) -----------------------------------------------

    def trained_module_names(self) -> list[str]:
        """Names of the modules every TAP-Chat stage trains besides the LLM: the projector and the last
        `num_trainable_vision_blocks` ViT blocks (`model.vision_tower.layers.{i}`)."""
        depth = self.config.vision_config.vision_num_hidden_layers
        first = depth - self.config.num_trainable_vision_blocks
        return [*self.lora_modules_to_save, *(f"model.vision_tower.layers.{i}" for i in range(first, depth))]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        original_sizes: torch.Tensor | None = None,
        reshaped_input_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Next-token logits `(B, L, vocab)`; `labels` `(B, L)` (-100 on prompt and padding) give the CE `loss`.
        `original_sizes` / `reshaped_input_sizes` are processor bookkeeping and are ignored."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
