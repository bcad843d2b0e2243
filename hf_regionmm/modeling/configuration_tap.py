"""Configuration of TAP-v2 (Pan et al. 2025, "Consistent multimodal pre-training for visual tokenization").

TAP-v2's promptable tokenizer (section 3.1, Figure 4) = a windowed ViT image encoder with cross-window convolution
blocks and a 256-d neck, a prompt encoder for points / boxes / sketches (no mask-embedding path), a SAM-style
two-way image decoder that returns 4 masks and 9 tokens (4 mask, 4 semantic, 1 IoU), a concept head (semantic token
-> MLP -> cosine logits against a concept bank of text embeddings) and a small causal text decoder prompted by the
semantic token (section 3.1 "Promptable captioning", Figure 5). Every field of all five parts lives in one flat
`TapConfig`; the public v1.1 release (`baaivision/tokenize-anything`, reference/original_repos.md section 3) fixes
the sizes the paper leaves open (window 16, 2-layer decoder with MLP 2048, 12-layer 512-d text decoder, 40 tokens).

Presets: `tap-vit-b`, `tap-vit-l`, `tap-vit-h` (1024-pixel inputs as released) and `tap-tiny` (64-pixel inputs,
CPU tests and the demo). `TapConfig.from_preset(name, **overrides)` builds one.
"""

import copy
import math
import numbers
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

__all__ = ["TapChatConfig", "TapConfig", "TAP_POINT_LABELS", "TAP_PAD_LABEL"]

# Prompt point labels of the released prompt encoder (`point_embed = Embedding(5, 256)`).
TAP_POINT_LABELS: dict[str, int] = {"negative": 0, "positive": 1, "box_top_left": 2, "box_bottom_right": 3, "pad": 4}
TAP_PAD_LABEL = TAP_POINT_LABELS["pad"]

_VIT_SIZES: dict[str, dict[str, int]] = {
    "b": {"vision_hidden_size": 768, "vision_num_hidden_layers": 12, "vision_num_attention_heads": 12},
    "l": {"vision_hidden_size": 1024, "vision_num_hidden_layers": 24, "vision_num_attention_heads": 16},
    "h": {"vision_hidden_size": 1280, "vision_num_hidden_layers": 32, "vision_num_attention_heads": 16},
}
_PRESETS: dict[str, dict[str, Any]] = {
    **{f"tap-vit-{size}": dict(fields) for size, fields in _VIT_SIZES.items()},
    "tap-tiny": {
        "image_size": 64,
        "patch_size": 8,
        "vision_hidden_size": 32,
        "vision_num_hidden_layers": 4,
        "vision_num_attention_heads": 2,
        "vision_mlp_ratio": 2,
        "vision_window_size": 4,
        "vision_num_cross_blocks": 2,
        "embed_dim": 32,
        "decoder_num_attention_heads": 2,
        "decoder_mlp_dim": 64,
        "iou_head_hidden_dim": 32,
        "concept_hidden_size": 64,
        "concept_embed_dim": 64,
        "num_concepts": 8,
        "text_hidden_size": 32,
        "text_num_hidden_layers": 2,
        "text_num_attention_heads": 2,
        "text_mlp_ratio": 2,
        "text_vocab_size": 128,
        "text_max_length": 16,
        "text_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    },
}


@strict
class TapConfig(PreTrainedConfig):
    r"""Configuration of [`TapModel`], TAP-v2's promptable tokenizer.

    Image encoder (section 3.1 "Model architecture"; sizes from the v1.1 release):
        image_size: side of the square, padded model input in pixels (1024). The longest image side is resized to it.
        patch_size: ViT patch size (16); `image_size / patch_size` is the feature grid (64).
        vision_hidden_size, vision_num_hidden_layers, vision_num_attention_heads: ViT width, depth and heads
            (ViT-B 768/12/12, ViT-L 1024/24/16, ViT-H 1280/32/16).
        vision_mlp_ratio: MLP width / hidden size (4).
        vision_window_size: side of the non-overlapping attention windows in patches (16), used in every block.
        vision_num_cross_blocks: residual 3x3 bottleneck conv blocks that replace SAM's global attention (4), after
            blocks `k * depth / n - 1` for k = 1..n.
        vision_layer_norm_eps: LayerNorm epsilon of the ViT (1e-6).
        embed_dim: width of the neck output, the prompt embeddings and the image decoder (256).

    Image decoder (section 3.1; two-way transformer as in SAM):
        decoder_num_hidden_layers (2), decoder_num_attention_heads (8), decoder_mlp_dim (2048),
        decoder_attention_downsample_rate (2: cross-attention at half width).
        num_mask_outputs: masks (and semantic tokens) per prompt (4): output 0 for boxes, 1-3 for points/sketches.
        iou_head_hidden_dim (256), iou_head_depth (3): the IoU prediction MLP.

    Concept head (section 3.1 "Concept prediction", eq. 2):
        concept_hidden_size (1024), concept_embed_dim (1024): the semantic-token MLP 256 -> 1024 -> 1024 -> 1024
            (3 layers as released); its output `V_P` is compared with the concept bank by cosine similarity.
        num_concepts: rows of the concept bank (2560 for `merged_2560`; the bank is a buffer, swap it with
            `TapModel.set_concept_bank`).
        concept_names: the bank's concept names (length `num_concepts`) or None.
        concept_logit_scale: `1 / tau` of eq. 1-2 (100, EVA-CLIP's `logit_scale.exp()`).

    Text decoder (section 3.1 "Promptable captioning", Figure 5):
        text_hidden_size (512), text_num_hidden_layers (12), text_num_attention_heads (8), text_mlp_ratio (4).
        text_vocab_size: 32000 (LLaMA-style BPE); the tiny preset uses the word-level tokenizer's size.
        text_max_length: caption tokens including BOS and EOS (40); greedy decoding writes at most
            `text_max_length - 1` tokens after BOS.
        text_rope_theta: rotary base (1e4); rotary is interleaved (GPT-J layout) as released.
        text_dropout: dropout in the text decoder (0.4, section 4.1; the v1.1 release used 0.1). The paper's image
            decoder dropout (0.1) and ViT drop-path (0.1-0.2) are not modelled: transformers' SAM blocks, reused for
            the two-way decoder, have no dropout.
        bos_token_id, eos_token_id, pad_token_id: special ids of the caption tokenizer.

    Loss (section 3.1 "Pre-training loss"): `L = concept_loss_weight * L_concept + seg_loss_weight * L_seg +
    caption_loss_weight * L_cap` with `L_seg = focal_loss_weight * focal + dice_loss_weight * dice +
    iou_loss_weight * MSE(iou)` (focal:dice = 20:1 as SAM; the IoU MSE is SAM's and trains the routing scores).
    Defaults are stage 2 (alpha, beta = 5, 1); the trainer passes stage 1's weights (beta = 0).

    Example:

    ```python
    >>> from hf_regionmm.modeling.configuration_tap import TapConfig
    >>> config = TapConfig.from_preset("tap-vit-l")
    >>> config.vision_grid_size, config.mask_size
    (64, 256)
    ```
    """

    model_type = "tap"

    image_size: int = 1024
    patch_size: int = 16
    vision_hidden_size: int = 1024
    vision_num_hidden_layers: int = 24
    vision_num_attention_heads: int = 16
    vision_mlp_ratio: int | float = 4
    vision_window_size: int = 16
    vision_num_cross_blocks: int = 4
    vision_layer_norm_eps: float = 1e-6
    embed_dim: int = 256
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 8
    decoder_mlp_dim: int = 2048
    decoder_attention_downsample_rate: int = 2
    num_mask_outputs: int = 4
    iou_head_hidden_dim: int = 256
    iou_head_depth: int = 3
    concept_hidden_size: int = 1024
    concept_embed_dim: int = 1024
    num_concepts: int = 2560
    concept_names: list[str] | tuple[str, ...] | None = None
    concept_logit_scale: float | int = 100.0
    text_hidden_size: int = 512
    text_num_hidden_layers: int = 12
    text_num_attention_heads: int = 8
    text_mlp_ratio: int | float = 4
    text_vocab_size: int = 32000
    text_max_length: int = 40
    text_rope_theta: float | int = 10000.0
    text_dropout: float | int = 0.4
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    concept_loss_weight: float | int = 1.0
    seg_loss_weight: float | int = 5.0
    caption_loss_weight: float | int = 1.0
    focal_loss_weight: float | int = 20.0
    dice_loss_weight: float | int = 1.0
    iou_loss_weight: float | int = 1.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.concept_names is not None:
            self.concept_names = [str(name) for name in self.concept_names]
            if self.num_concepts != len(self.concept_names):
                # `concept_names` is the more specific statement; `num_concepts` follows it.
                self.num_concepts = len(self.concept_names)
        super().__post_init__(**kwargs)
        self._check_values()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TapConfig":
        """Build `tap-vit-b`, `tap-vit-l`, `tap-vit-h` (1024-pixel, released sizes) or `tap-tiny`; `overrides`
        replace fields."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown TAP preset {name!r}; choose one of {sorted(_PRESETS)}.")
        return cls(**{**copy.deepcopy(_PRESETS[name]), **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    # ----------------------------------------------------------------------------------------------------------
    # derived values

    @property
    def vision_grid_size(self) -> int:
        """Patches per side of the encoder's feature map (`image_size / patch_size`; 64)."""
        return self.image_size // self.patch_size

    @property
    def mask_size(self) -> int:
        """Side of the predicted low-resolution masks: 4x the feature grid (256 at 1024 pixels)."""
        return 4 * self.vision_grid_size

    @property
    def vision_cross_block_indices(self) -> tuple[int, ...]:
        """ViT blocks after which a cross-window conv block runs (2, 5, 8, 11 for ViT-B)."""
        step = self.vision_num_hidden_layers // self.vision_num_cross_blocks
        return tuple(step * (k + 1) - 1 for k in range(self.vision_num_cross_blocks))

    @property
    def num_semantic_tokens(self) -> int:
        return self.num_mask_outputs

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
            "patch_size",
            "vision_hidden_size",
            "vision_num_hidden_layers",
            "vision_num_attention_heads",
            "vision_window_size",
            "vision_num_cross_blocks",
            "embed_dim",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
            "decoder_mlp_dim",
            "decoder_attention_downsample_rate",
            "iou_head_hidden_dim",
            "iou_head_depth",
            "concept_hidden_size",
            "concept_embed_dim",
            "num_concepts",
            "text_hidden_size",
            "text_num_hidden_layers",
            "text_num_attention_heads",
            "text_vocab_size",
            "text_max_length",
        ):
            positive_int(name)
        if self.num_mask_outputs < 2:
            raise ValueError(
                f"`num_mask_outputs` must be >= 2 (output 0 for boxes, the rest for points); got {self.num_mask_outputs}."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})."
            )
        if self.vision_grid_size % self.vision_window_size != 0:
            raise ValueError(
                f"The feature grid ({self.vision_grid_size} = image_size / patch_size) must be a multiple of "
                f"`vision_window_size` ({self.vision_window_size}) so the non-overlapping windows tile it; e.g. "
                f"image_size=1024, patch_size=16, vision_window_size=16."
            )
        if self.vision_num_hidden_layers % self.vision_num_cross_blocks != 0:
            raise ValueError(
                f"`vision_num_hidden_layers` ({self.vision_num_hidden_layers}) must be a multiple of "
                f"`vision_num_cross_blocks` ({self.vision_num_cross_blocks}); the conv blocks are evenly spaced."
            )
        for name, width, heads in (
            ("vision", self.vision_hidden_size, self.vision_num_attention_heads),
            ("text", self.text_hidden_size, self.text_num_attention_heads),
        ):
            if width % heads != 0:
                raise ValueError(f"`{name}_hidden_size` ({width}) must be divisible by `{name}_num_attention_heads`.")
        if self.vision_hidden_size % 2 != 0:
            raise ValueError("`vision_hidden_size` must be even (the conv bottleneck is half as wide).")
        if (self.text_hidden_size // self.text_num_attention_heads) % 2 != 0:
            raise ValueError("The text head size must be even for interleaved rotary embeddings.")
        if self.embed_dim % 2 != 0:
            raise ValueError(f"`embed_dim` must be even (sin/cos prompt encoding); got {self.embed_dim}.")
        if (self.embed_dim // self.decoder_attention_downsample_rate) % self.decoder_num_attention_heads != 0:
            raise ValueError(
                f"`embed_dim / decoder_attention_downsample_rate` ({self.embed_dim}/"
                f"{self.decoder_attention_downsample_rate}) must be divisible by `decoder_num_attention_heads` "
                f"({self.decoder_num_attention_heads})."
            )
        if not (isinstance(self.concept_logit_scale, numbers.Real) and self.concept_logit_scale > 0):
            raise ValueError(f"`concept_logit_scale` (1 / temperature) must be > 0; got {self.concept_logit_scale!r}.")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"`text_dropout` must be in [0, 1); got {self.text_dropout!r}.")
        for name in (
            "concept_loss_weight",
            "seg_loss_weight",
            "caption_loss_weight",
            "focal_loss_weight",
            "dice_loss_weight",
            "iou_loss_weight",
        ):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}.")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is None or not 0 <= value < self.text_vocab_size:
                raise ValueError(
                    f"`{name}` must be an id in [0, text_vocab_size={self.text_vocab_size}); got {value!r}."
                )


# ----------------------------------------------------------------------------------------------------------------
# TAP-v2-Chat (section 3.2, Figure 6): the TAP image encoder + a conv projector + an LLM (Phi-2 in the paper).

_PHI_2: dict[str, Any] = {
    "vocab_size": 51200,
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "partial_rotary_factor": 0.4,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "tie_word_embeddings": False,
}
# Name of the attention output projection where it is not Llama's `o_proj`.
_ATTENTION_OUTPUT_PROJECTIONS: dict[str, str] = {"phi": "dense"}
_CHAT_PRESETS: dict[str, dict[str, Any]] = {
    "tap-chat-l": {
        "vision_config": _PRESETS["tap-vit-l"],
        "text_config": {"model_type": "phi", **_PHI_2},
        # Phi-2's tokenizer has 50295 tokens; `<image>` is appended after them (the embedding has 51200 rows).
        "image_token_id": 50295,
    },
    "tap-chat-tiny": {
        "vision_config": _PRESETS["tap-tiny"],
        "text_config": {
            "model_type": "phi",
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "partial_rotary_factor": 0.5,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
            "tie_word_embeddings": False,
        },
        "image_token_id": 127,
        "num_trainable_vision_blocks": 2,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
    },
}


@strict
class TapChatConfig(PreTrainedConfig):
    r"""Configuration of [`TapChatForConditionalGeneration`] (TAP-v2-Chat, section 3.2 and 4.1).

    Sub-configs:
        vision_config: [`TapConfig`] of the tokenizer whose image encoder is reused (its ViT features, before the
            256-d neck, feed the projector).
        text_config: the LLM (any `AutoConfig`, default `phi` at Phi-2 sizes, as in Table 3's TAPv2 rows).

    Fields:
        image_token_id: id of `<image>` in the LLM vocabulary; the processor writes `num_image_tokens` of them.
        projector_num_blocks: residual 3x3 conv blocks of the projector (3), last layer zero-initialized so the
            region-level features pass unchanged at the start of training.
        num_trainable_vision_blocks: the last k ViT blocks trained with the projector and the LLM (4 in the paper).
        lora_rank, lora_alpha, lora_dropout: the LoRA the LLM is tuned with (section 3.2 "Training methods"). The
            paper gives no sizes; the defaults (128, 256, 0.05) are the recipe of Bunny, whose Phi-2 LoRA rows
            Table 3 compares with and whose Bunny-695K data the instruction stage uses.
        lora_target_modules: LLM linear layers that get LoRA, by module name; None = the attention projections
            (`q_proj`, `k_proj`, `v_proj` and the output projection: `dense` for Phi, `o_proj` otherwise).

    LoRA is opt-in: `TapChatForConditionalGeneration.add_language_model_lora()` (or the trainers' `use_lora=True`)
    adds it; the fields only size it.

    Derived: `num_image_tokens = (grid / 2) ** 2` (1024 at 1024 pixels): the projector merges 2x2 neighbouring
    patch tokens.
    """

    model_type = "tap_chat"
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "vision_config": TapConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="phi", init_kwargs=_PHI_2),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 50295
    projector_num_blocks: int = 3
    num_trainable_vision_blocks: int = 4
    lora_rank: int = 128
    lora_alpha: int | float = 256
    lora_dropout: float | int = 0.05
    lora_target_modules: list[str] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in ("projector_num_blocks", "num_trainable_vision_blocks", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if isinstance(self.lora_alpha, bool) or not self.lora_alpha > 0:
            raise ValueError(f"`lora_alpha` must be > 0; got {self.lora_alpha!r} (Bunny's recipe: 256).")
        if isinstance(self.lora_dropout, bool) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        if self.lora_target_modules is not None:
            targets = self.lora_target_modules
            if (
                isinstance(targets, str)
                or not targets
                or not all(isinstance(t, str) and t.isidentifier() for t in targets)
            ):
                raise ValueError(
                    f"`lora_target_modules` must be a non-empty list of LLM module names such as ['q_proj', "
                    f"'v_proj'], or None for the attention projections; got {targets!r}."
                )
            self.lora_target_modules = list(targets)
        if self.num_trainable_vision_blocks > self.vision_config.vision_num_hidden_layers:
            raise ValueError(
                f"`num_trainable_vision_blocks` ({self.num_trainable_vision_blocks}) exceeds the ViT depth "
                f"({self.vision_config.vision_num_hidden_layers})."
            )
        if self.vision_config.vision_grid_size % 2 != 0:
            raise ValueError("The vision feature grid must be even: the projector merges 2x2 patch tokens.")
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"`image_token_id` ({self.image_token_id}) must be an id of the LLM vocabulary "
                f"(< text_config.vocab_size={self.text_config.vocab_size})."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TapChatConfig":
        """`tap-chat-l` (TAP ViT-L + Phi-2) or `tap-chat-tiny`; sub-config dicts in `overrides` are merged."""
        if name not in _CHAT_PRESETS:
            raise ValueError(f"Unknown TAP-Chat preset {name!r}; choose one of {sorted(_CHAT_PRESETS)}.")
        kwargs = copy.deepcopy(_CHAT_PRESETS[name])
        for key, value in overrides.items():
            if key in ("vision_config", "text_config") and isinstance(value, dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        return (self.vision_config.vision_grid_size // 2) ** 2

    @property
    def language_lora_target_modules(self) -> tuple[str, ...]:
        """LLM module names that get LoRA: `lora_target_modules`, or the attention projections of the LLM."""
        if self.lora_target_modules is not None:
            return tuple(self.lora_target_modules)
        output_projection = _ATTENTION_OUTPUT_PROJECTIONS.get(self.text_config.model_type, "o_proj")
        return ("q_proj", "k_proj", "v_proj", output_projection)
