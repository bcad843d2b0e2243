"""Configuration of RegionBLIP (Zhou et al. 2023, "RegionBLIP: A Unified Multi-modal Pre-training Framework for
Holistic and Regional Comprehension", section 3.1).

RegionBLIP = a frozen BLIP-2 (EVA ViT-g vision tower, Q-Former, OPT or Flan-T5) extended to four modalities --
`image`, `image_region`, `point_cloud`, `point_cloud_region` -- by one set of learnable queries, one LoRA adapter (in
the Q-Former and in the LLM) and one LLM projection per modality, a frozen Point-BERT point encoder with a 384 -> ViT
width adapter and, as in every released config, a second Q-Former for point clouds. Region modalities add PaFE: an
MLP of the box (4 normalized xyxy numbers, or 24 numbers = 8 corners of a 3D box) added to every region query.
Training adds BLIP-2's stage-1 losses on the Q-Former of every modality (section 3.2, eq. 2): ITC, ITM and ITG, which
need the Q-Former's text side (BERT word/position embeddings, text feed-forward layers, LM head).

Presets (`RegionBlipConfig.from_preset`): `regionblip-opt-2.7b`, `regionblip-opt-6.7b`, `regionblip-flant5-xl`,
`regionblip-flant5-xxl` (paper sizes; HF BLIP-2 vocabularies, whose last ids hold the `<image>` placeholder) and
`regionblip-tiny` (OPT, seconds on a CPU). This file is the single source of truth for sizes and flags.
"""

import copy
import numbers
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, Blip2QFormerConfig, Blip2VisionConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .point_bert import PointBertConfig

__all__ = ["MODALITIES", "REGION_MODALITIES", "POINT_CLOUD_MODALITIES", "RegionBlipConfig"]

# Order matters: adapters, query sets and projections are created in this order (stable parameter names).
MODALITIES: tuple[str, ...] = ("image", "image_region", "point_cloud", "point_cloud_region")
REGION_MODALITIES: tuple[str, ...] = ("image_region", "point_cloud_region")
POINT_CLOUD_MODALITIES: tuple[str, ...] = ("point_cloud", "point_cloud_region")

# LoRA target modules of the LLM (released `modeling_opt.py` q_proj/v_proj, `modeling_t5.py` q/v).
_LLM_LORA_TARGETS = {"opt": ("q_proj", "v_proj"), "t5": ("q", "v")}

_EVA_VIT_G = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "qkv_bias": True,
    "layer_norm_eps": 1e-6,
}
_QFORMER_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": 1408,
    "vocab_size": 30523,
}
# HF `Salesforce/blip2-opt-*`: OPT vocabulary padded to 50304 with `<image>` at 50265.
_OPT = {
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "bos_token_id": 2,
    "eos_token_id": 50118,
    "pad_token_id": 1,
    "do_layer_norm_before": True,
    "tie_word_embeddings": True,
}
_OPT_2_7B = {**_OPT, "hidden_size": 2560, "ffn_dim": 10240, "word_embed_proj_dim": 2560}
_OPT_6_7B = {**_OPT, "hidden_size": 4096, "ffn_dim": 16384, "word_embed_proj_dim": 4096}
# HF `Salesforce/blip2-flan-t5-*`: T5 vocabulary 32128 + `<image>` at 32100 (inside the padded range).
_FLAN_T5 = {
    "vocab_size": 32128,
    "d_kv": 64,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "decoder_start_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
_FLAN_T5_XL = {**_FLAN_T5, "d_model": 2048, "d_ff": 5120, "num_heads": 32}
_FLAN_T5_XXL = {**_FLAN_T5, "d_model": 4096, "d_ff": 10240, "num_heads": 64}

_PRESETS: dict[str, dict[str, Any]] = {
    "regionblip-opt-2.7b": {
        "vision_config": _EVA_VIT_G,
        "qformer_config": _QFORMER_BASE,
        "point_cloud_qformer_config": _QFORMER_BASE,
        "text_config": {"model_type": "opt", **_OPT_2_7B},
        "image_token_index": 50265,
    },
    "regionblip-opt-6.7b": {
        "vision_config": _EVA_VIT_G,
        "qformer_config": _QFORMER_BASE,
        "point_cloud_qformer_config": _QFORMER_BASE,
        "text_config": {"model_type": "opt", **_OPT_6_7B},
        "image_token_index": 50265,
    },
    "regionblip-flant5-xl": {
        "vision_config": _EVA_VIT_G,
        "qformer_config": _QFORMER_BASE,
        "point_cloud_qformer_config": _QFORMER_BASE,
        "text_config": {"model_type": "t5", **_FLAN_T5_XL},
        "image_token_index": 32100,
    },
    "regionblip-flant5-xxl": {
        "vision_config": _EVA_VIT_G,
        "qformer_config": _QFORMER_BASE,
        "point_cloud_qformer_config": _QFORMER_BASE,
        "text_config": {"model_type": "t5", **_FLAN_T5_XXL},
        "image_token_index": 32100,
    },
    "regionblip-tiny": {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            # Blip2VisionConfig's default 1e-10 (set for converted checkpoints) would make a random tower output
            # the same features for every image.
            "initializer_range": 0.02,
        },
        "qformer_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "cross_attention_frequency": 1,
            "encoder_hidden_size": 32,
            "vocab_size": 64,
        },
        "qformer_decoder_start_token_id": 63,
        "point_cloud_qformer_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "cross_attention_frequency": 1,
            "encoder_hidden_size": 32,
            "vocab_size": 64,
        },
        "point_bert_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_groups": 16,
            "group_size": 8,
            "encoder_dims": 32,
            "position_hidden_size": 16,
            "drop_path_rate": 0.0,
        },
        "text_config": {
            "model_type": "opt",
            "vocab_size": 128,
            "hidden_size": 32,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
            "tie_word_embeddings": True,
        },
        "num_query_tokens": 4,
        "image_token_index": 127,
        "position_embedding_hidden_size": 16,
    },
}


@strict
class RegionBlipConfig(PreTrainedConfig):
    r"""Configuration of [`RegionBlipModel`] / [`RegionBlipForConditionalGeneration`].

    Sub-configs:
        vision_config: [`Blip2VisionConfig`] of the frozen image tower (EVA ViT-g/14 as in BLIP-2; `image_size` 224
            for training, 364 for the released image-region evaluation).
        qformer_config: [`Blip2QFormerConfig`] of BLIP-2's Q-Former (image and image-region modalities, frozen +
            per-modality LoRA). `encoder_hidden_size` must equal the vision width.
        point_cloud_qformer_config: [`Blip2QFormerConfig`] of the second Q-Former for the point-cloud modalities
            (`Qformer_pc`, fully trainable in every released config), or None to share `qformer` (all four LoRA
            adapters then sit in it).
        point_bert_config: [`PointBertConfig`] of the frozen Point-BERT encoder (1 + 512 tokens x 384).
        text_config: the LLM (any `AutoConfig`; `opt` (decoder-only) or `t5` (encoder-decoder, Flan-T5)).

    Modalities and queries:
        num_query_tokens: learned queries per modality (32). Every prompt holds this many `image_token_index`
            placeholders, which the selected modality's projected query outputs replace.
        image_token_index: id of the `<image>` placeholder in the LLM vocabulary (HF BLIP-2: 50265 for OPT).
        position_embedding_hidden_size: inner width of PaFE (128).

    LoRA (released: r=8, alpha=1, dropout 0, on query/value of self- and cross-attention of the Q-Former and on
    q_proj/v_proj (OPT) or q/v (T5) of the LLM; one adapter per modality, never merged):
        lora_rank, lora_alpha, lora_dropout.

    Losses (eq. 2: L = L_ITC + L_ITG + L_ITM + L_LLM + lambda * L_reg, every weight 1 as released):
        use_box_regression: add the auxiliary box-regression heads (`L_reg`, section 3.1, eq. 1).
        box_regression_loss_weight: lambda of eq. 2 (1.0).
        language_model_loss_weight: weight of the LLM's LM loss (1.0).
        use_itc, use_itm, use_itg: BLIP-2's stage-1 Q-Former losses, kept per modality by RegionBLIP (released
            `_forward_modal_align`): image/point-cloud-text contrastive (max over the queries of the cosine similarity
            with the text [CLS] feature, label smoothing `contrastive_label_smoothing`), matching (binary head on the
            queries, in-batch hard negatives drawn from the ITC similarities) and grounded generation (Q-Former
            captioning: text attends to the queries under a causal mask). Any of them adds the Q-Former text side
            and sets `use_qformer_text_input` on both Q-Former configs (the text feed-forward layers).
        itc_loss_weight, itm_loss_weight, itg_loss_weight: their weights (1.0).
        itm_modalities: modalities that get the ITM loss; released: `("image",)` (`img_itm_head` only).
        contrastive_embed_dim: width of the ITC projections (`stage1_proj_*`, 256).
        contrastive_label_smoothing, qformer_caption_label_smoothing: 0.1 each, as released.
        qformer_decoder_start_token_id: id that replaces the [CLS] of ITG captions (`[DEC]`, 30522 in LAVIS's
            bert-base-uncased tokenizer); must lie in `qformer_config.vocab_size`.
        qformer_max_text_length: Q-Former text tokens per caption (`max_txt_len`, 32).

    Freezing (released `freeze_vit`, `freeze_qformer`, `freeze_point_encoder`, `freeze_blip2_pretrain`):
        freeze_vision_tower, freeze_qformer (base weights of the image Q-Former), freeze_language_model (LLM base
        weights), freeze_point_encoder, freeze_image_modality (the BLIP-2 image path: `image` queries, projection
        and LoRA stay frozen, so image captioning equals BLIP-2's).
    """

    model_type = "regionblip"
    attribute_map: ClassVar[dict[str, str]] = {"image_token_id": "image_token_index"}
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
        "point_cloud_qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig, optional=True),
        "point_bert_config": PointBertConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="opt", init_kwargs=_OPT_2_7B),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    point_cloud_qformer_config: dict | PreTrainedConfig | None = None
    point_bert_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_index: int = 50265
    position_embedding_hidden_size: int = 128
    lora_rank: int = 8
    lora_alpha: int | float = 1
    lora_dropout: float | int = 0.0
    use_box_regression: bool = True
    box_regression_loss_weight: float | int = 1.0
    language_model_loss_weight: float | int = 1.0
    use_itc: bool = True
    use_itm: bool = True
    use_itg: bool = True
    itc_loss_weight: float | int = 1.0
    itm_loss_weight: float | int = 1.0
    itg_loss_weight: float | int = 1.0
    itm_modalities: list[str] | tuple[str, ...] = ("image",)
    contrastive_embed_dim: int = 256
    contrastive_label_smoothing: float | int = 0.1
    qformer_caption_label_smoothing: float | int = 0.1
    qformer_decoder_start_token_id: int = 30522
    qformer_max_text_length: int = 32
    freeze_vision_tower: bool = True
    freeze_qformer: bool = True
    freeze_language_model: bool = True
    freeze_point_encoder: bool = True
    freeze_image_modality: bool = True
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.qformer_config is None:
            self.qformer_config = dict(_QFORMER_BASE)
        super().__post_init__(**kwargs)
        # The LM head lives on the top-level model, so the top-level flag must follow the LLM's (Flan-T5: untied).
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", True))
        # Generation treats the whole model as an encoder-decoder when the LLM is one (Flan-T5).
        self.is_encoder_decoder = self.is_encoder_decoder_language_model
        self.itm_modalities = list(self.itm_modalities)
        if self.use_qformer_losses:
            # The text half of every Q-Former layer (BERT's own feed-forward) exists only with this flag.
            for qformer in (self.qformer_config, self.point_cloud_qformer_config):
                if qformer is not None:
                    qformer.use_qformer_text_input = True
        self._check_values()

    # ----------------------------------------------------------------------------------------------------------
    # presets

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(_PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "RegionBlipConfig":
        """Build a named preset; `overrides` replace top-level fields, sub-config dicts are merged into the preset's."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown RegionBLIP preset {name!r}; choose one of {sorted(_PRESETS)}.")
        kwargs = copy.deepcopy(_PRESETS[name])
        for key, value in overrides.items():
            if key in cls.sub_configs_defaults and isinstance(value, dict) and isinstance(kwargs.get(key), dict):
                kwargs[key] = {**kwargs[key], **value}
            else:
                kwargs[key] = value
        return cls(**kwargs)

    # ----------------------------------------------------------------------------------------------------------
    # derived values

    @property
    def is_encoder_decoder_language_model(self) -> bool:
        """True for T5-style LLMs (prefix LM: queries + prompt go to the encoder, the caption to the decoder)."""
        return bool(getattr(self.text_config, "is_encoder_decoder", False))

    @property
    def use_qformer_losses(self) -> bool:
        """True when any Q-Former loss (ITC, ITM, ITG) is on: the model then carries the Q-Former text side."""
        return bool(self.use_itc or self.use_itm or self.use_itg)

    @property
    def use_point_cloud_qformer(self) -> bool:
        return self.point_cloud_qformer_config is not None

    @property
    def language_lora_target_modules(self) -> tuple[str, ...]:
        return _LLM_LORA_TARGETS[self.text_config.model_type]

    @property
    def text_hidden_size(self) -> int:
        return self.text_config.hidden_size if hasattr(self.text_config, "hidden_size") else self.text_config.d_model

    def qformer_config_for(self, modality: str) -> Blip2QFormerConfig:
        """The Q-Former config that serves `modality`."""
        if modality in POINT_CLOUD_MODALITIES and self.use_point_cloud_qformer:
            return self.point_cloud_qformer_config
        return self.qformer_config

    # ----------------------------------------------------------------------------------------------------------
    # validation

    def _check_values(self) -> None:
        for name in (
            "num_query_tokens",
            "position_embedding_hidden_size",
            "lora_rank",
            "contrastive_embed_dim",
            "qformer_max_text_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be > 0; got {self.lora_alpha!r} (released: 1).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        for name in (
            "box_regression_loss_weight",
            "language_model_loss_weight",
            "itc_loss_weight",
            "itm_loss_weight",
            "itg_loss_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)!r}.")
        for name in ("contrastive_label_smoothing", "qformer_caption_label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1); got {getattr(self, name)!r} (released: 0.1).")
        if self.use_itm and not self.use_itc:
            raise ValueError("`use_itm` needs `use_itc`: ITM draws its hard negatives from the ITC similarities.")
        unknown = [m for m in self.itm_modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"`itm_modalities` must be a subset of {MODALITIES}; got {self.itm_modalities!r}.")
        if self.use_qformer_losses:
            qformer_vocab = self.qformer_config.vocab_size
            token = self.qformer_decoder_start_token_id
            if not isinstance(token, numbers.Integral) or not 0 <= token < qformer_vocab:
                raise ValueError(
                    f"`qformer_decoder_start_token_id` must be an id in the Q-Former vocabulary [0, {qformer_vocab}); "
                    f"got {token!r}. Use the id of the tokenizer's `[DEC]` token (30522 for LAVIS's BERT tokenizer)."
                )
        model_type = getattr(self.text_config, "model_type", None)
        if model_type not in _LLM_LORA_TARGETS:
            raise ValueError(
                f"`text_config` must be an OPT or T5 config (model_type in {sorted(_LLM_LORA_TARGETS)}); got "
                f"{model_type!r}."
            )
        vision_width = self.vision_config.hidden_size
        for name in ("qformer_config", "point_cloud_qformer_config"):
            qformer = getattr(self, name)
            if qformer is not None and qformer.encoder_hidden_size != vision_width:
                raise ValueError(
                    f"`{name}.encoder_hidden_size` ({qformer.encoder_hidden_size}) must equal "
                    f"`vision_config.hidden_size` ({vision_width}): the Q-Former cross-attends to ViT features (point "
                    f"clouds are mapped to the same width by the 384 -> {vision_width} adapter)."
                )
        if (
            self.use_point_cloud_qformer
            and self.point_cloud_qformer_config.hidden_size != self.qformer_config.hidden_size
        ):
            raise ValueError(
                "`point_cloud_qformer_config.hidden_size` must equal `qformer_config.hidden_size` "
                f"({self.point_cloud_qformer_config.hidden_size} != {self.qformer_config.hidden_size})."
            )
        vocab_size = self.text_config.vocab_size
        if not isinstance(self.image_token_index, numbers.Integral) or not 0 <= self.image_token_index < vocab_size:
            raise ValueError(
                f"`image_token_index` must be an id in the LLM vocabulary [0, {vocab_size}); got "
                f"{self.image_token_index!r}. Add an `<image>` token to the tokenizer and use its id."
            )
