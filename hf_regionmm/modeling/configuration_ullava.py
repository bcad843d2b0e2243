"""Configuration of u-LLaVA (Xu et al. 2024, "u-LLaVA: Unifying Multi-Modal Tasks via Large Language Model").

u-LLaVA (section 3.1) = a CLIP ViT-L/14 image encoder at 224 (256 patch tokens from the second-to-last layer) + a
projector + Vicuna-7B; videos add 8 temporal + 256 spatial tokens. Stage II (section 3.2) adds a mask projector that
turns the LLM state of a `[SEG]` token into a SAM sparse prompt for SAM ViT-H's mask decoder, and a location projector
+ MLP decoder that turns the state of a `[LOC]` token into a box. This file holds `ULlavaConfig`, its presets
(`ullava-7b`, `ullava-tiny`) and the list of u-LLaVA's new tokens, which `processing_ullava.py` repeats (the two
folders may not import each other; a test checks that they agree).

Released code vs paper, each a field (see `reference/original_repos.md` section 4):

| field | released (OPPOMKLab/u-LLaVA HEAD) | library default |
|---|---|---|
| `seg_token_offset` | `"previous"`: the state of the token BEFORE `[SEG]`/`[LOC]` (LISA style) | same |
| `loc_box_activation` | `"none"`: the decoder's 4 raw numbers read as xyxy | `"center_size"`: sigmoid centre + size |
| `projector_type` | `"linear"`: one Linear(1024 -> 4096) | same |

A fresh SAM image encoder is initialised with `sam_config.vision_config.initializer_range` 0.02 (ViT-H preset; 0.1 in
the 2-layer tiny preset), not transformers' `SamVisionConfig` default 1e-10, which is meant for loading pretrained SAM:
at 1e-10 a randomly initialised (frozen) encoder outputs ~0 and no mask can be learned. Loaded weights are unaffected.

The released loss bugs (the logged `ce_loss` is the total loss; box losses divided by the box count twice; L1 summed
over the 4 coordinates) are NOT reproduced: the losses here are the paper's eq. (3) with mean-reduced terms.
"""

import copy
import numbers
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig, SamConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["ULLAVA_NEW_TOKENS", "ULlavaConfig"]

# Released HEAD add order: new token j has id `text_config.vocab_size - len(ULLAVA_NEW_TOKENS) + j`
# (32000 ... 32010 for Vicuna's 32000-token vocabulary).
ULLAVA_NEW_TOKENS: tuple[str, ...] = (
    "[PAD]",
    "<image_patch>",
    "<video_patch>",
    "<img_beg>",
    "</img_end>",
    "<vid_beg>",
    "</vid_end>",
    "[SEG]",
    "[LOC]",
    "[tag]",
    "[/tag]",
)

_CLIP_VIT_L14_224 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
_VICUNA_7B = {
    "vocab_size": 32000 + len(ULLAVA_NEW_TOKENS),
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 32000,
    "tie_word_embeddings": False,
}
_SAM_VIT_H = {
    "vision_config": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
        "output_channels": 256,
        "image_size": 1024,
        "patch_size": 16,
        "initializer_range": 0.02,
    },
    "prompt_encoder_config": {"hidden_size": 256, "image_size": 1024, "patch_size": 16},
    "mask_decoder_config": {"hidden_size": 256},
}
_PRESETS: dict[str, dict[str, Any]] = {
    "ullava-7b": {
        "vision_config": {"model_type": "clip_vision_model", **_CLIP_VIT_L14_224},
        "text_config": {"model_type": "llama", **_VICUNA_7B},
        "sam_config": copy.deepcopy(_SAM_VIT_H),
    },
    "ullava-tiny": {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "projection_dim": 32,
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
        "sam_config": {
            "vision_config": {
                "hidden_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "global_attn_indexes": [1],
                "window_size": 4,
                "output_channels": 32,
                "num_pos_feats": 16,
                "image_size": 64,
                "patch_size": 8,
                "mlp_dim": 32,
                # Tuned with the tiny demo, which trains from random weights; transformers' SamVisionConfig default
                # (1e-10) would make the fresh encoder output ~0.
                "initializer_range": 0.1,
            },
            "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 8},
            "mask_decoder_config": {
                "hidden_size": 32,
                "mlp_dim": 64,
                "num_attention_heads": 2,
                "iou_head_hidden_dim": 32,
            },
        },
        "image_size": 56,
        "num_video_frames": 4,
        "loc_projector_dim": 32,
        "loc_head_hidden_sizes": [32, 16],
    },
}

_OFFSETS = ("previous", "self")
_REC_FUSIONS = ("box", "mask", "mean")
_BOX_ACTIVATIONS = ("center_size", "sigmoid", "none")
_PROJECTORS = ("linear", "mlp2x_gelu")


@strict
class ULlavaConfig(PreTrainedConfig):
    r"""Configuration of [`ULlavaModel`] / [`ULlavaForConditionalGeneration`].

    Sub-configs:
        vision_config: the CLIP vision tower (any `AutoConfig` with `patch_size`, default `clip_vision_model`,
            u-LLaVA: CLIP ViT-L/14 at 224).
        text_config: the language model (default `llama`, u-LLaVA: Vicuna-7B v1.1). Its `vocab_size` INCLUDES the 11
            new tokens `ULLAVA_NEW_TOKENS`, which take its last 11 ids (released layout: 32011 for Vicuna).
        sam_config: a transformers `SamConfig` (vision encoder, prompt encoder, mask decoder; u-LLaVA: SAM ViT-H).
            Its `vision_config.image_size` is the SAM input side (1024; longest side resized to it, then padded).

    Vision (section 3.1):
        vision_feature_layer: hidden state of the CLIP tower that feeds the projector (-2), CLS dropped.
        image_size: side of the (white-padded, square) CLIP input (224) -> `(224 / 14)^2 = 256` image tokens.
        projector_type: `"linear"` (released `vision_projector`) or `"mlp2x_gelu"`.
        num_video_frames: frames per video (8): `num_video_frames` temporal + `num_image_tokens` spatial tokens.

    Heads (section 3.2 and 4.1):
        seg_token_offset: which LLM state a `[SEG]`/`[LOC]` token contributes: `"previous"` (released: the state of
            the token before it, i.e. the state that predicts it) or `"self"` (the state at the token).
        loc_projector_dim: output width of the location projector (256: hidden -> hidden -> 256).
        loc_head_hidden_sizes: widths of the location decoder's hidden layers ((256, 128): 256 -> 256 -> 128 -> 4).
        loc_box_activation: how the decoder's 4 outputs `r` become a normalized xyxy box. `"center_size"` (default):
            `(cx, cy, w, h) = sigmoid(r)`, box `(cx - w/2, cy - h/2, cx + w/2, cy + h/2)`, always valid (x2 >= x1,
            y2 >= y1; it may reach past the square by up to w/2, `predict` clamps). `"sigmoid"`: `sigmoid(r)` read as
            xyxy, corners re-ordered. `"none"` (released, for converted checkpoints): `r` read as xyxy, corners
            re-ordered.
        loc_prior_box: normalized xyxy box a freshly initialised location decoder outputs for every input (its last
            bias; (0.3, 0.3, 0.7, 0.7)), so training starts from a valid box of plausible size, not the point box
            (0.5, 0.5, 0.5, 0.5) of zero biases. Loaded weights are unaffected.
        rec_fusion: how `predict` turns a `[SEG]` + `[LOC]` answer into one box: `"box"` (the decoded `[LOC]` box),
            `"mask"` (the box of the predicted mask), `"mean"` (their average; falls back to whichever exists).
        mask_threshold: mask logit above which a pixel is foreground (0.0).

    Losses (eq. 3): `ce_loss_weight` 1.0, `bce_loss_weight` 2.0, `dice_loss_weight` 0.5, `l1_loss_weight` 1.0,
    `giou_loss_weight` 1.0.

    LoRA (section 4.1: stage II "2e-4 if LoRA is employed"; opt-in through
    `ULlavaForConditionalGeneration.add_language_model_lora()` or `ULlavaTrainer(use_lora=True)`; the fields only size
    it). The paper gives no sizes; the defaults are the released stage II LoRA recipe (`configs/train/ullava_lora.yaml`
    `lora_r: 8` with `train_ullava.py`'s defaults, LISA's setting):
        lora_rank: 8.
        lora_alpha: 16.
        lora_dropout: 0.05.
        lora_target_modules: LLM linear layers that get LoRA, by module name: `("q_proj", "v_proj")`.

    Token ids (properties): `pad_token_id_new`, `image_patch_token_id`, `video_patch_token_id`, `image_start_token_id`,
    `image_end_token_id`, `video_start_token_id`, `video_end_token_id`, `seg_token_id`, `loc_token_id`,
    `tag_start_token_id`, `tag_end_token_id`; `new_token_id(token)` for any of them.

    Example:

    ```python
    >>> from hf_regionmm.modeling.configuration_ullava import ULlavaConfig
    >>> config = ULlavaConfig.from_preset("ullava-7b")
    >>> config.seg_token_id, config.loc_token_id
    (32007, 32008)
    ```
    """

    model_type = "ullava"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=_CLIP_VIT_L14_224
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=_VICUNA_7B),
        "sam_config": SubConfigSpec(config_class=SamConfig, init_kwargs=copy.deepcopy(_SAM_VIT_H)),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    image_size: int = 224
    projector_type: str = "linear"
    num_video_frames: int = 8
    seg_token_offset: str = "previous"
    loc_projector_dim: int = 256
    loc_head_hidden_sizes: list[int] | tuple[int, ...] = (256, 128)
    loc_box_activation: str = "center_size"
    loc_prior_box: list[float] | tuple[float, ...] = (0.3, 0.3, 0.7, 0.7)
    rec_fusion: str = "box"
    mask_threshold: float | int = 0.0
    ce_loss_weight: float | int = 1.0
    bce_loss_weight: float | int = 2.0
    dice_loss_weight: float | int = 0.5
    l1_loss_weight: float | int = 1.0
    giou_loss_weight: float | int = 1.0
    lora_rank: int = 8
    lora_alpha: int | float = 16
    lora_dropout: float | int = 0.05
    lora_target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj")
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.loc_head_hidden_sizes = tuple(int(size) for size in self.loc_head_hidden_sizes)
        if isinstance(self.lora_target_modules, (list, tuple)):
            self.lora_target_modules = tuple(self.lora_target_modules)
        self.loc_prior_box = tuple(float(value) for value in self.loc_prior_box)
        super().__post_init__(**kwargs)
        self._check_values()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ULlavaConfig":
        """Build `"ullava-7b"` (CLIP ViT-L/14-224 + Vicuna-7B + SAM ViT-H) or `"ullava-tiny"` (CPU tests).

        `overrides` replace top-level fields; sub-config dicts are merged into the preset's (one level deep, and
        `sam_config` one level further, per SAM part).
        """
        if name not in _PRESETS:
            raise ValueError(f"Unknown u-LLaVA preset {name!r}; choose one of {sorted(_PRESETS)}.")
        kwargs = copy.deepcopy(_PRESETS[name])
        for key, value in overrides.items():
            if key == "sam_config" and isinstance(value, dict):
                for part, part_values in value.items():
                    kwargs["sam_config"][part] = {**kwargs["sam_config"].get(part, {}), **part_values}
            elif key in cls.sub_configs_defaults and isinstance(value, dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
        return cls(**kwargs)

    # ---- derived values -------------------------------------------------------------------------------------------

    @property
    def new_tokens(self) -> list[str]:
        return list(ULLAVA_NEW_TOKENS)

    @property
    def base_vocab_size(self) -> int:
        """The LLM's vocabulary before u-LLaVA's tokens (32000 for Vicuna)."""
        return self.text_config.vocab_size - len(ULLAVA_NEW_TOKENS)

    def new_token_id(self, token: str) -> int:
        """Id of one of `ULLAVA_NEW_TOKENS` in the LLM vocabulary."""
        try:
            return self.base_vocab_size + ULLAVA_NEW_TOKENS.index(token)
        except ValueError:
            raise ValueError(f"{token!r} is not a u-LLaVA token; expected one of {list(ULLAVA_NEW_TOKENS)}.") from None

    @property
    def image_patch_token_id(self) -> int:
        return self.new_token_id("<image_patch>")

    @property
    def video_patch_token_id(self) -> int:
        return self.new_token_id("<video_patch>")

    @property
    def image_start_token_id(self) -> int:
        return self.new_token_id("<img_beg>")

    @property
    def image_end_token_id(self) -> int:
        return self.new_token_id("</img_end>")

    @property
    def video_start_token_id(self) -> int:
        return self.new_token_id("<vid_beg>")

    @property
    def video_end_token_id(self) -> int:
        return self.new_token_id("</vid_end>")

    @property
    def seg_token_id(self) -> int:
        return self.new_token_id("[SEG]")

    @property
    def loc_token_id(self) -> int:
        return self.new_token_id("[LOC]")

    @property
    def tag_start_token_id(self) -> int:
        return self.new_token_id("[tag]")

    @property
    def tag_end_token_id(self) -> int:
        return self.new_token_id("[/tag]")

    @property
    def vision_grid_size(self) -> int:
        """Patches per side of the CLIP input (16 for 224 / 14)."""
        return self.image_size // self.vision_config.patch_size

    @property
    def num_image_tokens(self) -> int:
        """`<image_patch>` tokens per image: `grid^2` (256)."""
        return self.vision_grid_size**2

    @property
    def num_video_tokens(self) -> int:
        """`<video_patch>` tokens per video: `num_video_frames + num_image_tokens` (8 + 256 = 264)."""
        return self.num_video_frames + self.num_image_tokens

    @property
    def language_lora_target_modules(self) -> tuple[str, ...]:
        """LLM module names that get LoRA (`lora_target_modules`), read by `LanguageModelLoraMixin`."""
        return tuple(self.lora_target_modules)

    @property
    def sam_image_size(self) -> int:
        """Side of the square SAM input (1024)."""
        return self.sam_config.vision_config.image_size

    @property
    def sam_prompt_dim(self) -> int:
        """Width of SAM's prompt embeddings (256), the output width of the mask projector."""
        return self.sam_config.prompt_encoder_config.hidden_size

    # ---- validation -----------------------------------------------------------------------------------------------

    def _check_values(self) -> None:
        for name in ("image_size", "num_video_frames", "loc_projector_dim"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if not self.loc_head_hidden_sizes or any(size < 1 for size in self.loc_head_hidden_sizes):
            raise ValueError(
                f"`loc_head_hidden_sizes` must list at least one positive width; got {self.loc_head_hidden_sizes}."
            )
        prior = self.loc_prior_box
        if (
            len(prior) != 4
            or not all(0 < value < 1 for value in prior)
            or prior[2] <= prior[0]
            or prior[3] <= prior[1]
        ):
            raise ValueError(
                f"`loc_prior_box` must be a normalized xyxy box strictly inside (0, 1) with x2 > x1 and y2 > y1; got "
                f"{prior}. Example: (0.3, 0.3, 0.7, 0.7)."
            )
        for name, allowed in (
            ("seg_token_offset", _OFFSETS),
            ("rec_fusion", _REC_FUSIONS),
            ("loc_box_activation", _BOX_ACTIVATIONS),
            ("projector_type", _PROJECTORS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}; got {getattr(self, name)!r}.")
        if not isinstance(self.lora_rank, numbers.Integral) or isinstance(self.lora_rank, bool) or self.lora_rank < 1:
            raise ValueError(f"`lora_rank` must be an integer >= 1; got {self.lora_rank!r} (released u-LLaVA: 8).")
        if isinstance(self.lora_alpha, bool) or not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be > 0; got {self.lora_alpha!r} (released u-LLaVA: 16).")
        if isinstance(self.lora_dropout, bool) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        targets = self.lora_target_modules
        if (
            not isinstance(targets, tuple)
            or not targets
            or not all(isinstance(t, str) and t.isidentifier() for t in targets)
        ):
            raise ValueError(
                "`lora_target_modules` must be a non-empty list of LLM module names such as ['q_proj', 'v_proj']; "
                f"got {targets!r}."
            )
        for name in ("ce_loss_weight", "bce_loss_weight", "dice_loss_weight", "l1_loss_weight", "giou_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)!r}.")
        if self.text_config.vocab_size <= len(ULLAVA_NEW_TOKENS):
            raise ValueError(
                f"`text_config.vocab_size` ({self.text_config.vocab_size}) must include the "
                f"{len(ULLAVA_NEW_TOKENS)} u-LLaVA tokens after the LLM's own vocabulary (32000 + 11 for Vicuna)."
            )
        patch_size = getattr(self.vision_config, "patch_size", None)
        if not isinstance(patch_size, numbers.Integral) or self.image_size % patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `vision_config.patch_size` ({patch_size})."
            )
        layers = self.vision_config.num_hidden_layers
        if not -layers <= self.vision_feature_layer <= layers:
            raise ValueError(
                f"`vision_feature_layer` ({self.vision_feature_layer}) must index one of the {layers + 1} hidden "
                "states of the vision tower (e.g. -2)."
            )
        sam = self.sam_config
        if sam.prompt_encoder_config.hidden_size != sam.vision_config.output_channels or (
            sam.mask_decoder_config.hidden_size != sam.vision_config.output_channels
        ):
            raise ValueError(
                "`sam_config`: prompt encoder and mask decoder `hidden_size` must equal "
                f"`vision_config.output_channels` ({sam.vision_config.output_channels})."
            )
        if sam.prompt_encoder_config.image_size != sam.vision_config.image_size or (
            sam.prompt_encoder_config.patch_size != sam.vision_config.patch_size
        ):
            raise ValueError("`sam_config`: prompt encoder `image_size`/`patch_size` must match the vision encoder's.")
        if 2 * sam.vision_config.num_pos_feats != sam.vision_config.output_channels:
            raise ValueError(
                "`sam_config.vision_config.num_pos_feats` must be half of `output_channels` (positional embedding "
                "width = prompt width)."
            )
