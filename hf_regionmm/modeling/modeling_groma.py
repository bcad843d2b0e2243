"""Groma: localized visual tokenization for grounded multimodal LLMs (Ma et al. 2024, sections 3.1-3.3).

Data flow, in the order of this file:

1. Image encoder (section 3.1): `vision_tower` = transformers' DINOv2 on the 448x448 input; every hidden state
   (before the final LayerNorm, as released) is kept. The patch tokens of the last layer are merged 2x2
   (`merge_tokens_2d`) and projected by `multi_modal_projector` (Linear, GELU, Linear) into 256 image tokens.
2. Region proposer (section 3.1): `proposer` = a class-agnostic Deformable-DETR (`DetrProposer`) on the DINOv2
   features; it returns normalized cxcywh boxes and fused objectness scores.
3. Region selection: user boxes take slots 0..n-1 (score 1), then proposals above `box_score_thres` after NMS, by
   descending score, up to `max_region_num` slots (training merges the ground-truth answer boxes in with score 0.2).
4. Region encoder (section 3.1): the last 3 DINOv2 layers become a 4x / 2x / 1x feature pyramid, fused by
   channel shuffling, pooled per box with multi-scale RoIAlign and projected to one LLM token per region.
5. Language model (sections 3.2-3.3): the prompt carries `<image>` slots and `max_region_num` region slots
   `<rK><region>`; image tokens and region tokens are written into the input embeddings, the attention mask is
   zeroed on empty slots, and the LLM's logits are concatenated with `extra_lm_head`'s logits over Groma's new tokens.

The processor/model interface (slot layout, token ids, box frames) is described in `GromaConfig` and in
`GromaForConditionalGeneration.forward`. Boxes are normalized xyxy in [0, 1] of the image everywhere in this file,
unless a name says otherwise.
"""

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
from transformers.utils import ModelOutput

from .box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, validate_boxes
from .box_position_embedding import BoxPositionEmbedding
from .box_selection import select_boxes
from .configuration_groma import GromaConfig
from .detr_proposer import DetrProposer, DetrProposerOutput
from .model_card_hook import ModelCardHookMixin
from .placeholder_tokens import suppress_placeholder_tokens
from .region_pooling import MultiScaleRoIAlign
from .token_merge import merge_tokens_2d

__all__ = [
    "GromaCausalLMOutputWithPast",
    "GromaForConditionalGeneration",
    "GromaModel",
    "GromaModelOutputWithPast",
    "GromaPreTrainedModel",
    "GromaRegionEncoder",
    "GromaRegionsOutput",
]


# ----------------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class GromaRegionsOutput(ModelOutput):
    """The regions a Groma model encodes for a batch of images (`GromaModel.get_regions`).

    Args:
        region_boxes: `(B, M, 4)` float, normalized xyxy of the image for each of the `M = max_region_num` slots,
            zeros on empty slots. Proposal boxes are the proposer's predictions and may reach slightly past [0, 1].
        region_mask: `(B, M)` bool, True on filled slots (always a prefix: filled slots come first).
        region_scores: `(B, M)` float, 1.0 for user boxes, the fused objectness for proposals, 0 on empty slots.
        proposer_outputs: the proposer's raw output (all `num_queries` proposals), for inspection.
    """

    region_boxes: torch.FloatTensor | None = None
    region_mask: torch.BoolTensor | None = None
    region_scores: torch.FloatTensor | None = None
    proposer_outputs: DetrProposerOutput | None = None


@dataclass
class GromaModelOutputWithPast(ModelOutput):
    """Output of `GromaModel.forward`.

    Args:
        last_hidden_state: `(B, L, hidden)` last LLM layer (None for detection-only calls).
        past_key_values: the LLM's KV cache.
        hidden_states, attentions: the LLM's, when requested.
        attention_mask: `(B, L_total)` the effective attention mask: the given mask with both tokens of every empty
            region slot set to 0.
        labels: `(B, L)` the given labels with `<ground_box>` placeholders replaced by `<rK>` (None without labels).
        region_boxes, region_mask, region_scores: see `GromaRegionsOutput` (None on decode steps).
        image_hidden_states: `(B, num_image_tokens, hidden)` projected image tokens (None on decode steps).
        proposer_outputs: the proposer's output; carries the detection loss when `detection_targets` were given.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    attention_mask: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    region_mask: torch.BoolTensor | None = None
    region_scores: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None
    proposer_outputs: DetrProposerOutput | None = None


@dataclass
class GromaCausalLMOutputWithPast(ModelOutput):
    """Output of `GromaForConditionalGeneration.forward`.

    Args:
        loss: scalar, LM cross-entropy over the extended vocabulary, plus the proposer's set loss when
            `detection_targets` were given.
        logits: `(B, L, text_vocab + num_new_tokens)` (`L` shortened by `logits_to_keep`).
        loss_dict: named, detached loss terms for logging: `lm_loss`, and `proposer_*` terms of detection training.
        other fields: as in `GromaModelOutputWithPast`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    attention_mask: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    region_mask: torch.BoolTensor | None = None
    region_scores: torch.FloatTensor | None = None
    image_hidden_states: torch.FloatTensor | None = None
    proposer_outputs: DetrProposerOutput | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


# ----------------------------------------------------------------------------------------------------------------
# 1. Image encoder


class GromaLegacyDinov2Embeddings(Dinov2Embeddings):
    """DINOv2 embeddings whose position table is resized as transformers 4.32 did (released Groma).

    The released checkpoints were trained with transformers 4.32, which resized the 37x37 table with
    `scale_factor = (grid + 0.1) / 37` instead of a target size; bicubic sampling positions differ slightly between
    the two, so converted weights need the old rule (`vision_pos_embed_interpolation="legacy_scale_factor"`).
    Parameter names are those of `Dinov2Embeddings`.
    """

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`(1, 1 + grid_h * grid_w, C)` position embeddings for an input of `height x width` pixels."""
        num_patches = embeddings.shape[1] - 1
        num_positions = self.position_embeddings.shape[1] - 1
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :1]
        patch_pos_embed = self.position_embeddings[:, 1:]
        dim = embeddings.shape[-1]
        patch_height, patch_width = self.patch_embeddings.patch_size
        grid_height, grid_width = height // patch_height, width // patch_width
        side = int(math.sqrt(num_positions))
        patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        target_dtype = patch_pos_embed.dtype
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.to(torch.float32),
            scale_factor=((grid_height + 0.1) / side, (grid_width + 0.1) / side),
            mode="bicubic",
            align_corners=False,
        ).to(target_dtype)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)


class GromaMultiModalProjector(nn.Module):
    """Merged image tokens `(B, N, 4 * C_vision)` -> LLM embeddings `(B, N, hidden)` (released `img_txt_bridge`)."""

    def __init__(self, config: GromaConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(4 * config.vision_config.hidden_size, hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, merged_tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(merged_tokens)))


# ----------------------------------------------------------------------------------------------------------------
# 4. Region encoder


class GromaConvGroupNormReLU(nn.Module):
    """3x3 conv (no bias) -> GroupNorm -> ReLU; submodule names `conv` / `gn` as in mmcv's `ConvModule`."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, channels)
        self.act = nn.ReLU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.act(self.gn(self.conv(features)))


def _coordinate_channels(feature_map: torch.Tensor) -> torch.Tensor:
    """`(B, 2, H, W)`: x then y, each spanning [-1, 1] across the map (CoordConv channels)."""
    batch_size, _, height, width = feature_map.shape
    y_range = torch.linspace(-1, 1, height, device=feature_map.device, dtype=feature_map.dtype)
    x_range = torch.linspace(-1, 1, width, device=feature_map.device, dtype=feature_map.dtype)
    y_grid, x_grid = torch.meshgrid(y_range, x_range, indexing="ij")
    return torch.stack([x_grid, y_grid]).unsqueeze(0).expand(batch_size, -1, -1, -1)


def _resize_bilinear(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(feature_map.shape[-2:]) == tuple(size):
        return feature_map
    # Interpolated in float32 as released; bf16 bilinear weights shift the features.
    resized = nn.functional.interpolate(feature_map.float(), size=size, mode="bilinear", align_corners=True)
    return resized.to(feature_map.dtype)


class GromaRegionFeatureFusion(nn.Module):
    """Multi-level feature fusion before RoIAlign (released `MLVLFuseModule`).

    Each level gets 2 coordinate channels and a 1x1 conv to `E = region_encoder_embed_dim` channels. Then, in each
    of `fuse_rounds` rounds, level `l` keeps its first `E/2` channels, takes the last `E/4` channels of the coarser
    neighbour `l+1` and channels `[E/2, 3E/4)` of the finer neighbour `l-1` (resized bilinearly to its own size;
    the end levels use themselves), and one shared 3x3 conv + GroupNorm + ReLU mixes the result.
    """

    def __init__(self, config: GromaConfig):
        super().__init__()
        embed_dim = config.region_encoder_embed_dim
        self.num_levels = config.region_encoder_num_levels
        self.shuffle_channels = embed_dim // 4
        self.kept_channels = embed_dim - 2 * self.shuffle_channels
        self.input_convs = nn.ModuleList(
            [nn.Conv2d(config.vision_config.hidden_size + 2, embed_dim, kernel_size=1) for _ in range(self.num_levels)]
        )
        self.fuse_convs = nn.ModuleList(
            [
                GromaConvGroupNormReLU(embed_dim, config.region_encoder_num_groups)
                for _ in range(config.region_encoder_fuse_rounds)
            ]
        )

    def forward(self, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """`L` maps `(B, C_vision, H_l, W_l)`, finest first -> `L` maps `(B, E, H_l, W_l)`."""
        maps = [
            conv(torch.cat([feature_map, _coordinate_channels(feature_map)], dim=1))
            for conv, feature_map in zip(self.input_convs, feature_maps)
        ]
        for fuse_conv in self.fuse_convs:
            maps = [fuse_conv(self._shuffle(maps, level)) for level in range(self.num_levels)]
        return maps

    def _shuffle(self, maps: list[torch.Tensor], level: int) -> torch.Tensor:
        target = maps[level]
        coarser = maps[min(level + 1, self.num_levels - 1)]
        finer = maps[max(level - 1, 0)]
        size = tuple(target.shape[-2:])
        from_coarser = _resize_bilinear(coarser[:, self.kept_channels + self.shuffle_channels :], size)
        from_finer = _resize_bilinear(finer[:, self.kept_channels : self.kept_channels + self.shuffle_channels], size)
        return torch.cat([target[:, : self.kept_channels], from_coarser, from_finer], dim=1)


class GromaRegionEncoder(nn.Module):
    """Boxes -> one LLM-width token per box (section 3.1, "Region Encoder"; released `MLVLROIQueryModule`).

    Pipeline: the last `L = 3` DINOv2 maps resized to `grid * 4`, `grid * 2`, `grid` (finest first) ->
    `feature_fusion` -> `roi_align` (`region_encoder_output_size`^2 bins, sampling ratio 2, aligned) -> per-level
    3x3 `level_convs`, summed, ReLU, flattened -> `flatten_proj` to `E` -> + `position_embedding(box)` ->
    `output_proj` to the LLM hidden size.

    Released checkpoint names (`region_encoder.` prefix on both sides): `mlvl_fuse.input_conv` -> `feature_fusion.
    input_convs`, `mlvl_fuse.fuse_convs.{i}.{conv,gn}` -> `feature_fusion.fuse_convs.{i}.{conv,gn}`,
    `roi_align.pconvs` -> `level_convs`, `roi_align.flatten_linear` -> `flatten_proj`, `roi_align.pos_embedd.{0,2,3,5}`
    -> `position_embedding.layers.{0,2,3,5}`, `roi_align.updims` -> `output_proj`.

    `config.region_box_format` decides what RoIAlign and the position MLP see: `"xyxy"` the normalized xyxy box;
    `"cxcywh_as_xyxy"` (released quirk) its normalized cxcywh, which RoIAlign then reads as x1, y1, x2, y2.
    """

    def __init__(self, config: GromaConfig):
        super().__init__()
        embed_dim = config.region_encoder_embed_dim
        output_size = config.region_encoder_output_size
        self.image_size = config.image_size
        self.box_format = config.region_box_format
        self.feature_map_sizes = config.region_feature_map_sizes
        self.feature_fusion = GromaRegionFeatureFusion(config)
        self.roi_align = MultiScaleRoIAlign(
            output_size=output_size,
            spatial_scales=config.region_spatial_scales,
            sampling_ratio=config.region_encoder_sampling_ratio,
            aligned=True,
        )
        self.level_convs = nn.ModuleList(
            [
                nn.Conv2d(embed_dim, embed_dim, kernel_size=3, padding=1)
                for _ in range(config.region_encoder_num_levels)
            ]
        )
        self.flatten_proj = nn.Linear(embed_dim * output_size * output_size, embed_dim)
        self.position_embedding = BoxPositionEmbedding(
            in_features=4,
            hidden_size=config.region_encoder_pos_hidden_size,
            out_features=embed_dim,
            activation="relu",
            layer_norm=True,
            final_activation=True,
        )
        self.output_proj = nn.Linear(embed_dim, config.text_config.hidden_size)

    def build_feature_pyramid(self, vision_feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """`L` DINOv2 maps `(B, C_vision, grid, grid)` (oldest layer first) -> fused maps `(B, E, s_l, s_l)`,
        `s_l = config.region_feature_map_sizes[l]` (128, 64, 32 for groma-7b)."""
        resized = [
            _resize_bilinear(feature_map, (size, size))
            for feature_map, size in zip(vision_feature_maps, self.feature_map_sizes)
        ]
        # Channels-last maps: the fusion's 3x3 convs run ~30% faster on CPU (oneDNN's native layout) and RoIAlign
        # reads them without a transposing copy.
        return self.feature_fusion(
            [feature_map.contiguous(memory_format=torch.channels_last) for feature_map in resized]
        )

    def forward(self, vision_feature_maps: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """Encode boxes into LLM tokens.

        Args:
            vision_feature_maps: `L` float tensors `(B, C_vision, grid, grid)`: the last `L` DINOv2 hidden states
                (CLS dropped), oldest layer first.
            boxes: `B` float tensors `(n_b, 4)`, normalized xyxy of the image.

        Returns:
            `(sum_b n_b, text hidden)` region tokens, boxes in image order.
        """
        pyramid = self.build_feature_pyramid(vision_feature_maps)
        normalized = [
            box_xyxy_to_cxcywh(image_boxes) if self.box_format == "cxcywh_as_xyxy" else image_boxes
            for image_boxes in boxes
        ]
        rois = [image_boxes.float() * self.image_size for image_boxes in normalized]
        # RoIAlign runs in float32 as released; the bins are then brought back to the model dtype.
        pooled = self.roi_align([level.float() for level in pyramid], rois).to(pyramid[0].dtype)
        # sum_l conv_l(pooled_l) as ONE convolution over the levels stacked on channels (same result, one larger
        # GEMM instead of three plus two adds); the pooler lays bins out channels-last, so the flatten is free.
        fused = nn.functional.conv2d(
            pooled.flatten(1, 2),
            torch.cat([conv.weight for conv in self.level_convs], dim=1),
            sum(conv.bias for conv in self.level_convs),
            padding=1,
        )
        region_embeddings = self.flatten_proj(nn.functional.relu(fused).flatten(1))
        all_boxes = torch.cat(normalized).to(region_embeddings.dtype)
        region_embeddings = region_embeddings + self.position_embedding(all_boxes).to(region_embeddings.dtype)
        return self.output_proj(region_embeddings)


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model


class GromaPreTrainedModel(ModelCardHookMixin, PreTrainedModel):
    """Shared class attributes and weight init of the Groma models (region-encoder convs N(0, 0.01), new tokens at
    the mean LLM embedding, as released)."""

    config: GromaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["GromaRegionEncoder"]
    _skip_keys_device_placement = "past_key_values"
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this per module that owns parameters (children first), with `self` the nearest
        # enclosing PreTrainedModel, so Groma's own rules key on the module's identity inside `GromaModel`.
        super()._init_weights(module)
        region_encoder = getattr(self, "region_encoder", None)
        if isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d) and region_encoder is not None and _contains(region_encoder, module):
            # Released region-encoder convs start at normal(0, 0.01) (mmcv `normal_init`).
            init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif module is getattr(self, "new_token_embeddings", None):
            # The LLM is registered (and so initialised or loaded) before this table: start every new token at the
            # mean LLM embedding, as released.
            llm_embeddings = self.language_model.get_input_embeddings().weight
            init.copy_(module.weight, llm_embeddings.mean(dim=0, keepdim=True).expand_as(module.weight))


def _contains(parent: nn.Module, module: nn.Module) -> bool:
    return any(candidate is module for candidate in parent.modules())


# ----------------------------------------------------------------------------------------------------------------
# Base model


def _check_pixel_values(pixel_values: Any, config: GromaConfig) -> None:
    size = config.image_size
    channels = getattr(config.vision_config, "num_channels", 3)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError(
            f"`pixel_values` must be a float tensor (batch, {channels}, {size}, {size}) from GromaImageProcessor; "
            f"got {getattr(pixel_values, 'dtype', type(pixel_values).__name__)}."
        )
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"`pixel_values` must have shape (batch, {channels}, {size}, {size}) (images resized to "
            f"config.image_size={size} and normalized by GromaImageProcessor); got {tuple(pixel_values.shape)}."
        )


def _check_normalized_boxes(
    boxes: Any, mask: Any, name: str, batch_size: int, max_boxes: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate `(B, R, 4)` normalized xyxy boxes and their `(B, R)` mask; returns `(boxes, bool mask)`."""
    if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
        raise TypeError(
            f"`{name}` must be a float tensor (batch, num_boxes, 4) of normalized xyxy boxes; got "
            f"{getattr(boxes, 'dtype', type(boxes).__name__)}. GromaProcessor builds it from pixel boxes."
        )
    if boxes.ndim != 3 or boxes.shape[0] != batch_size or boxes.shape[-1] != 4:
        raise ValueError(
            f"`{name}` must have shape (batch={batch_size}, num_boxes, 4), normalized xyxy; got {tuple(boxes.shape)}."
        )
    if mask is None:
        mask = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(boxes.shape[:2]):
        raise ValueError(
            f"`{name}_mask` must be a tensor of shape {tuple(boxes.shape[:2])} (True on real boxes); got "
            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}."
        )
    mask = mask.to(device=boxes.device, dtype=torch.bool)
    valid = boxes[mask]
    validate_boxes(valid, name, fmt="xyxy")
    outside = ((valid < 0) | (valid > 1)).any(-1)
    if bool(outside.any()):
        box = valid[int(outside.nonzero()[0, 0])]
        raise ValueError(
            f"`{name}` must be normalized xyxy in [0, 1] of the image; got a box "
            f"{[round(value, 4) for value in box.tolist()]}. Pass absolute pixel boxes to GromaProcessor, which "
            f"normalizes them, or divide by (width, height, width, height)."
        )
    if max_boxes is not None:
        counts = mask.sum(1)
        if bool((counts > max_boxes).any()):
            raise ValueError(
                f"`{name}` has {int(counts.max())} boxes for one image but the model has only "
                f"max_region_num={max_boxes} region slots; pass at most {max_boxes} boxes per image."
            )
    return boxes, mask


class GromaModel(GromaPreTrainedModel):
    """Groma without the LM head: vision tower, proposer, region encoder, projector, LLM and the new-token table.

    `new_token_embeddings` holds the `num_new_tokens` rows of Groma's new tokens (ids `text_vocab + j`); the LLM's
    own embedding table is not resized (released layout), so a frozen LLM can stay frozen while new tokens train.
    """

    def __init__(self, config: GromaConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        if config.vision_pos_embed_interpolation == "legacy_scale_factor":
            if not isinstance(getattr(self.vision_tower, "embeddings", None), Dinov2Embeddings):
                raise ValueError(
                    "`vision_pos_embed_interpolation='legacy_scale_factor'` reproduces transformers 4.32 DINOv2 and "
                    f"needs a dinov2 `vision_config`; got {config.vision_config.model_type!r}. Use 'size'."
                )
            self.vision_tower.embeddings = GromaLegacyDinov2Embeddings(config.vision_config)
        self.proposer = DetrProposer(config.proposer_config)
        self.multi_modal_projector = GromaMultiModalProjector(config)
        self.region_encoder = GromaRegionEncoder(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.new_token_embeddings = nn.Embedding(config.num_new_tokens, config.text_config.hidden_size)
        self.post_init()

    # ---- 1. image encoder -------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run DINOv2 and return its patch-token maps.

        Args:
            pixel_values: `(B, 3, S, S)` float, S = `config.image_size`, ImageNet-normalized.

        Returns:
            `num_hidden_layers + 1` tensors `(B, C_vision, grid, grid)` (embeddings, then each layer; before the
            final LayerNorm), CLS/register tokens dropped.
        """
        _check_pixel_values(pixel_values, self.config)
        dtype = next(self.vision_tower.parameters()).dtype
        outputs = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        grid = self.config.vision_grid_size
        return tuple(
            hidden[:, -grid * grid :].transpose(1, 2).reshape(hidden.shape[0], hidden.shape[-1], grid, grid)
            for hidden in outputs.hidden_states
        )

    def project_image_tokens(self, vision_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Map `config.vision_feature_layer` `(B, C, grid, grid)` -> 2x2-merged, projected image tokens
        `(B, (grid/2)^2, hidden)`."""
        feature_map = vision_maps[self.config.vision_feature_layer]
        tokens = feature_map.flatten(2).transpose(1, 2)
        merged = merge_tokens_2d(
            tokens, grid_size=tuple(feature_map.shape[-2:]), order=self.config.image_token_merge_order
        )
        return self.multi_modal_projector(merged)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        """transformers' VLM convention: `pooler_output` = projected image tokens `(B, num_image_tokens, hidden)`;
        `hidden_states` = the DINOv2 maps of `encode_image`; `last_hidden_state` = the last one."""
        vision_maps = self.encode_image(pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_maps[-1],
            pooler_output=self.project_image_tokens(vision_maps),
            hidden_states=vision_maps,
        )

    # ---- 2. region proposer -----------------------------------------------------------------------------------

    def propose_regions(
        self, vision_maps: tuple[torch.Tensor, ...], detection_targets: list[dict[str, torch.Tensor]] | None = None
    ) -> DetrProposerOutput:
        """Run the proposer on the configured feature source.

        `"mean_last_4"` (released): the mean of the last 4 maps, one level. `"multi_level"` (paper): the last
        `num_feature_levels` maps, the oldest layer feeding the finest pyramid level.
        `detection_targets`: optional list of `{"boxes": (n, 4) normalized cxcywh}` for the set loss.
        """
        if self.config.proposer_feature_source == "mean_last_4":
            features = torch.stack(vision_maps[-4:]).mean(0)
        else:
            features = list(vision_maps[-self.config.proposer_config.num_feature_levels :])
        return self.proposer(features, targets=detection_targets)

    # ---- 3. region selection ----------------------------------------------------------------------------------

    def select_regions(
        self,
        proposal_boxes: torch.Tensor,
        proposal_scores: torch.Tensor,
        refer_boxes: torch.Tensor | None = None,
        refer_boxes_mask: torch.Tensor | None = None,
        ground_boxes: torch.Tensor | None = None,
        ground_boxes_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.BoolTensor, torch.Tensor]:
        """Fill the `M = max_region_num` region slots of each image.

        Args:
            proposal_boxes: `(B, Q, 4)` float, normalized cxcywh (the proposer's `pred_boxes`).
            proposal_scores: `(B, Q)` float fused objectness in [0, 1].
            refer_boxes, refer_boxes_mask: `(B, R, 4)` normalized xyxy user boxes and `(B, R)` bool, or None.
            ground_boxes, ground_boxes_mask: `(B, G, 4)` normalized xyxy ground-truth answer boxes and `(B, G)`
                bool (training), or None; they join the proposals with score `config.ground_box_score`.

        Returns:
            `region_boxes (B, M, 4)` normalized xyxy (zeros on empty slots), `region_mask (B, M)` bool and
            `region_scores (B, M)`. Slots 0..n_user-1 hold the user boxes in order (score 1, never suppressed);
            then proposals with score > `box_score_thres` that overlap no kept box (user boxes included) by more
            than IoU `nms_thres`, by descending score (randomly permuted if `config.shuffle_regions`). Without
            user boxes, an image whose proposals all fail the threshold keeps its single best proposal.
        """
        config = self.config
        batch_size = proposal_boxes.shape[0]
        max_regions = config.max_region_num
        candidates = box_cxcywh_to_xyxy(proposal_boxes.detach().float())
        candidate_scores = proposal_scores.detach().float()
        region_boxes = candidates.new_zeros(batch_size, max_regions, 4)
        region_scores = candidates.new_zeros(batch_size, max_regions)
        region_mask = torch.zeros(batch_size, max_regions, dtype=torch.bool, device=candidates.device)
        for index in range(batch_size):
            user_boxes = candidates.new_zeros(0, 4)
            if refer_boxes is not None:
                user_boxes = refer_boxes[index][refer_boxes_mask[index]].float().to(candidates.device)
            image_boxes, image_scores = candidates[index], candidate_scores[index]
            if ground_boxes is not None:
                truth = ground_boxes[index][ground_boxes_mask[index]].float().to(candidates.device)
                image_boxes = torch.cat([image_boxes, truth])
                image_scores = torch.cat(
                    [image_scores, image_scores.new_full((truth.shape[0],), config.ground_box_score)]
                )
            num_user = user_boxes.shape[0]
            chosen = torch.empty(0, dtype=torch.long, device=candidates.device)
            if num_user < max_regions:
                eligible = torch.arange(image_boxes.shape[0], device=candidates.device)
                if num_user > 0:
                    overlap = box_iou(image_boxes, user_boxes, validate=False).amax(dim=1)
                    eligible = (overlap <= config.nms_thres).nonzero().squeeze(1)
                kept = select_boxes(
                    image_boxes[eligible],
                    image_scores[eligible],
                    score_threshold=config.box_score_thres,
                    iou_threshold=config.nms_thres,
                    max_num=max_regions - num_user,
                    keep_best_if_empty=num_user == 0,
                )
                chosen = eligible[kept]
                if config.shuffle_regions:
                    chosen = chosen[torch.randperm(chosen.numel(), device=chosen.device)]
            boxes = torch.cat([user_boxes, image_boxes[chosen]])
            scores = torch.cat([user_boxes.new_ones(num_user), image_scores[chosen]])
            region_boxes[index, : boxes.shape[0]] = boxes
            region_scores[index, : boxes.shape[0]] = scores
            region_mask[index, : boxes.shape[0]] = True
        return region_boxes, region_mask, region_scores

    # ---- 4. region encoder ------------------------------------------------------------------------------------

    def encode_regions(
        self, vision_maps: tuple[torch.Tensor, ...], region_boxes: torch.Tensor, region_mask: torch.BoolTensor
    ) -> torch.Tensor:
        """Region tokens `(B, M, hidden)` for the filled slots of `region_boxes (B, M, 4)` (normalized xyxy);
        zeros on empty slots."""
        levels = self.config.region_encoder_num_levels
        boxes = [image_boxes[image_mask] for image_boxes, image_mask in zip(region_boxes, region_mask)]
        tokens = self.region_encoder(list(vision_maps[-levels:]), boxes)
        features = tokens.new_zeros(*region_mask.shape, tokens.shape[-1])
        return features.masked_scatter(region_mask.unsqueeze(-1), tokens)

    def get_regions(
        self,
        pixel_values: torch.Tensor,
        refer_boxes: torch.Tensor | None = None,
        refer_boxes_mask: torch.Tensor | None = None,
    ) -> GromaRegionsOutput:
        """The regions the model would encode for these images (vision tower + proposer + selection only).

        With the default deterministic order (`shuffle_regions=False`) and the model in eval mode, these are exactly
        the regions `generate` uses, so `<rK>` in the generated text refers to `region_boxes[:, K]`.

        Args:
            pixel_values: `(B, 3, S, S)` float from `GromaImageProcessor`.
            refer_boxes: optional `(B, R, 4)` normalized xyxy user boxes; `refer_boxes_mask` `(B, R)` bool.
        """
        vision_maps = self.encode_image(pixel_values)
        if refer_boxes is not None:
            refer_boxes, refer_boxes_mask = _check_normalized_boxes(
                refer_boxes, refer_boxes_mask, "refer_boxes", pixel_values.shape[0], self.config.max_region_num
            )
        proposals = self.propose_regions(vision_maps)
        region_boxes, region_mask, region_scores = self.select_regions(
            proposals.pred_boxes, proposals.scores, refer_boxes, refer_boxes_mask
        )
        return GromaRegionsOutput(
            region_boxes=region_boxes, region_mask=region_mask, region_scores=region_scores, proposer_outputs=proposals
        )

    # ---- 5. language model ------------------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`(B, L)` ids of the extended vocabulary -> `(B, L, hidden)`: ids below the text vocabulary use the LLM
        table, the others `new_token_embeddings[id - text_vocab]`."""
        text_vocab = self.config.text_config.vocab_size
        total_vocab = text_vocab + self.config.num_new_tokens
        if bool(((input_ids < 0) | (input_ids >= total_vocab)).any()):
            bad = input_ids[(input_ids < 0) | (input_ids >= total_vocab)][0]
            raise ValueError(
                f"`input_ids` contains id {int(bad)}, outside the extended vocabulary [0, {total_vocab}) "
                f"(text vocab {text_vocab} + {self.config.num_new_tokens} Groma tokens); use GromaProcessor's tokenizer."
            )
        is_new = input_ids >= text_vocab
        text_embeddings = self.language_model.get_input_embeddings()(input_ids.masked_fill(is_new, 0))
        new_embeddings = self.new_token_embeddings((input_ids - text_vocab).clamp(min=0))
        return torch.where(is_new.unsqueeze(-1), new_embeddings.to(text_embeddings.dtype), text_embeddings)

    def _resolve_placeholders(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None,
        region_boxes: torch.Tensor,
        region_mask: torch.BoolTensor,
        num_user_boxes: torch.LongTensor,
        ground_boxes: torch.Tensor | None,
        ground_boxes_mask: torch.Tensor | None,
    ) -> tuple[torch.LongTensor, torch.LongTensor | None]:
        """Replace the i-th `<refer_box>` by `<r{i}>` and the j-th `<ground_box>` (in ids and labels) by `<rK>`,
        K = the filled slot with the highest IoU with ground-truth box j."""
        config = self.config
        index_token_ids = torch.tensor(config.region_index_token_ids, device=input_ids.device)
        input_ids = input_ids.clone()
        refer_box_mask = input_ids == config.refer_box_token_id
        if bool(refer_box_mask.any()):
            counts = refer_box_mask.sum(1)
            if bool((counts > num_user_boxes).any()):
                raise ValueError(
                    f"The prompt has {counts.tolist()} `<refer_box>` tokens per sample but only "
                    f"{num_user_boxes.tolist()} `refer_boxes`; pass one box per `<refer_box>`."
                )
            order = torch.cumsum(refer_box_mask.long(), dim=1) - 1
            input_ids[refer_box_mask] = index_token_ids[order[refer_box_mask]]

        ground_mask = input_ids == config.ground_box_token_id
        if not bool(ground_mask.any()):
            return input_ids, labels
        if ground_boxes is None:
            raise ValueError(
                "The text contains `<ground_box>` placeholders but `ground_boxes` is None; pass the ground-truth "
                "boxes (batch, G, 4) normalized xyxy, one per placeholder, or remove the placeholders."
            )
        counts = ground_mask.sum(1)
        expected = ground_boxes_mask.sum(1)
        if not torch.equal(counts, expected.to(counts.device)):
            raise ValueError(
                f"`input_ids` has {counts.tolist()} `<ground_box>` placeholders per sample but `ground_boxes` has "
                f"{expected.tolist()} boxes; the text must carry one placeholder per ground-truth box, in order."
            )
        for index in range(input_ids.shape[0]):
            if int(counts[index]) == 0:
                continue
            truth = ground_boxes[index][ground_boxes_mask[index]].float().to(region_boxes.device)
            filled = region_boxes[index][region_mask[index]]
            best_slots = box_iou(truth, filled, validate=False).argmax(dim=1)
            input_ids[index, ground_mask[index]] = index_token_ids[best_slots].to(input_ids.device)
        if labels is not None:
            label_placeholders = labels == config.ground_box_token_id
            if bool((label_placeholders & ~ground_mask).any()):
                raise ValueError(
                    "`labels` has `<ground_box>` placeholders at positions where `input_ids` has none; labels must "
                    "be the input ids with prompt positions set to -100."
                )
            labels = torch.where(label_placeholders, input_ids, labels)
        return input_ids, labels

    def _fill_slots(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor,
        region_features: torch.Tensor,
        region_mask: torch.BoolTensor,
        num_user_boxes: torch.LongTensor,
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.BoolTensor]:
        """Write image tokens, region tokens and referred-region tokens into `inputs_embeds (B, L, hidden)`.

        Returns the new embeddings, `slot_positions (B, M)` (index of each `<region>` token) and the `(B, L)` bool
        mask of positions to hide (both tokens of every empty slot).
        """
        config = self.config
        batch_size, seq_len = input_ids.shape
        dtype = inputs_embeds.dtype

        image_mask = input_ids == config.image_token_id
        image_counts = image_mask.sum(1)
        if bool((image_counts != config.num_image_tokens).any()):
            raise ValueError(
                f"Each prompt must carry {config.num_image_tokens} `<image>` tokens ((image_size / patch / 2)^2); got "
                f"{image_counts.tolist()}. Build the text with GromaProcessor, which expands `<image>` for this config."
            )
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features.to(dtype))

        slot_mask = input_ids == config.region_token_id
        slot_counts = slot_mask.sum(1)
        if bool((slot_counts != config.max_region_num).any()):
            raise ValueError(
                f"Each prompt must carry max_region_num={config.max_region_num} region slots `<rK><region>`; got "
                f"{slot_counts.tolist()} `<region>` tokens. Build the text with GromaProcessor for this config."
            )
        slot_positions = slot_mask.nonzero()[:, 1].reshape(batch_size, config.max_region_num)
        index_token_ids = torch.tensor(config.region_index_token_ids, device=input_ids.device)
        preceding = input_ids.gather(1, (slot_positions - 1).clamp(min=0))
        if bool((slot_positions == 0).any()) or not bool((preceding == index_token_ids).all()):
            raise ValueError(
                "Region slot k must be written `<rk><region>` (slots in order k = 0..max_region_num-1); the token "
                "before some `<region>` is not the matching `<rk>`. Build the text with GromaProcessor."
            )
        inputs_embeds = inputs_embeds.masked_scatter(slot_mask.unsqueeze(-1), region_features.to(dtype))

        refer_mask = input_ids == config.refer_feat_token_id
        refer_counts = refer_mask.sum(1)
        if bool((refer_counts > num_user_boxes).any()):
            raise ValueError(
                f"The prompt has {refer_counts.tolist()} `<refer_feat>` tokens per sample but only "
                f"{num_user_boxes.tolist()} `refer_boxes`; the i-th `<refer_feat>` takes user box i, so pass one box "
                f"per `<refer_feat>`."
            )
        if bool(refer_counts.any()):
            referred = torch.cat([region_features[index, : int(count)] for index, count in enumerate(refer_counts)])
            inputs_embeds = inputs_embeds.masked_scatter(refer_mask.unsqueeze(-1), referred.to(dtype))

        hidden = torch.zeros(batch_size, seq_len, dtype=torch.bool, device=input_ids.device)
        empty_rows, empty_slots = (~region_mask).nonzero(as_tuple=True)
        empty_positions = slot_positions[empty_rows, empty_slots]
        hidden[empty_rows, empty_positions] = True
        hidden[empty_rows, empty_positions - 1] = True
        return inputs_embeds, slot_positions, hidden

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        refer_boxes: torch.FloatTensor | None = None,
        refer_boxes_mask: torch.BoolTensor | None = None,
        ground_boxes: torch.FloatTensor | None = None,
        ground_boxes_mask: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        detection_targets: list[dict[str, torch.Tensor]] | None = None,
        image_sizes: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> GromaModelOutputWithPast:
        """See `GromaForConditionalGeneration.forward`; `labels` are only rewritten here (returned as `labels`)."""
        if pixel_values is None:
            if input_ids is None and inputs_embeds is None:
                raise ValueError("Pass `input_ids` (a prompt) and/or `pixel_values`; got neither.")
            if (
                input_ids is not None
                and bool((input_ids == self.config.image_token_id).any())
                and (past_key_values is None or past_key_values.get_seq_length() == 0)
            ):
                raise ValueError(
                    "The prompt contains `<image>` slots but `pixel_values` is None; pass the image from "
                    "GromaProcessor."
                )
            if detection_targets is not None:
                raise ValueError("`detection_targets` need `pixel_values`: the proposer trains on the image features.")
            return self._language_forward(
                input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache, **kwargs
            )

        _check_pixel_values(pixel_values, self.config)
        batch_size = pixel_values.shape[0]
        vision_maps = self.encode_image(pixel_values)
        proposals = self.propose_regions(vision_maps, detection_targets)
        if input_ids is None:
            if inputs_embeds is not None:
                raise ValueError(
                    "With `pixel_values`, pass `input_ids` (not `inputs_embeds`): the model finds the `<image>` and "
                    "region slots by token id."
                )
            if detection_targets is None:
                raise ValueError(
                    "`pixel_values` alone: pass `input_ids` for chat, `detection_targets` for detection "
                    "pretraining, or call `get_regions(pixel_values)` for the regions only."
                )
            return GromaModelOutputWithPast(proposer_outputs=proposals)

        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != batch_size:
            raise ValueError(
                f"`input_ids` must be a (batch={batch_size}, seq_len) int tensor matching `pixel_values`; got "
                f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}."
            )
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}; got {tuple(labels.shape)}."
            )
        max_regions = self.config.max_region_num
        if refer_boxes is not None:
            refer_boxes, refer_boxes_mask = _check_normalized_boxes(
                refer_boxes, refer_boxes_mask, "refer_boxes", batch_size, max_regions
            )
            num_user_boxes = refer_boxes_mask.sum(1).to(input_ids.device)
        else:
            num_user_boxes = torch.zeros(batch_size, dtype=torch.long, device=input_ids.device)
        if ground_boxes is not None:
            ground_boxes, ground_boxes_mask = _check_normalized_boxes(
                ground_boxes, ground_boxes_mask, "ground_boxes", batch_size, None
            )

        region_boxes, region_mask, region_scores = self.select_regions(
            proposals.pred_boxes, proposals.scores, refer_boxes, refer_boxes_mask, ground_boxes, ground_boxes_mask
        )
        input_ids, labels = self._resolve_placeholders(
            input_ids, labels, region_boxes, region_mask, num_user_boxes, ground_boxes, ground_boxes_mask
        )
        image_features = self.project_image_tokens(vision_maps)
        region_features = self.encode_regions(vision_maps, region_boxes, region_mask)
        inputs_embeds, _, hidden_positions = self._fill_slots(
            input_ids,
            self.embed_input_ids(input_ids),
            image_features,
            region_features,
            region_mask.to(input_ids.device),
            num_user_boxes,
        )

        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past_length + input_ids.shape[1], device=input_ids.device)
        if attention_mask.ndim != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"`attention_mask` must be a 2-D (batch, seq_len) mask; got {tuple(attention_mask.shape)}."
            )
        attention_mask = attention_mask.clone()
        attention_mask[:, attention_mask.shape[1] - input_ids.shape[1] :][hidden_positions] = 0

        outputs = self._language_forward(
            None, inputs_embeds, attention_mask, position_ids, past_key_values, labels, use_cache, **kwargs
        )
        outputs.region_boxes = region_boxes
        outputs.region_mask = region_mask
        outputs.region_scores = region_scores
        outputs.image_hidden_states = image_features
        outputs.proposer_outputs = proposals
        return outputs

    def _language_forward(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Cache | None,
        labels: torch.LongTensor | None,
        use_cache: bool | None,
        **kwargs: Any,
    ) -> GromaModelOutputWithPast:
        """Run the LLM. Position ids default to `cumsum(attention_mask) - 1` so hidden slots take no positions."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        seq_len = inputs_embeds.shape[1]
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        return GromaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=attention_mask,
            labels=labels,
        )


# ----------------------------------------------------------------------------------------------------------------
# Head


class GromaForConditionalGeneration(GromaPreTrainedModel, GenerationMixin):
    """Groma with its LM heads: `lm_head` over the LLM vocabulary and `extra_lm_head` over Groma's new tokens.

    Logits are `cat(lm_head(h), extra_lm_head(h))`, width `text_vocab + num_new_tokens` (32114 for groma-7b).
    `resize_token_embeddings` is not supported: Groma's token ids are fixed by `text_config.vocab_size` and
    `max_region_num` (change `max_region_num` in the config instead).
    """

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: GromaConfig):
        super().__init__(config)
        self.model = GromaModel(config)
        hidden_size = config.text_config.hidden_size
        self.lm_head = nn.Linear(hidden_size, config.text_config.vocab_size, bias=False)
        self.extra_lm_head = nn.Linear(hidden_size, config.num_new_tokens, bias=False)
        self.loss_type = "ForCausalLM"
        self.post_init()
        suppress_placeholder_tokens(
            self,
            [
                config.image_token_id,
                config.region_token_id,
                config.refer_box_token_id,
                config.ground_box_token_id,
                config.refer_feat_token_id,
                config.new_token_id("[PAD]"),
                config.new_token_id("<sep>"),
            ],
        )

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args: Any, **kwargs: Any) -> nn.Embedding:
        """A no-op when `new_num_tokens` is None or already the extended vocabulary size; anything else raises."""
        if new_num_tokens is None or new_num_tokens == self.config.total_vocab_size:
            return self.get_input_embeddings()
        raise ValueError(
            f"Groma's vocabulary is fixed: {self.config.text_config.vocab_size} LLM tokens + "
            f"{self.config.num_new_tokens} Groma tokens = {self.config.total_vocab_size}; got new_num_tokens="
            f"{new_num_tokens}. Build the tokenizer with groma_special_tokens(max_region_num), or change "
            f"`max_region_num` in the config."
        )

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_regions(
        self,
        pixel_values: torch.Tensor,
        refer_boxes: torch.Tensor | None = None,
        refer_boxes_mask: torch.Tensor | None = None,
    ) -> GromaRegionsOutput:
        """See `GromaModel.get_regions`."""
        return self.model.get_regions(pixel_values, refer_boxes, refer_boxes_mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        refer_boxes: torch.FloatTensor | None = None,
        refer_boxes_mask: torch.BoolTensor | None = None,
        ground_boxes: torch.FloatTensor | None = None,
        ground_boxes_mask: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        detection_targets: list[dict[str, torch.Tensor]] | None = None,
        image_sizes: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> GromaCausalLMOutputWithPast:
        """Grounded chat, region-conditioned chat, or detection pretraining.

        Args:
            input_ids: `(B, L)` ids of the extended vocabulary from `GromaProcessor`: the prompt carries
                `num_image_tokens` `<image>` tokens and `max_region_num` slots `<r0><region>...<r{M-1}><region>`;
                user box i is referred to as `<roi><r{i}></roi><refer_feat>` (a `<refer_box>` is resolved to `<r{i}>`
                here); training answers carry one `<ground_box>` per ground-truth box.
            pixel_values: `(B, 3, S, S)` float, S = `config.image_size`, ImageNet-normalized. Present on the prefill
                step only; decode steps reuse the KV cache.
            attention_mask: `(B, L_total)` 1 on real tokens. Both tokens of each empty region slot are set to 0 and
                the result is returned as `attention_mask`.
            position_ids: `(B, L)`; default `cumsum(attention_mask) - 1` (clamped at 0), so hidden slots take no
                positions, in training and generation alike.
            refer_boxes, refer_boxes_mask: `(B, R, 4)` normalized xyxy user boxes in [0, 1] and `(B, R)` bool;
                they take region slots 0..R-1.
            ground_boxes, ground_boxes_mask: `(B, G, 4)` normalized xyxy ground-truth answer boxes and `(B, G)`
                bool (training only): merged into the candidates with score 0.2, then each `<ground_box>` in
                `input_ids` and `labels` becomes `<rK>`, K the slot with the highest IoU.
            labels: `(B, L)` next-token targets, -100 on the prompt.
            detection_targets: detection pretraining (section 3.3, stage 1): one `{"boxes": (n, 4) normalized
                cxcywh}` per image; adds the proposer's Hungarian set loss (focal + L1 + GIoU, costs 2/5/2). With no
                `input_ids`, only the vision tower and proposer run.
            image_sizes: `(B, 2)` original (height, width); unused here (post-processing reads it).
            logits_to_keep: compute logits for the last `logits_to_keep` positions only (0 = all).

        Returns:
            `GromaCausalLMOutputWithPast` with `loss`, `logits (B, L, text_vocab + num_new_tokens)`,
            `past_key_values`, the effective `attention_mask`, `region_boxes (B, M, 4)` normalized xyxy,
            `region_mask (B, M)`, `region_scores (B, M)`, `proposer_outputs` and `loss_dict`.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            refer_boxes=refer_boxes,
            refer_boxes_mask=refer_boxes_mask,
            ground_boxes=ground_boxes,
            ground_boxes_mask=ground_boxes_mask,
            labels=labels,
            detection_targets=detection_targets,
            image_sizes=image_sizes,
            use_cache=use_cache,
            **kwargs,
        )
        loss, logits, loss_dict = None, None, {}
        if outputs.last_hidden_state is not None:
            hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
            logits = torch.cat([self.lm_head(hidden_states), self.extra_lm_head(hidden_states)], dim=-1)
            if labels is not None:
                loss = self.loss_function(
                    logits=logits,
                    labels=outputs.labels,
                    vocab_size=self.config.total_vocab_size,
                    num_items_in_batch=num_items_in_batch,
                )
                loss_dict["lm_loss"] = loss.detach()
        proposer_outputs = outputs.proposer_outputs
        if proposer_outputs is not None and proposer_outputs.loss is not None:
            loss = proposer_outputs.loss if loss is None else loss + proposer_outputs.loss
            loss_dict["proposer_loss"] = proposer_outputs.loss.detach()
            loss_dict.update(
                {f"proposer_{name}": value.detach() for name, value in proposer_outputs.loss_dict.items()}
            )

        return GromaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=outputs.attention_mask,
            labels=outputs.labels,
            region_boxes=outputs.region_boxes,
            region_mask=outputs.region_mask,
            region_scores=outputs.region_scores,
            image_hidden_states=outputs.image_hidden_states,
            proposer_outputs=proposer_outputs,
            loss_dict=loss_dict or None,
        )

    # ---- generation ---------------------------------------------------------------------------------------------

    _PREFILL_ONLY_INPUTS = (
        "pixel_values",
        "refer_boxes",
        "refer_boxes_mask",
        "ground_boxes",
        "ground_boxes_mask",
        "detection_targets",
        "image_sizes",
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
        """Region inputs (`pixel_values`, `refer_boxes`, ...) go to the prefill step only (or to every step without a
        KV cache); later steps feed one token and the effective mask."""
        region_inputs = {name: kwargs.pop(name, None) for name in self._PREFILL_ONLY_INPUTS}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs.update({name: value for name, value in region_inputs.items() if value is not None})
        return model_inputs

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict[str, Any],
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict[str, Any]:
        # After prefill the mask must keep empty region slots hidden for every decode step.
        effective_mask = getattr(outputs, "attention_mask", None)
        if effective_mask is not None:
            model_kwargs["attention_mask"] = effective_mask
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
