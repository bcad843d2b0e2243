"""Configuration of Groma (Ma et al. 2024, "Groma: Localized Visual Tokenization for Grounding Multimodal LLMs").

Groma (section 3.1) = a DINOv2 image encoder, a class-agnostic Deformable-DETR region proposer, a multi-scale
RoIAlign region encoder and a Llama/Vicuna language model whose vocabulary is extended with region tokens. This file
holds `GromaConfig`, its two presets (`groma-7b`, `groma-tiny`) and the list of Groma's new tokens, which
`processing_groma.py` reproduces (the two folders may not import each other; a test checks that they agree).

Released checkpoint vs paper. The released code differs from the paper in ways its weights depend on, so each
difference is a field, and two named bundles set them together (see `RELEASED_BEHAVIOUR` and `PAPER_BEHAVIOUR`):

| field | released (`FoundationVision/groma-7b-*`) | paper / new training |
|---|---|---|
| `proposer_feature_source` | `"mean_last_4"`: mean of the last 4 DINOv2 hidden states, one proposer level | `"multi_level"`: the last `num_feature_levels` hidden states, one per pyramid level |
| `region_box_format` | `"cxcywh_as_xyxy"`: RoIAlign reads normalized cxcywh x image_size as x1, y1, x2, y2 (issues #11, #21) | `"xyxy"` |
| `region_feature_strides` | `(14/8, 14/4, 14/2)`, half the true strides of the 4x/2x/1x maps | `None`: derived from the real map sizes |
| `vision_pos_embed_interpolation` | `"legacy_scale_factor"`: transformers 4.32 DINOv2 bicubic resize with scale `(grid + 0.1) / 37` | `"size"`: transformers 5 resize to the target grid |
| `proposer_config.num_feature_levels` | 1 | 4 |
| `vision_feature_layer` | `-2`: image tokens from the second-to-last DINOv2 hidden state (`perceiver_cfg.vis_output_layer` of the released configs) | `-1`: the last hidden state |

`GromaConfig.from_preset("groma-7b")` (what converted checkpoints use) picks the released bundle;
`GromaConfig.from_preset("groma-7b", behaviour="paper")` the paper's; plain `GromaConfig()` is the paper bundle at
groma-7b sizes.
"""

import copy
import math
import numbers
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_detr_proposer import DetrProposerConfig

__all__ = ["GromaConfig", "groma_special_tokens", "GROMA_BASE_NEW_TOKENS", "RELEASED_BEHAVIOUR", "PAPER_BEHAVIOUR"]

# The released `groma/constants.py` order; token id of new token j = text vocab size + j.
GROMA_BASE_NEW_TOKENS: tuple[str, ...] = (
    "[PAD]",
    "<sep>",
    "<img>",
    "</img>",
    "<roi>",
    "</roi>",
    "<p>",
    "</p>",
    "<image>",
    "<region>",
    "<refer_box>",
    "<ground_box>",
    "<refer_feat>",
    "[grounding]",
)


def groma_special_tokens(max_region_num: int) -> list[str]:
    """Groma's new tokens in id order: the 14 base tokens, then `<r0>` ... `<r{max_region_num - 1}>`."""
    if not isinstance(max_region_num, numbers.Integral) or isinstance(max_region_num, bool) or max_region_num < 1:
        raise ValueError(f"`max_region_num` must be an integer >= 1; got {max_region_num!r}.")
    return [*GROMA_BASE_NEW_TOKENS, *(f"<r{index}>" for index in range(max_region_num))]


# Fields whose released value differs from the paper's; `proposer_num_feature_levels` goes to `proposer_config`.
RELEASED_BEHAVIOUR: dict[str, Any] = {
    "proposer_feature_source": "mean_last_4",
    "region_box_format": "cxcywh_as_xyxy",
    "region_feature_strides": (14 / 8, 14 / 4, 14 / 2),
    "vision_pos_embed_interpolation": "legacy_scale_factor",
    "proposer_num_feature_levels": 1,
    "vision_feature_layer": -2,
}
PAPER_BEHAVIOUR: dict[str, Any] = {
    "proposer_feature_source": "multi_level",
    "region_box_format": "xyxy",
    "region_feature_strides": None,
    "vision_pos_embed_interpolation": "size",
    "proposer_num_feature_levels": 4,
    "vision_feature_layer": -1,
}

_DINOV2_LARGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
}
_VICUNA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}
_PRESETS: dict[str, dict[str, Any]] = {
    "groma-7b": {
        "behaviour": "released",
        "config": {
            "vision_config": {"model_type": "dinov2", **_DINOV2_LARGE},
            "text_config": {"model_type": "llama", **_VICUNA_7B},
            "proposer_config": {"input_dim": 1024},
            "image_size": 448,
            "max_region_num": 100,
        },
    },
    "groma-tiny": {
        "behaviour": "paper",
        "config": {
            "vision_config": {
                "model_type": "dinov2",
                "hidden_size": 32,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 14,
                # A 9x9 position table resized to the 8x8 grid of 112-pixel inputs, as DINOv2's 37x37 is for 448.
                "image_size": 126,
            },
            "text_config": {
                "model_type": "llama",
                "vocab_size": 128,
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 3,
                "tie_word_embeddings": False,
            },
            "proposer_config": {
                "input_dim": 32,
                "d_model": 32,
                "encoder_layers": 1,
                "decoder_layers": 1,
                "encoder_attention_heads": 2,
                "decoder_attention_heads": 2,
                "encoder_ffn_dim": 64,
                "decoder_ffn_dim": 64,
                "encoder_n_points": 2,
                "decoder_n_points": 2,
                "num_queries": 20,
                "dropout": 0.0,
            },
            "image_size": 112,
            "max_region_num": 8,
            "region_encoder_embed_dim": 32,
            "region_encoder_output_size": 7,
            "region_encoder_fuse_rounds": 2,
            "region_encoder_num_groups": 8,
            "region_encoder_pos_hidden_size": 16,
        },
    },
}

_MERGE_ORDERS = ("column_major", "row_major")
_FEATURE_SOURCES = ("mean_last_4", "multi_level")
_BOX_FORMATS = ("xyxy", "cxcywh_as_xyxy")
_INTERPOLATIONS = ("size", "legacy_scale_factor")
_BEHAVIOURS = ("released", "paper")


@strict
class GromaConfig(PreTrainedConfig):
    r"""Configuration of [`GromaModel`] / [`GromaForConditionalGeneration`].

    Sub-configs:
        vision_config: the image encoder (any `AutoConfig`, default `dinov2`; Groma: DINOv2-L/14, kept at
            `image_size=518` as released, its position table interpolated to the `image_size` grid).
        proposer_config: [`DetrProposerConfig`] of the class-agnostic Deformable-DETR region proposer;
            `input_dim` must equal the vision hidden size.
        text_config: the language model (any `AutoConfig`, default `llama`; Groma: Vicuna-7B v1.5). Its
            `vocab_size` is the base vocabulary; Groma's `num_new_tokens` come after it.

    Regions (section 3.1 / 4.1):
        image_size: side of the square model input in pixels (448). Must be a multiple of the patch size, and the
            patch grid a multiple of 2 (2x2 token merge).
        max_region_num: region slots in every prompt (100); also the number of `<rK>` tokens.
        nms_thres: IoU above which a proposal is suppressed (0.6).
        box_score_thres: proposals need a fused objectness score above this (0.15).
        ground_box_score: score given to ground-truth answer boxes merged into the candidates in training (0.2,
            released): a proposal that overlaps one better wins NMS, otherwise the GT box itself becomes a region.
        shuffle_regions: randomly permute the proposal slots (the released code shuffles every region, even at
            inference); user boxes always keep slots 0..n-1 so prompts can name them.
        num_new_tokens: derived, `14 + max_region_num` (114 for groma-7b); passing another value is an error.

    Region encoder (section 3.1, "Region Encoder"):
        region_encoder_embed_dim: width of the fused feature maps and of the region embedding (1024).
        region_encoder_num_levels: last vision layers used, resized to 2^(L-1)x ... 1x the patch grid (3).
        region_encoder_output_size: RoIAlign output side (14).
        region_encoder_sampling_ratio: RoIAlign samples per bin side (2).
        region_encoder_fuse_rounds: rounds of channel-shuffle level fusion (5).
        region_encoder_num_groups: GroupNorm groups in the fusion convs (64).
        region_encoder_pos_hidden_size: hidden width of the box position MLP (256).
        region_box_format, region_feature_strides: see the module docstring.

    Image tokens:
        image_token_merge_order: channel order of the 2x2 token merge (`"column_major"`, released).
        vision_feature_layer: index into the DINOv2 hidden states (embeddings output first, as transformers returns
            them) whose patch tokens become the image tokens; see the module docstring.
        vision_pos_embed_interpolation: see the module docstring.
        proposer_feature_source: see the module docstring.

    Token ids (properties, derived from `text_config.vocab_size`): `image_token_id`, `region_token_id`,
    `refer_box_token_id`, `ground_box_token_id`, `refer_feat_token_id`, `region_index_token_ids`, and the rest of
    `groma_special_tokens(max_region_num)` through `new_token_id(token)`.

    Example:

    ```python
    >>> from hf_regionmm.modeling.configuration_groma import GromaConfig
    >>> released = GromaConfig.from_preset("groma-7b")  # converted FoundationVision checkpoints
    >>> paper = GromaConfig.from_preset("groma-7b", behaviour="paper")  # new training
    >>> tiny = GromaConfig.from_preset("groma-tiny")  # tests and the demo
    ```
    """

    model_type = "groma"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2", init_kwargs=_DINOV2_LARGE),
        "proposer_config": DetrProposerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=_VICUNA_7B),
    }

    vision_config: dict | PreTrainedConfig | None = None
    proposer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_size: int = 448
    max_region_num: int = 100
    nms_thres: float | int = 0.6
    box_score_thres: float | int = 0.15
    ground_box_score: float | int = 0.2
    shuffle_regions: bool = False
    num_new_tokens: int | None = None
    region_encoder_embed_dim: int = 1024
    region_encoder_num_levels: int = 3
    region_encoder_output_size: int = 14
    region_encoder_sampling_ratio: int = 2
    region_encoder_fuse_rounds: int = 5
    region_encoder_num_groups: int = 64
    region_encoder_pos_hidden_size: int = 256
    region_box_format: str = "xyxy"
    region_feature_strides: list[float | int] | tuple[float | int, ...] | None = None
    image_token_merge_order: str = "column_major"
    vision_feature_layer: int = -1
    vision_pos_embed_interpolation: str = "size"
    proposer_feature_source: str = "multi_level"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.proposer_config is None:
            # The paper's proposer reads a 4-level pyramid; the released one (see `from_preset`) reads 1 level.
            self.proposer_config = {"num_feature_levels": PAPER_BEHAVIOUR["proposer_num_feature_levels"]}
        if self.region_feature_strides is not None:
            self.region_feature_strides = tuple(float(stride) for stride in self.region_feature_strides)
        super().__post_init__(**kwargs)
        self._check_values()

    # ----------------------------------------------------------------------------------------------------------
    # presets

    @classmethod
    def from_preset(cls, name: str, *, behaviour: str | None = None, **overrides: Any) -> "GromaConfig":
        """Build a named preset.

        Args:
            name: `"groma-7b"` (DINOv2-L/14 at 448 + released proposer + Vicuna-7B, 114 new tokens; defaults to the
                released behaviour so converted checkpoints reproduce the original outputs) or `"groma-tiny"`
                (seconds on a CPU; defaults to the paper behaviour).
            behaviour: `"released"` or `"paper"` to override the preset's default bundle (see the module docstring).
            overrides: top-level fields to replace; sub-config dicts are merged into the preset's.
        """
        if name not in _PRESETS:
            raise ValueError(f"Unknown Groma preset {name!r}; choose one of {sorted(_PRESETS)}.")
        preset = _PRESETS[name]
        behaviour = preset["behaviour"] if behaviour is None else behaviour
        if behaviour not in _BEHAVIOURS:
            raise ValueError(f"`behaviour` must be one of {_BEHAVIOURS}; got {behaviour!r}.")
        bundle = dict(RELEASED_BEHAVIOUR if behaviour == "released" else PAPER_BEHAVIOUR)
        proposer_levels = bundle.pop("proposer_num_feature_levels")
        kwargs = copy.deepcopy(preset["config"])
        kwargs["proposer_config"]["num_feature_levels"] = proposer_levels
        if bundle["region_feature_strides"] is not None:
            # The released strides are tied to a 14-pixel patch: (patch / 8, patch / 4, patch / 2).
            patch_size = kwargs["vision_config"]["patch_size"]
            bundle["region_feature_strides"] = (patch_size / 8, patch_size / 4, patch_size / 2)
        kwargs.update(bundle)
        for key, value in overrides.items():
            if key in cls.sub_configs_defaults and isinstance(value, dict) and isinstance(kwargs.get(key), dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @classmethod
    def for_released_checkpoint(cls, **overrides: Any) -> "GromaConfig":
        """`from_preset("groma-7b", behaviour="released")`: the layout and quirks of `FoundationVision/groma-7b-*`."""
        return cls.from_preset("groma-7b", behaviour="released", **overrides)

    # ----------------------------------------------------------------------------------------------------------
    # derived values

    @property
    def new_tokens(self) -> list[str]:
        """`groma_special_tokens(max_region_num)`: the new tokens in id order."""
        return groma_special_tokens(self.max_region_num)

    @property
    def text_vocab_size(self) -> int:
        """Size of the language model's own vocabulary (ids below it use the LLM embedding and lm_head)."""
        return self.text_config.vocab_size

    @property
    def total_vocab_size(self) -> int:
        """Width of the logits: `text_vocab_size + num_new_tokens`."""
        return self.text_config.vocab_size + self.num_new_tokens

    def new_token_id(self, token: str) -> int:
        """Id of one of Groma's new tokens (`"<image>"`, `"<r3>"`, ...) in the extended vocabulary."""
        try:
            return self.text_config.vocab_size + self.new_tokens.index(token)
        except ValueError:
            raise ValueError(
                f"{token!r} is not one of Groma's new tokens; expected one of {list(GROMA_BASE_NEW_TOKENS)} or "
                f"<r0>..<r{self.max_region_num - 1}>."
            ) from None

    @property
    def image_token_id(self) -> int:
        return self.new_token_id("<image>")

    @property
    def region_token_id(self) -> int:
        return self.new_token_id("<region>")

    @property
    def refer_box_token_id(self) -> int:
        return self.new_token_id("<refer_box>")

    @property
    def ground_box_token_id(self) -> int:
        return self.new_token_id("<ground_box>")

    @property
    def refer_feat_token_id(self) -> int:
        return self.new_token_id("<refer_feat>")

    @property
    def region_index_token_ids(self) -> list[int]:
        """Ids of `<r0>` ... `<r{max_region_num - 1}>`."""
        first = self.text_config.vocab_size + len(GROMA_BASE_NEW_TOKENS)
        return list(range(first, first + self.max_region_num))

    @property
    def vision_grid_size(self) -> int:
        """Patches per side of the vision feature map (`image_size / patch_size`; 32 for groma-7b)."""
        return self.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        """`<image>` slots per prompt after the 2x2 merge: `(grid / 2) ** 2` (256 for groma-7b)."""
        return (self.vision_grid_size // 2) ** 2

    @property
    def region_feature_map_sizes(self) -> tuple[int, ...]:
        """Sides of the region encoder's maps, finest first: `grid * 2^(L-1), ..., grid` (128, 64, 32)."""
        levels = self.region_encoder_num_levels
        return tuple(self.vision_grid_size * 2 ** (levels - 1 - level) for level in range(levels))

    @property
    def region_spatial_scales(self) -> tuple[float, ...]:
        """RoIAlign `spatial_scale` per level for boxes in the `image_size` pixel frame (`1 / stride`)."""
        if self.region_feature_strides is not None:
            return tuple(1.0 / stride for stride in self.region_feature_strides)
        return tuple(size / self.image_size for size in self.region_feature_map_sizes)

    # ----------------------------------------------------------------------------------------------------------
    # validation

    def _check_values(self) -> None:
        def positive_int(name: str) -> int:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
            return int(value)

        for name in (
            "image_size",
            "max_region_num",
            "region_encoder_embed_dim",
            "region_encoder_num_levels",
            "region_encoder_output_size",
            "region_encoder_fuse_rounds",
            "region_encoder_num_groups",
            "region_encoder_pos_hidden_size",
        ):
            positive_int(name)
        for name in ("nms_thres", "box_score_thres", "ground_box_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1]; got {value!r}.")
        if not isinstance(self.region_encoder_sampling_ratio, numbers.Integral):
            raise ValueError(
                f"`region_encoder_sampling_ratio` must be an integer (<= 0 means adaptive); "
                f"got {self.region_encoder_sampling_ratio!r}."
            )

        expected_new_tokens = len(GROMA_BASE_NEW_TOKENS) + self.max_region_num
        if self.num_new_tokens is None:
            self.num_new_tokens = expected_new_tokens
        elif self.num_new_tokens != expected_new_tokens:
            raise ValueError(
                f"`num_new_tokens` must be {len(GROMA_BASE_NEW_TOKENS)} + max_region_num = {expected_new_tokens}; got "
                f"{self.num_new_tokens}. Leave it unset; it is derived from `max_region_num`."
            )

        for name, value, allowed in (
            ("image_token_merge_order", self.image_token_merge_order, _MERGE_ORDERS),
            ("proposer_feature_source", self.proposer_feature_source, _FEATURE_SOURCES),
            ("region_box_format", self.region_box_format, _BOX_FORMATS),
            ("vision_pos_embed_interpolation", self.vision_pos_embed_interpolation, _INTERPOLATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")

        num_hidden_states = self.vision_config.num_hidden_layers + 1  # transformers puts the embeddings first
        layer = self.vision_feature_layer
        if (
            isinstance(layer, bool)
            or not isinstance(layer, numbers.Integral)
            or not -num_hidden_states <= layer < num_hidden_states
        ):
            raise ValueError(
                f"`vision_feature_layer` must index the {num_hidden_states} DINOv2 hidden states (embeddings + "
                f"{num_hidden_states - 1} layers), i.e. lie in [{-num_hidden_states}, {num_hidden_states - 1}]; got {layer!r}."
            )

        if self.region_feature_strides is not None:
            if len(self.region_feature_strides) != self.region_encoder_num_levels or not all(
                math.isfinite(stride) and stride > 0 for stride in self.region_feature_strides
            ):
                raise ValueError(
                    f"`region_feature_strides` must hold {self.region_encoder_num_levels} positive strides (one per "
                    f"region encoder level, finest first) or be None to derive them; got {self.region_feature_strides}."
                )

        embed_dim = self.region_encoder_embed_dim
        if embed_dim % 4 != 0 or embed_dim % self.region_encoder_num_groups != 0:
            raise ValueError(
                f"`region_encoder_embed_dim` ({embed_dim}) must be a multiple of 4 (channel shuffle moves quarters) "
                f"and of `region_encoder_num_groups` ({self.region_encoder_num_groups})."
            )

        patch_size = getattr(self.vision_config, "patch_size", None)
        if not isinstance(patch_size, numbers.Integral):
            raise ValueError(
                f"`vision_config` must describe a ViT with an integer `patch_size` (e.g. dinov2); got "
                f"{type(self.vision_config).__name__} with patch_size={patch_size!r}."
            )
        if self.image_size % patch_size != 0 or (self.image_size // patch_size) % 2 != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of 2 * patch_size ({2 * patch_size}) so the "
                f"patch grid splits into 2x2 merge blocks; e.g. 448 for patch 14."
            )
        vision_layers = self.vision_config.num_hidden_layers
        needed_layers = max(
            self.region_encoder_num_levels,
            4 if self.proposer_feature_source == "mean_last_4" else self.proposer_config.num_feature_levels,
        )
        if vision_layers < needed_layers:
            raise ValueError(
                f"`vision_config.num_hidden_layers` ({vision_layers}) must be at least {needed_layers}: the region "
                f"encoder and the proposer read that many of the last hidden states."
            )
        if self.proposer_config.input_dim != self.vision_config.hidden_size:
            raise ValueError(
                f"`proposer_config.input_dim` ({self.proposer_config.input_dim}) must equal "
                f"`vision_config.hidden_size` ({self.vision_config.hidden_size}); the proposer reads DINOv2 features."
            )
        if self.proposer_feature_source == "mean_last_4" and self.proposer_config.num_feature_levels != 1:
            raise ValueError(
                f"`proposer_feature_source='mean_last_4'` (released) feeds one feature map, so "
                f"`proposer_config.num_feature_levels` must be 1; got {self.proposer_config.num_feature_levels}. "
                f"Use proposer_feature_source='multi_level' for a pyramid."
            )
