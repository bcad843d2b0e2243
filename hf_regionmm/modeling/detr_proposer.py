"""Class-agnostic Deformable-DETR region proposer: Groma's "Region Proposer" (paper section 3.1, appendix C).

Groma localises regions of interest with a two-stage Deformable DETR whose classifier is replaced by binary
objectness heads, on top of frozen DINOv2 patch features. Data flow in this file, top to bottom:

1. ``input_proj``: the ViT map(s) ``(B, input_dim, H, W)`` become ``num_feature_levels`` maps of width ``d_model``
   (a ViTDet-like simple pyramid; the released model uses one level, a 1x1 conv + channel LayerNorm).
2. ``encoder``: deformable self-attention over the flattened pyramid (transformers' ``DeformableDetrEncoderLayer``).
3. Two-stage query selection: every encoder position proposes a box (``enc_output`` + ``class_embed_enc`` +
   ``bbox_embed[-1]``); the ``num_queries`` best seed the decoder's reference boxes and positional queries.
4. ``decoder``: transformers' ``DeformableDetrDecoderLayer`` stack with per-layer box refinement; see
   ``DetrProposerConfig.update_reference_points`` for the released quirk (sampling points never move).
5. Heads: one box per query (normalized cxcywh of the input image) and one logit per objectness head, fused into
   ``score = prod_h sigmoid(logit_h) ** w_h`` (released: ``sigmoid(coco) ** 0.4 * sigmoid(sa1b) ** 0.6``).
6. Optional Hungarian set loss (``hungarian_matching.SetCriterion``) per objectness head.

Everything that transformers already ships is reused, not copied: the encoder/decoder layers, the pure-PyTorch
``MultiScaleDeformableAttention``, the sine position embedding, the box MLP, ``inverse_sigmoid``, and
``DeformableDetrModel``'s two-stage helpers (``gen_encoder_output_proposals``, ``get_proposal_pos_embed``,
``get_valid_ratio``), which only read attributes this class defines under the same names.

Checkpoint names follow the released ``perceiver.ddetr_transformer.*`` / ``perceiver.input_proj.*`` keys so a
converter maps them one to one: ``input_proj.{level}.{i}``, ``level_embed``, ``encoder.layers.{i}``,
``decoder.layers.{i}``, ``query_position_embeddings``, ``enc_output(_norm)``, ``pos_trans(_norm)``,
``class_embed_enc``, ``bbox_embed.{0..decoder_layers}``. The released ``class_embed_{name}.{i}`` are
``objectness_heads.{name}.{i}`` here. The released aliases ``decoder.bbox_embed.*`` / ``decoder.class_embed_*`` are
duplicates and are dropped (this decoder receives the box heads as an argument instead of holding them). transformers
4.32's ``fc1/fc2`` and ``self_attn.out_proj`` became ``mlp.fc1/mlp.fc2`` and ``self_attn.o_proj`` in 5.x.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrDecoderLayer,
    DeformableDetrEncoder,
    DeformableDetrEncoderLayer,
    DeformableDetrMLPPredictionHead,
    DeformableDetrModel,
    DeformableDetrMultiscaleDeformableAttention,
    DeformableDetrPreTrainedModel,
    DeformableDetrSinePositionEmbedding,
    inverse_sigmoid,
)
from transformers.utils import ModelOutput

from .box_ops import validate_boxes
from .configuration_detr_proposer import DetrProposerConfig
from .hungarian_matching import HungarianMatcher, SetCriterion

__all__ = ["DetrProposer", "DetrProposerOutput", "build_level_projection", "PYRAMID_SCALES"]

# Scale of each pyramid level relative to the ViT map, finest level first (the released code builds the list
# coarse-to-fine and reverses it, so `input_proj.0` is always the finest level and gets the smallest 0.05 anchors).
PYRAMID_SCALES = {1: ("x1",), 2: ("x1", "/2"), 3: ("x2", "x1", "/2"), 4: ("x4", "x2", "x1", "/2")}

# Deformable DETR's focal-loss prior: every objectness logit starts at sigmoid^-1(0.01).
_PRIOR_PROBABILITY = 0.01


@dataclass
class DetrProposerOutput(ModelOutput):
    r"""Output of [`DetrProposer`]. ``B`` images, ``Q = num_queries``, ``H`` objectness heads, ``L`` decoder layers,
    ``S`` flattened encoder positions over all pyramid levels.

    Args:
        loss: scalar, the Hungarian set loss (only when ``targets`` are given).
        loss_dict: the unweighted named terms (``loss_ce``, ``loss_bbox``, ``loss_giou``, ``_{i}`` per auxiliary
            decoder layer, ``_enc`` for the encoder proposals); prefixed ``{head}_`` with several objectness heads,
            plus ``{head}_loss``, that head's weighted sum.
        scores: ``(B, Q)`` float in ``[0, 1]``, fused objectness ``prod_h sigmoid(logits[..., h]) ** w_h``.
        logits: ``(B, Q, H)`` pre-sigmoid logits of each objectness head (order of ``config.objectness_heads``).
        pred_boxes: ``(B, Q, 4)`` normalized cxcywh in ``[0, 1]`` of the input image frame (the frame the vision
            tower saw, e.g. Groma's 448x448 resize).
        encoder_last_hidden_state: ``(B, S, d_model)``.
        decoder_last_hidden_state: ``(B, Q, d_model)``.
        aux_outputs: one dict per decoder layer but the last, ``{"logits": (B, Q, H), "pred_boxes": (B, Q, 4),
            "scores": (B, Q)}``.
        enc_outputs: two-stage encoder proposals ``{"logits": (B, S, 1), "pred_boxes": (B, S, 4), "topk_indices":
            (B, Q) int64}``; invalid (padded or border) positions carry boxes saturated to 1. ``None`` without
            ``two_stage``.
        init_reference_points: ``(B, Q, 4)`` normalized cxcywh boxes the decoder starts from (two-stage: the
            selected encoder proposals), or ``(B, Q, 2)`` centres without ``two_stage``.
        sampling_reference_points: ``L`` tensors ``(B, Q, 4 | 2)``, the reference each decoder layer sampled around
            (all equal to ``init_reference_points`` when ``update_reference_points=False``; centres become boxes
            after the first refinement without two-stage).
        spatial_shapes: ``(num_feature_levels, 2)`` int64 ``(height, width)`` of each pyramid level.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    scores: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    decoder_last_hidden_state: torch.FloatTensor | None = None
    aux_outputs: list[dict[str, torch.Tensor]] | None = None
    enc_outputs: dict[str, torch.Tensor] | None = None
    init_reference_points: torch.FloatTensor | None = None
    sampling_reference_points: tuple[torch.FloatTensor, ...] | None = None
    spatial_shapes: torch.LongTensor | None = None


def _channel_layer_norm(channels: int) -> ConvNextLayerNorm:
    # The released `LayerNorm` normalises (B, C, H, W) over C with eps 1e-6; ConvNext's channels-first norm is the
    # same computation with the same `weight` / `bias` names.
    return ConvNextLayerNorm(channels, eps=1e-6, data_format="channels_first")


def build_level_projection(scale: str, input_dim: int, d_model: int) -> nn.Sequential:
    """One pyramid level: rescale a ``(B, input_dim, H, W)`` ViT map and project it to ``(B, d_model, H', W')``.

    Layouts are those of the original Groma code (so multi-level checkpoints convert by index):

    * ``"x1"``: 1x1 conv, channel LayerNorm (the released single level).
    * ``"/2"``: 3x3 stride-2 conv, channel LayerNorm. ``H' = ceil(H / 2)``.
    * ``"x2"``: 2x2 stride-2 transposed conv to ``d_model / 2``, 1x1 conv, channel LayerNorm, 3x3 conv.
    * ``"x4"``: two 2x2 stride-2 transposed convs (``d_model / 2`` then ``/ 4``, LayerNorm + GELU between), 1x1 conv,
      channel LayerNorm, 3x3 conv.
    """
    if scale == "x1":
        return nn.Sequential(nn.Conv2d(input_dim, d_model, kernel_size=1), _channel_layer_norm(d_model))
    if scale == "/2":
        return nn.Sequential(
            nn.Conv2d(input_dim, d_model, kernel_size=3, stride=2, padding=1), _channel_layer_norm(d_model)
        )
    if scale == "x2":
        return nn.Sequential(
            nn.ConvTranspose2d(input_dim, d_model // 2, kernel_size=2, stride=2),
            nn.Conv2d(d_model // 2, d_model, kernel_size=1),
            _channel_layer_norm(d_model),
            nn.Conv2d(d_model, d_model, kernel_size=3, padding=1),
        )
    if scale == "x4":
        return nn.Sequential(
            nn.ConvTranspose2d(input_dim, d_model // 2, kernel_size=2, stride=2),
            _channel_layer_norm(d_model // 2),
            nn.GELU(),
            nn.ConvTranspose2d(d_model // 2, d_model // 4, kernel_size=2, stride=2),
            nn.Conv2d(d_model // 4, d_model, kernel_size=1),
            _channel_layer_norm(d_model),
            nn.Conv2d(d_model, d_model, kernel_size=3, padding=1),
        )
    raise ValueError(f"`scale` must be one of 'x4', 'x2', 'x1', '/2'; got {scale!r}.")


def _apply_box_delta(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Boxes ``(..., 4)`` normalized cxcywh from a head's logit-space ``delta (..., 4)`` around ``reference``.

    ``reference`` is ``(..., 4)`` normalized cxcywh, or ``(..., 2)`` normalized centres (then the size comes from
    ``delta`` alone), both in ``[0, 1]``.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], dim=-1).sigmoid()


class DetrProposerEncoder(nn.Module):
    """Deformable self-attention over the flattened pyramid: a stack of transformers' ``DeformableDetrEncoderLayer``."""

    def __init__(self, config: DetrProposerConfig):
        super().__init__()
        self.layers = nn.ModuleList([DeformableDetrEncoderLayer(config) for _ in range(config.encoder_layers)])

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.BoolTensor,
        position_embeddings: torch.Tensor,
        spatial_shapes: torch.LongTensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.LongTensor,
        valid_ratios: torch.Tensor,
    ) -> torch.Tensor:
        """Encode the pyramid.

        Args:
            inputs_embeds: ``(B, S, d_model)`` flattened projected levels, finest level first, row-major.
            attention_mask: ``(B, S)`` bool, True on valid (non-padded) positions.
            position_embeddings: ``(B, S, d_model)`` sine position + level embeddings.
            spatial_shapes: ``(num_levels, 2)`` int64 ``(height, width)``; ``spatial_shapes_list`` the same as ints.
            level_start_index: ``(num_levels,)`` int64 offset of each level in ``S``.
            valid_ratios: ``(B, num_levels, 2)`` float ``(width, height)`` fraction of each level that is valid.

        Returns:
            ``(B, S, d_model)`` encoded features.
        """
        reference_points = DeformableDetrEncoder.get_reference_points(
            tuple(spatial_shapes_list), valid_ratios, device=inputs_embeds.device
        )
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask,
                spatial_position_embeddings=position_embeddings,
                reference_points=reference_points,
                spatial_shapes=spatial_shapes,
                spatial_shapes_list=spatial_shapes_list,
                level_start_index=level_start_index,
            )
        return hidden_states


class DetrProposerDecoder(nn.Module):
    """Deformable decoder (transformers' ``DeformableDetrDecoderLayer`` stack) with per-layer box refinement.

    Layer ``l`` predicts ``boxes_l = sigmoid(box_heads[l](h_l) + logit(box_reference_l))``. With
    ``update_reference_points=True`` (standard iterative refinement) ``box_reference_l`` is ``boxes_{l-1}``
    detached, and it is also where layer ``l`` samples. With ``False`` (released Groma) every layer samples around
    the initial references ``r``, and ``box_reference_l = sigmoid(box_heads[l-1](h_{l-1}) + logit(r))`` without
    detaching, so each box adds two consecutive deltas on ``r`` and gradients reach the previous layer's head.
    Without box refinement every layer uses the same head around ``r``.
    """

    def __init__(self, config: DetrProposerConfig):
        super().__init__()
        self.layers = nn.ModuleList([DeformableDetrDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.with_box_refine = config.with_box_refine
        self.update_reference_points = config.update_reference_points

    def forward(
        self,
        content_queries: torch.Tensor,
        query_position_embeddings: torch.Tensor,
        reference_points: torch.Tensor,
        box_heads: Sequence[nn.Module],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.BoolTensor,
        spatial_shapes: torch.LongTensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.LongTensor,
        valid_ratios: torch.Tensor,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Decode the queries.

        Args:
            content_queries: ``(B, Q, d_model)`` decoder input.
            query_position_embeddings: ``(B, Q, d_model)`` positional queries added in every attention.
            reference_points: ``(B, Q, 4)`` normalized cxcywh boxes or ``(B, Q, 2)`` normalized centres.
            box_heads: one module ``(..., d_model) -> (..., 4)`` per layer (logit-space box deltas).
            encoder_hidden_states: ``(B, S, d_model)``; ``encoder_attention_mask`` ``(B, S)`` bool, True = valid.
            spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios: as in ``DetrProposerEncoder``.

        Returns:
            Per layer: hidden states ``(B, Q, d_model)``, boxes ``(B, Q, 4)`` normalized cxcywh, and the reference
            the layer sampled around (``(B, Q, 4 | 2)``, normalized).
        """
        hidden_states = content_queries
        sampling_reference = box_reference = reference_points
        all_hidden_states, all_boxes, all_sampling_references = [], [], []
        for layer_index, layer in enumerate(self.layers):
            if sampling_reference.shape[-1] == 4:
                level_reference = sampling_reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                level_reference = sampling_reference[:, :, None] * valid_ratios[:, None]
            # Positional arguments, as transformers' decoder passes them, so gradient checkpointing sees the tensors.
            hidden_states = layer(
                hidden_states,
                query_position_embeddings,
                level_reference,
                spatial_shapes,
                spatial_shapes_list,
                level_start_index,
                encoder_hidden_states,
                encoder_attention_mask,
            )
            delta = box_heads[layer_index](hidden_states)
            all_hidden_states.append(hidden_states)
            all_boxes.append(_apply_box_delta(delta, box_reference))
            all_sampling_references.append(sampling_reference)
            if not self.with_box_refine:
                continue
            if self.update_reference_points:
                sampling_reference = box_reference = all_boxes[-1].detach()
            else:
                # Released Groma: the reference update is commented out, yet the next box still builds on this
                # layer's (undetached) refinement of the initial references.
                box_reference = _apply_box_delta(delta, sampling_reference)
        return all_hidden_states, all_boxes, all_sampling_references


class DetrProposer(DeformableDetrPreTrainedModel):
    """Groma's class-agnostic two-stage Deformable-DETR region proposer on ViT patch features.

    Subclasses transformers' ``DeformableDetrPreTrainedModel`` for its weight init (deformable-attention sampling
    grid, level embeddings) and attention-backend support; ``config`` is a [`DetrProposerConfig`].
    """

    config: DetrProposerConfig
    main_input_name = "features"
    input_modalities = ("image",)
    _no_split_modules = ["DeformableDetrEncoderLayer", "DeformableDetrDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = None

    # DeformableDetrModel's two-stage helpers only read `config.d_model`, `enc_output` and `enc_output_norm`.
    gen_encoder_output_proposals = DeformableDetrModel.gen_encoder_output_proposals
    get_proposal_pos_embed = DeformableDetrModel.get_proposal_pos_embed
    get_valid_ratio = DeformableDetrModel.get_valid_ratio

    def __init__(self, config: DetrProposerConfig):
        super().__init__(config)
        d_model = config.d_model
        self.pyramid_scales = PYRAMID_SCALES[config.num_feature_levels]
        self.input_proj = nn.ModuleList(
            [build_level_projection(scale, config.input_dim, d_model) for scale in self.pyramid_scales]
        )
        self.position_embedding = DeformableDetrSinePositionEmbedding(d_model // 2, normalize=True)
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, d_model))
        self.encoder = DetrProposerEncoder(config)
        self.decoder = DetrProposerDecoder(config)

        if not config.two_stage:
            # Positional and content halves of learned queries, as in single-stage Deformable DETR.
            self.query_position_embeddings = nn.Embedding(config.num_queries, 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)
        else:
            if config.content_queries == "query_embeddings":
                self.query_position_embeddings = nn.Embedding(config.num_queries, d_model)
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
            self.class_embed_enc = nn.Linear(d_model, 1)

        # Per-layer heads with box refinement; one shared head otherwise. Two-stage adds the encoder's box head.
        num_layer_heads = config.decoder_layers if config.with_box_refine else 1
        self.objectness_heads = nn.ModuleDict(
            {
                head: nn.ModuleList([nn.Linear(d_model, 1) for _ in range(num_layer_heads)])
                for head in config.objectness_heads
            }
        )
        self.bbox_embed = nn.ModuleList(
            [
                DeformableDetrMLPPredictionHead(input_dim=d_model, hidden_dim=d_model, output_dim=4, num_layers=3)
                for _ in range(num_layer_heads + int(config.two_stage))
            ]
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' DeformableDetr init: normal(init_std) linears/convs, the deformable-attention sampling grid,
        # normal level embeddings (and xavier `reference_points` without two-stage).
        super()._init_weights(module)
        if module is not self:
            return
        # For custom (non-transformers) code, transformers skips every module without parameters of its own, such as
        # the deformable attention wrappers and the box MLPs, so the composite parts are initialised from the root,
        # which is visited last.
        for submodule in self.modules():
            if isinstance(submodule, DeformableDetrMultiscaleDeformableAttention):
                super()._init_weights(submodule)
        for level in self.input_proj:
            init.xavier_uniform_(level[0].weight, gain=1.0)
            init.zeros_(level[0].bias)
        for box_head in self.bbox_embed:
            # Boxes start exactly at their references; without two-stage the first head starts from 0.12-wide boxes.
            init.zeros_(box_head.layers[-1].weight)
            size_bias = -2.0 if not self.config.two_stage and box_head is self.bbox_embed[0] else 0.0
            init.copy_(box_head.layers[-1].bias, torch.tensor([0.0, 0.0, size_bias, size_bias]))
        prior_logit = -math.log((1 - _PRIOR_PROBABILITY) / _PRIOR_PROBABILITY)
        objectness_layers = [layer for head in self.objectness_heads.values() for layer in head]
        if self.config.two_stage:
            objectness_layers.append(self.class_embed_enc)
        for layer in objectness_layers:
            init.constant_(layer.bias, prior_logit)

    def forward(
        self,
        features: torch.Tensor | Sequence[torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
        pixel_mask: torch.Tensor | None = None,
    ) -> DetrProposerOutput:
        """Propose class-agnostic regions.

        Args:
            features: the vision tower's patch-feature map ``(B, input_dim, H, W)`` float (Groma: mean of the last 4
                DINOv2 hidden states, CLS dropped, reshaped to the 32x32 grid), from which all pyramid levels are
                built; or a sequence of ``num_feature_levels`` such maps, map ``l`` feeding level ``l`` (finest
                first; each goes through its own rescaling).
            targets: optional, one dict per image for the set loss: ``"boxes"`` ``(n, 4)`` float normalized cxcywh
                in ``[0, 1]`` of the input image frame; optional ``"class_labels"`` ``(n,)`` int (ignored beyond
                its shape: the proposer is class-agnostic, every box is objectness class 0); optional ``"source"``,
                the name of the objectness head this image trains (released Groma: ``"coco"`` for detection data,
                ``"sa1b"`` for SA-1B). Without ``"source"`` the image trains every head.
            pixel_mask: optional ``(B, h, w)`` bool/int, 1 on valid (non-padded) feature positions, at any
                resolution (resized to each level with nearest interpolation). Default: all valid.

        Returns:
            [`DetrProposerOutput`]: fused ``scores (B, Q)``, per-head ``logits (B, Q, H)``, ``pred_boxes (B, Q, 4)``
            normalized cxcywh, and with ``targets`` the ``loss`` / ``loss_dict``.

        Loss with several objectness heads: for head ``h`` the criterion runs on ``logits[..., h]`` as a binary
        objectness detector over the images assigned to ``h`` (their ``"source"`` or all images), and the
        total is ``sum_h (n_h / sum_k n_k) * loss_h`` with ``n_h`` the number of images assigned to ``h``. A batch
        whose images all name one source gives the released training loss (released training groups batches by
        data source and trains only that source's head); without sources it is the mean over heads.
        """
        feature_maps = self._check_features(features)
        batch_size = feature_maps[0].shape[0]
        if targets is not None:
            targets = self._check_targets(targets, batch_size)
        sources, masks = self._build_pyramid(feature_maps, pixel_mask)

        # Flatten the pyramid (finest level first), adding each level's learned embedding to its positions.
        spatial_shapes_list = [tuple(source.shape[-2:]) for source in sources]
        inputs_embeds = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        position_embeddings = torch.cat(
            [
                self.position_embedding(shape=source.shape, device=source.device, dtype=source.dtype, mask=mask)
                .flatten(2)
                .transpose(1, 2)
                + self.level_embed[level].view(1, 1, -1)
                for level, (source, mask) in enumerate(zip(sources, masks))
            ],
            1,
        )
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=inputs_embeds.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(mask, dtype=inputs_embeds.dtype) for mask in masks], 1)

        encoder_hidden_states = self.encoder(
            inputs_embeds,
            mask_flatten,
            position_embeddings,
            spatial_shapes,
            spatial_shapes_list,
            level_start_index,
            valid_ratios,
        )
        content_queries, query_position, init_reference, enc_outputs = self._select_queries(
            encoder_hidden_states, mask_flatten, spatial_shapes_list
        )
        num_layer_heads = len(self.bbox_embed) - int(self.config.two_stage)
        box_heads = [self.bbox_embed[min(layer, num_layer_heads - 1)] for layer in range(self.config.decoder_layers)]
        layer_hidden_states, layer_boxes, sampling_references = self.decoder(
            content_queries,
            query_position,
            init_reference,
            box_heads,
            encoder_hidden_states,
            mask_flatten,
            spatial_shapes,
            spatial_shapes_list,
            level_start_index,
            valid_ratios,
        )
        layer_logits = [
            torch.cat(
                [head[min(layer, num_layer_heads - 1)](hidden) for head in self.objectness_heads.values()], dim=-1
            )
            for layer, hidden in enumerate(layer_hidden_states)
        ]
        layer_scores = [self.fuse_objectness(logits) for logits in layer_logits]

        loss, loss_dict = None, None
        if targets is not None:
            loss, loss_dict = self._set_loss(layer_logits, layer_boxes, enc_outputs, targets)

        return DetrProposerOutput(
            loss=loss,
            loss_dict=loss_dict,
            scores=layer_scores[-1],
            logits=layer_logits[-1],
            pred_boxes=layer_boxes[-1],
            encoder_last_hidden_state=encoder_hidden_states,
            decoder_last_hidden_state=layer_hidden_states[-1],
            aux_outputs=[
                {"logits": logits, "pred_boxes": boxes, "scores": scores}
                for logits, boxes, scores in zip(layer_logits[:-1], layer_boxes[:-1], layer_scores[:-1])
            ],
            enc_outputs=enc_outputs,
            init_reference_points=init_reference,
            sampling_reference_points=tuple(sampling_references),
            spatial_shapes=spatial_shapes,
        )

    def fuse_objectness(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` objectness logits -> ``(...)`` fused score ``prod_h sigmoid(logits[..., h]) ** w_h`` in [0, 1].

        Computed as ``exp(sum_h w_h * logsigmoid(logit_h))``: the same number without underflow for very negative
        logits.
        """
        weights = logits.new_tensor(self.config.fused_objectness_weights)
        return torch.exp((nn.functional.logsigmoid(logits) * weights).sum(-1))

    def _check_features(self, features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Validate ``features`` and return one map per pyramid level source (1 or ``num_feature_levels``)."""
        maps = [features] if isinstance(features, torch.Tensor) else features
        if not isinstance(maps, Sequence) or len(maps) == 0:
            raise TypeError(
                f"`features` must be a tensor (B, {self.config.input_dim}, H, W) or a non-empty sequence of such "
                f"tensors; got {type(features).__name__}."
            )
        if len(maps) not in (1, self.config.num_feature_levels):
            raise ValueError(
                f"`features` has {len(maps)} maps but the proposer has {self.config.num_feature_levels} feature "
                f"levels; pass one map (every level is built from it) or exactly {self.config.num_feature_levels}."
            )
        dtype = self.input_proj[0][0].weight.dtype
        checked = []
        for index, feature_map in enumerate(maps):
            name = "features" if isinstance(features, torch.Tensor) else f"features[{index}]"
            if not isinstance(feature_map, torch.Tensor) or not feature_map.is_floating_point():
                raise TypeError(
                    f"`{name}` must be a floating point torch.Tensor (B, {self.config.input_dim}, H, W); got "
                    f"{getattr(feature_map, 'dtype', type(feature_map).__name__)}."
                )
            if feature_map.ndim != 4:
                hint = (
                    " These look like ViT tokens (B, N, C): drop the CLS token and reshape with "
                    "`tokens.transpose(1, 2).reshape(B, C, h, w)`."
                    if feature_map.ndim == 3
                    else ""
                )
                raise ValueError(
                    f"`{name}` must have shape (batch, input_dim={self.config.input_dim}, height, width); got shape "
                    f"{tuple(feature_map.shape)}.{hint}"
                )
            if feature_map.shape[1] != self.config.input_dim:
                raise ValueError(
                    f"`{name}` has {feature_map.shape[1]} channels but `config.input_dim` is {self.config.input_dim}"
                    f" (shape {tuple(feature_map.shape)}); pass channels-first maps (B, C, H, W) from a vision tower "
                    f"of that width or set `input_dim`."
                )
            if feature_map.shape[0] != maps[0].shape[0]:
                raise ValueError(f"`features` maps disagree on batch size: {[m.shape[0] for m in maps]}.")
            if feature_map.shape[0] == 0 or feature_map.shape[2] == 0 or feature_map.shape[3] == 0:
                raise ValueError(f"`{name}` is empty (shape {tuple(feature_map.shape)}).")
            checked.append(feature_map.to(dtype))
        return checked

    def _build_pyramid(
        self, feature_maps: list[torch.Tensor], pixel_mask: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.BoolTensor]]:
        """Project the map(s) into ``num_feature_levels`` maps ``(B, d_model, H_l, W_l)`` and their valid masks
        ``(B, H_l, W_l)`` bool (True = valid)."""
        batch_size = feature_maps[0].shape[0]
        if pixel_mask is not None:
            if not isinstance(pixel_mask, torch.Tensor) or pixel_mask.ndim != 3 or pixel_mask.shape[0] != batch_size:
                raise ValueError(
                    f"`pixel_mask` must be a tensor (batch={batch_size}, h, w) with 1 on valid positions; got "
                    f"{tuple(pixel_mask.shape) if isinstance(pixel_mask, torch.Tensor) else type(pixel_mask).__name__}."
                )
            if not bool(pixel_mask.flatten(1).any(1).all()):
                raise ValueError("`pixel_mask` marks every position of some image as padding; keep at least one.")
        sources, masks = [], []
        for level, projection in enumerate(self.input_proj):
            source = projection(feature_maps[level if len(feature_maps) > 1 else 0])
            if pixel_mask is None:
                mask = torch.ones(source.shape[:1] + source.shape[2:], dtype=torch.bool, device=source.device)
            else:
                mask = nn.functional.interpolate(
                    pixel_mask[None].to(source.device, torch.float32), size=source.shape[-2:]
                ).bool()[0]
            sources.append(source)
            masks.append(mask)
        return sources, masks

    def _select_queries(
        self, encoder_hidden_states: torch.Tensor, mask_flatten: torch.BoolTensor, spatial_shapes_list: list
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Decoder inputs: content queries and positional queries ``(B, Q, d_model)``, initial references
        ``(B, Q, 4 | 2)`` and the two-stage encoder proposals (``None`` without two-stage)."""
        batch_size, num_positions, d_model = encoder_hidden_states.shape
        num_queries = self.config.num_queries
        if not self.config.two_stage:
            query_position, content_queries = self.query_position_embeddings.weight.split(d_model, dim=1)
            query_position = query_position.unsqueeze(0).expand(batch_size, -1, -1)
            content_queries = content_queries.unsqueeze(0).expand(batch_size, -1, -1)
            return content_queries, query_position, self.reference_points(query_position).sigmoid(), None

        if num_positions < num_queries:
            raise ValueError(
                f"The feature pyramid has only {num_positions} positions (levels {spatial_shapes_list}) but "
                f"`config.num_queries` is {num_queries}: two-stage selection keeps the top {num_queries}. Pass "
                f"larger feature maps or lower `num_queries`."
            )
        object_query, output_proposals = self.gen_encoder_output_proposals(
            encoder_hidden_states, ~mask_flatten, spatial_shapes_list
        )
        enc_logits = self.class_embed_enc(object_query)
        enc_coord_logits = self.bbox_embed[-1](object_query) + output_proposals
        topk_indices = torch.topk(enc_logits[..., 0], num_queries, dim=1).indices
        # Proposals seed the decoder as fixed anchors: no gradient flows back through the selection.
        topk_coord_logits = torch.gather(enc_coord_logits, 1, topk_indices.unsqueeze(-1).expand(-1, -1, 4)).detach()
        pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coord_logits)))
        query_position, split_content = pos_trans_out.split(d_model, dim=-1)
        if self.config.content_queries == "query_embeddings":
            content_queries = self.query_position_embeddings.weight.unsqueeze(0).expand(batch_size, -1, -1)
        else:
            content_queries = split_content
        enc_outputs = {
            "logits": enc_logits,
            "pred_boxes": enc_coord_logits.sigmoid(),
            "topk_indices": topk_indices,
        }
        return content_queries, query_position, topk_coord_logits.sigmoid(), enc_outputs

    def _check_targets(self, targets: list[dict[str, torch.Tensor]], batch_size: int) -> list[dict]:
        """Validate ``targets`` and return them as ``{"class_labels": zeros (n,), "boxes": (n, 4), "source"}``."""
        if not isinstance(targets, (list, tuple)):
            raise TypeError(f"`targets` must be a list of dicts, one per image; got {type(targets).__name__}.")
        if len(targets) != batch_size:
            raise ValueError(f"`targets` has {len(targets)} entries but `features` has batch size {batch_size}.")
        heads = self.config.objectness_heads
        checked = []
        for index, target in enumerate(targets):
            if not isinstance(target, dict) or "boxes" not in target:
                raise ValueError(
                    f"`targets[{index}]` must be a dict with 'boxes' (n, 4) normalized cxcywh; got "
                    f"{type(target).__name__}{' with keys ' + str(sorted(target)) if isinstance(target, dict) else ''}."
                )
            name = f"targets[{index}]['boxes']"
            boxes = target["boxes"]
            if isinstance(boxes, torch.Tensor) and boxes.ndim != 2:
                raise ValueError(f"`{name}` must have shape (n, 4); got {tuple(boxes.shape)}.")
            validate_boxes(boxes, name, fmt="cxcywh")
            outside = ((boxes < 0) | (boxes > 1)).any(-1)
            if bool(outside.any()):
                box_index = int(outside.nonzero()[0, 0])
                raise ValueError(
                    f"`{name}` must be normalized cxcywh in [0, 1] of the input image; got box {box_index} = "
                    f"{[round(value, 4) for value in boxes[box_index].tolist()]}. Divide pixel boxes by the image "
                    f"size (box_ops.normalize_boxes) and convert xyxy with box_ops.box_xyxy_to_cxcywh."
                )
            labels = target.get("class_labels")
            if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != boxes.shape[:1]):
                raise ValueError(
                    f"`targets[{index}]['class_labels']` must be a tensor of shape ({boxes.shape[0]},) matching "
                    f"'boxes'; got {tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)}."
                )
            source = target.get("source")
            if source is not None and source not in heads:
                raise ValueError(
                    f"`targets[{index}]['source']` must name an objectness head {heads}; got {source!r}. Omit it to "
                    f"train every head on this image."
                )
            checked.append(
                {
                    "class_labels": torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device),
                    "boxes": boxes,
                    "source": source,
                }
            )
        return checked

    def build_criterion(self) -> SetCriterion:
        """The Hungarian set criterion configured from ``config`` (class-agnostic: one objectness class)."""
        matcher = HungarianMatcher(
            class_cost=self.config.class_cost,
            bbox_cost=self.config.bbox_cost,
            giou_cost=self.config.giou_cost,
            focal_alpha=self.config.focal_alpha,
            focal_gamma=self.config.focal_gamma,
        )
        weight_dict = {
            "loss_ce": self.config.class_loss_coefficient,
            "loss_bbox": self.config.bbox_loss_coefficient,
            "loss_giou": self.config.giou_loss_coefficient,
        }
        return SetCriterion(
            matcher,
            num_classes=1,
            weight_dict=weight_dict,
            focal_alpha=self.config.focal_alpha,
            focal_gamma=self.config.focal_gamma,
        )

    def _set_loss(
        self,
        layer_logits: list[torch.Tensor],
        layer_boxes: list[torch.Tensor],
        enc_outputs: dict[str, torch.Tensor] | None,
        targets: list[dict],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-head Hungarian loss, averaged over (image, head) assignments; see ``forward``."""
        criterion = self.build_criterion()
        heads = self.config.objectness_heads
        assigned = {head: [i for i, t in enumerate(targets) if t["source"] in (None, head)] for head in heads}
        num_assignments = sum(len(images) for images in assigned.values())
        loss = layer_logits[-1].new_zeros(())
        loss_dict: dict[str, torch.Tensor] = {}
        for head_index, head in enumerate(heads):
            images = assigned[head]
            if not images:
                continue
            outputs = self._criterion_inputs(layer_logits, layer_boxes, enc_outputs, head_index, images)
            head_terms = criterion(outputs, [targets[i] for i in images])
            head_loss = head_terms.pop("loss")
            loss = loss + head_loss * (len(images) / num_assignments)
            if len(heads) == 1:
                loss_dict.update(head_terms)
            else:
                loss_dict.update({f"{head}_{name}": value for name, value in head_terms.items()})
                loss_dict[f"{head}_loss"] = head_loss
        return loss, loss_dict

    def _criterion_inputs(
        self,
        layer_logits: list[torch.Tensor],
        layer_boxes: list[torch.Tensor],
        enc_outputs: dict[str, torch.Tensor] | None,
        head_index: int,
        images: list[int],
    ) -> dict:
        """``SetCriterion`` outputs for one objectness head (``logits (n, Q, 1)``) on the batch subset ``images``."""
        whole_batch = len(images) == layer_logits[-1].shape[0]

        def subset(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if whole_batch else tensor[images]

        per_layer = [
            {"logits": subset(logits[..., head_index : head_index + 1]), "pred_boxes": subset(boxes)}
            for logits, boxes in zip(layer_logits, layer_boxes)
        ]
        outputs = dict(per_layer[-1])
        if self.config.auxiliary_loss:
            outputs["aux_outputs"] = per_layer[:-1]
        if enc_outputs is not None:
            outputs["enc_outputs"] = {
                "logits": subset(enc_outputs["logits"]),
                "pred_boxes": subset(enc_outputs["pred_boxes"]),
            }
        return outputs
