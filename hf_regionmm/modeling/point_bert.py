"""Point-BERT point-cloud encoder in pure PyTorch (Yu et al. 2022; RegionBLIP section 3.1, "Modal feature extraction").

RegionBLIP encodes point clouds with a frozen, pre-trained Point-BERT transformer. Data flow, in file order:

1. `farthest_point_sample`: `num_groups` centres per cloud (512 released), iteratively, keeping one running
   min-distance vector per cloud -- O(N * G) time and O(N) extra memory, never an N x N matrix.
2. `knn_group`: the `group_size` (32) nearest points of every centre (a `(G, N)` distance table per cloud, O(N * G)),
   re-expressed relative to their centre.
3. `PointBertGroupEncoder` (mini-PointNet): per-point 1x1 convs 3 -> 128 -> 256, max-pool, concatenate the pooled
   feature back to every point (512), 512 -> 512 -> `encoder_dims`, max-pool: one token per group.
4. `PointBertModel`: project tokens to `hidden_size` (384), prepend a CLS token with its own learned position, add an
   MLP position embedding of each centre (3 -> 128 -> 384) before EVERY block, 12 pre-norm blocks (no qkv bias), final
   LayerNorm. Output: `(B, 1 + G, hidden_size)`.

Facts confirmed by running the released code (reference/original_repos.md section 5): FPS starts at a random index in
the original (here: index 0, or a random one from a `torch.Generator` passed in), the order of neighbours inside a
group does not matter after the max-pools, LayerNorm eps 1e-5. Original checkpoint names (`module.transformer_q.*`):
`encoder.first_conv`/`second_conv` -> `group_encoder.first_conv`/`second_conv`, `reduce_dim`, `cls_token`, `cls_pos`,
`pos_embed` -> `position_embedding`, `blocks.blocks.N` -> `blocks.N`, `norm`.
"""

import numbers

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = [
    "PointBertConfig",
    "PointBertGroupEncoder",
    "PointBertModel",
    "farthest_point_sample",
    "knn_group",
]


@strict
class PointBertConfig(PreTrainedConfig):
    r"""Configuration of [`PointBertModel`] (defaults: the Point-BERT encoder RegionBLIP loads, 1 + 512 tokens x 384).

    Args:
        hidden_size: transformer width (`trans_dim`, 384).
        num_hidden_layers: transformer blocks (`depth`, 12).
        num_attention_heads: heads per block (6).
        mlp_ratio: MLP width / hidden size (4).
        num_groups: FPS centres = output tokens besides CLS (`num_group`, 512).
        group_size: neighbours per centre (`group_size`, 32).
        encoder_dims: width of the mini-PointNet group token before `reduce_dim` (256).
        position_hidden_size: inner width of the centre position MLP (128, fixed in the original).
        drop_path_rate: stochastic depth of the last block (0.1; linearly increasing over blocks).
        layer_norm_eps: LayerNorm epsilon (1e-5).
        initializer_range: std of the truncated-normal init of Linear layers and the CLS token/position.
    """

    model_type = "regionblip_point_bert"
    base_config_key = "point_bert_config"

    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    mlp_ratio: float | int = 4.0
    num_groups: int = 512
    group_size: int = 32
    encoder_dims: int = 256
    position_hidden_size: int = 128
    drop_path_rate: float | int = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_groups",
            "group_size",
            "encoder_dims",
            "position_hidden_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` must be in [0, 1); got {self.drop_path_rate!r}.")

    @property
    def min_points(self) -> int:
        """The fewest points a cloud may have: `max(num_groups, group_size)`."""
        return max(self.num_groups, self.group_size)


# ----------------------------------------------------------------------------------------------------------------
# 1-2. Grouping


def _check_points(points: torch.Tensor, name: str = "point_clouds") -> None:
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        raise TypeError(f"`{name}` must be a float tensor (batch, num_points, 3) of xyz; got {type(points).__name__}.")
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(
            f"`{name}` must have shape (batch, num_points, 3) with xyz in the last dim; got {tuple(points.shape)}. "
            f"Drop colour channels (keep points[..., :3])."
        )
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"`{name}` contains NaN or inf; remove non-finite points first.")


def farthest_point_sample(
    points: torch.Tensor,
    num_samples: int,
    *,
    start_index: int | torch.Tensor = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Farthest point sampling.

    Args:
        points: `(B, N, 3)` float xyz.
        num_samples: `G <= N` centres per cloud.
        start_index: index of the first centre (int for every cloud, or a `(B,)` long tensor).
        generator: if given, the first centre is drawn uniformly with it instead (the original starts at random).

    Returns:
        `(B, G)` int64 indices into `N`; the first is the start index, each next one the point farthest from all
        chosen so far (ties: the lowest index).
    """
    _check_points(points, "points")
    batch_size, num_points, _ = points.shape
    if not isinstance(num_samples, numbers.Integral) or not 1 <= num_samples <= num_points:
        raise ValueError(
            f"`num_samples` must be an integer in [1, num_points={num_points}]; got {num_samples!r}. Pass clouds with "
            "at least as many points as FPS centres."
        )
    device = points.device
    if generator is not None:
        current = torch.randint(num_points, (batch_size,), generator=generator, device=generator.device).to(device)
    else:
        current = torch.as_tensor(start_index, dtype=torch.long, device=device).expand(batch_size).clone()
        if bool((current < 0).any()) or bool((current >= num_points).any()):
            raise ValueError(f"`start_index` must be in [0, {num_points}); got {start_index!r}.")
    batch_index = torch.arange(batch_size, device=device)
    selected = torch.empty(batch_size, num_samples, dtype=torch.long, device=device)
    min_distance = torch.full((batch_size, num_points), float("inf"), dtype=points.dtype, device=device)
    for step in range(num_samples):
        selected[:, step] = current
        centre = points[batch_index, current].unsqueeze(1)
        min_distance = torch.minimum(min_distance, ((points - centre) ** 2).sum(-1))
        current = min_distance.argmax(dim=-1)
    return selected


def knn_group(points: torch.Tensor, centres: torch.Tensor, group_size: int) -> torch.Tensor:
    """The `group_size` nearest points of every centre, relative to it.

    Args:
        points: `(B, N, 3)` float xyz.
        centres: `(B, G, 3)` float xyz (usually FPS points of `points`).
        group_size: `K <= N` neighbours per centre.

    Returns:
        `(B, G, K, 3)` neighbour xyz minus their centre, nearest first. Memory O(B * G * N).
    """
    num_points = points.shape[1]
    if group_size > num_points:
        raise ValueError(f"`group_size` ({group_size}) must be <= the number of points ({num_points}).")
    distances = torch.cdist(centres, points)
    neighbour_index = distances.topk(group_size, dim=-1, largest=False).indices
    batch_index = torch.arange(points.shape[0], device=points.device)[:, None, None]
    return points[batch_index, neighbour_index] - centres.unsqueeze(2)


# ----------------------------------------------------------------------------------------------------------------
# 3. Group tokens


class PointBertGroupEncoder(nn.Module):
    """Mini-PointNet: `(B, G, K, 3)` centred neighbourhoods -> `(B, G, encoder_dims)` group tokens.

    Widths 128 / 256 / 512 are fixed, as in Point-BERT's `Encoder` (`first_conv`, `second_conv` with BatchNorm).
    """

    def __init__(self, encoder_dims: int):
        super().__init__()
        self.encoder_dims = encoder_dims
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, encoder_dims, 1)
        )

    def forward(self, neighbourhoods: torch.Tensor) -> torch.Tensor:
        batch_size, num_groups, group_size, _ = neighbourhoods.shape
        points = neighbourhoods.reshape(batch_size * num_groups, group_size, 3).transpose(1, 2)
        features = self.first_conv(points)
        pooled = features.max(dim=2, keepdim=True).values
        features = torch.cat([pooled.expand(-1, -1, group_size), features], dim=1)
        features = self.second_conv(features)
        return features.max(dim=2).values.reshape(batch_size, num_groups, self.encoder_dims)


# ----------------------------------------------------------------------------------------------------------------
# 4. Transformer


class PointBertDropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample with probability `drop_prob` in training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep = 1.0 - self.drop_prob
        mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep)
        return hidden_states * mask / keep


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
    """Plain softmax attention on `(B, heads, L, head_dim)`; returns `(B, L, heads, head_dim)` and the weights."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class PointBertAttention(nn.Module):
    """Multi-head self-attention without qkv bias (`qkv`, `proj` as in the original `Attention`); the kernel follows
    `config._attn_implementation` (eager or sdpa)."""

    def __init__(self, config: PointBertConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attended, _ = attention_interface(self, query, key, value, None, scaling=self.scaling, dropout=0.0)
        return self.proj(attended.reshape(batch_size, length, width))


class PointBertBlock(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`, with stochastic depth."""

    def __init__(self, config: PointBertConfig, drop_path: float):
        super().__init__()
        hidden_size = config.hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attn = PointBertAttention(config)
        self.norm2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        mlp_size = int(hidden_size * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_size), nn.GELU(), nn.Linear(mlp_size, hidden_size))
        self.drop_path = PointBertDropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path(self.attn(self.norm1(hidden_states)))
        return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))


class PointBertPreTrainedModel(PreTrainedModel):
    config: PointBertConfig
    base_model_prefix = "point_bert"
    main_input_name = "point_clouds"
    input_modalities = ("point_cloud",)
    _no_split_modules = ["PointBertBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, PointBertModel):
            init.trunc_normal_(module.cls_token, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_pos, std=self.config.initializer_range)


class PointBertModel(PointBertPreTrainedModel):
    """Point-BERT transformer: point clouds `(B, N, 3)` -> tokens `(B, 1 + num_groups, hidden_size)`."""

    def __init__(self, config: PointBertConfig):
        super().__init__(config)
        hidden_size = config.hidden_size
        self.group_encoder = PointBertGroupEncoder(config.encoder_dims)
        self.reduce_dim = nn.Linear(config.encoder_dims, hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.position_embedding = nn.Sequential(
            nn.Linear(3, config.position_hidden_size), nn.GELU(), nn.Linear(config.position_hidden_size, hidden_size)
        )
        depth = config.num_hidden_layers
        # Linearly increasing stochastic depth, computed in Python so the model also builds on the meta device.
        drop_rates = [float(config.drop_path_rate) * index / max(depth - 1, 1) for index in range(depth)]
        self.blocks = nn.ModuleList([PointBertBlock(config, rate) for rate in drop_rates])
        self.norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def group(
        self, point_clouds: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, N, 3)` -> centres `(B, G, 3)` (FPS) and centred neighbourhoods `(B, G, K, 3)` (kNN)."""
        _check_points(point_clouds)
        num_points = point_clouds.shape[1]
        if num_points < self.config.min_points:
            raise ValueError(
                f"`point_clouds` has {num_points} points per cloud but Point-BERT needs at least "
                f"{self.config.min_points} ({self.config.num_groups} groups of {self.config.group_size}); sample more "
                f"points (RegionBlipProcessor(num_points=...))."
            )
        centre_index = farthest_point_sample(point_clouds, self.config.num_groups, generator=generator)
        batch_index = torch.arange(point_clouds.shape[0], device=point_clouds.device)[:, None]
        centres = point_clouds[batch_index, centre_index]
        return centres, knn_group(point_clouds, centres, self.config.group_size)

    def forward(
        self, point_clouds: torch.Tensor, generator: torch.Generator | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Encode point clouds.

        Args:
            point_clouds: `(B, N, 3)` float xyz, `N >= max(num_groups, group_size)`; any frame (RegionBLIP: objects
                centred in the unit sphere, scenes in raw scene units).
            generator: draws the FPS start point (deterministic index 0 without it).

        Returns:
            `last_hidden_state (B, 1 + G, hidden_size)` after the final LayerNorm (CLS first, then groups in FPS
            order) and `pooler_output (B, hidden_size)`, the CLS token.
        """
        centres, neighbourhoods = self.group(point_clouds.to(self.reduce_dim.weight.dtype), generator)
        tokens = self.reduce_dim(self.group_encoder(neighbourhoods))
        batch_size = tokens.shape[0]
        hidden_states = torch.cat([self.cls_token.expand(batch_size, -1, -1), tokens], dim=1)
        positions = torch.cat([self.cls_pos.expand(batch_size, -1, -1), self.position_embedding(centres)], dim=1)
        for block in self.blocks:
            hidden_states = block(hidden_states + positions)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states[:, 0])
