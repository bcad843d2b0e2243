"""Configuration of the class-agnostic Deformable-DETR region proposer (Groma section 3.1, "Region Proposer").

Groma scores and localises regions with a Deformable-DETR encoder-decoder that sits on frozen DINOv2 patch features
and replaces the classifier by binary objectness heads. The defaults below are the released
``FoundationVision/groma-det-pretrain`` values (``perceiver_cfg.ddetr_cfg``), including two behaviours of the
released code that differ from textbook Deformable DETR; both are flags so converted weights reproduce the released
outputs while a retrained model can use the standard variant:

* ``update_reference_points=False`` (released): every decoder layer samples around the initial top-``num_queries``
  two-stage proposals; the boxes a layer predicts refine the previous layer's refinement (so gradients "look forward
  twice", DINO-style) but never move the sampling points. ``True`` is standard iterative box refinement: the
  (detached) boxes predicted by layer ``l`` are where layer ``l + 1`` samples.
* ``content_queries="query_embeddings"`` (released, DINO's "mixed query selection"): the decoder content queries are
  the learned ``query_position_embeddings`` ``(num_queries, d_model)`` and only the positional half of the
  ``pos_trans`` output of the selected proposals is used. ``"two_stage_pos_trans"`` is standard two-stage Deformable
  DETR: the ``pos_trans`` output is split into positional and content queries (no ``query_position_embeddings``).

Field names that transformers' ``DeformableDetrEncoderLayer`` / ``DeformableDetrDecoderLayer`` read (``d_model``,
``encoder_attention_heads``, ``encoder_n_points``, ``num_feature_levels``, ``dropout``, ``attention_dropout``,
``activation_dropout``, ``activation_function``, ...) are spelled as in ``DeformableDetrConfig``, so this config is
handed to those layers directly.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

__all__ = ["DetrProposerConfig"]

_CONTENT_QUERY_MODES = ("query_embeddings", "two_stage_pos_trans")
_MAX_FEATURE_LEVELS = 4


@strict
class DetrProposerConfig(PreTrainedConfig):
    r"""Configuration of [`DetrProposer`].

    Sizes:
        input_dim: channel width of the vision feature map(s) fed to the proposer (DINOv2-L: 1024).
        num_feature_levels: pyramid levels, 1 to 4. Released Groma uses 1 (``input_proj.0`` = 1x1 conv + channel
            LayerNorm on the 32x32 DINOv2 map); the paper describes a ViTDet-like simple pyramid. Levels are built
            from one ViT map, finest first, as in the original code: 1 level = [x1]; 2 = [x1, /2]; 3 = [x2, x1, /2];
            4 = [x4, x2, x1, /2] (x4/x2: transposed convs, /2: stride-2 3x3 conv).
        d_model: transformer width (multiple of 4 and of both head counts).
        encoder_layers, decoder_layers, encoder_attention_heads, decoder_attention_heads, encoder_ffn_dim,
        decoder_ffn_dim, encoder_n_points, decoder_n_points: Deformable-DETR encoder/decoder sizes.
        num_queries: decoder queries = proposals returned per image (two-stage: top-k encoder proposals).

    Behaviour:
        two_stage: encoder-side proposals seed the decoder (requires ``with_box_refine``).
        with_box_refine: one box head per decoder layer (plus one for the encoder proposals when two-stage), each
            predicting a delta on the previous boxes; without it a single shared box head is used.
        update_reference_points: see the module docstring (released: ``False``). Only matters with
            ``with_box_refine`` (without refinement every layer samples around the initial references).
        content_queries: ``"query_embeddings"`` (released) or ``"two_stage_pos_trans"``; see the module docstring.
            Only meaningful with ``two_stage``.
        objectness_heads: names of the binary objectness heads (released: ``("coco", "sa1b")``, one per training
            data source). Names must be valid attribute names (they key a ``ModuleDict``).
        objectness_weights: exponents of the fused score ``prod_h sigmoid(logit_h) ** w_h`` (released
            ``(0.4, 0.6)``). ``None`` means a geometric mean (``1 / len(objectness_heads)`` each); a single head
            with weight 1 is a plain sigmoid.
        dropout, attention_dropout, activation_dropout, activation_function: as in ``DeformableDetrConfig``.
        init_std: std of the normal init of linear/conv/embedding weights.

    Loss (Hungarian set loss, class-agnostic, sigmoid focal classification):
        focal_alpha, focal_gamma: focal-loss parameters.
        class_cost, bbox_cost, giou_cost: matching costs.
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient: loss weights (also used for the
            per-layer auxiliary and encoder-proposal terms).
        auxiliary_loss: also supervise every intermediate decoder layer (released ``train_det.py`` default: on).

    Example:

    ```python
    >>> from hf_regionmm.modeling.configuration_detr_proposer import DetrProposerConfig
    >>> released = DetrProposerConfig()  # Groma's released proposer
    >>> tiny = DetrProposerConfig(input_dim=16, d_model=32, encoder_layers=1, decoder_layers=2, num_queries=10)
    ```
    """

    model_type = "detr_proposer"
    base_config_key = "proposer_config"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

    input_dim: int = 1024
    num_feature_levels: int = 1
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 1024
    decoder_ffn_dim: int = 1024
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    num_queries: int = 300
    two_stage: bool = True
    with_box_refine: bool = True
    update_reference_points: bool = False
    content_queries: str = "query_embeddings"
    objectness_heads: list[str] | tuple[str, ...] = ("coco", "sa1b")
    objectness_weights: list[float | int] | tuple[float | int, ...] | None = (0.4, 0.6)
    dropout: float | int = 0.1
    attention_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    activation_function: str = "relu"
    init_std: float | int = 0.02
    focal_alpha: float | int = 0.25
    focal_gamma: float | int = 2.0
    class_cost: float | int = 2
    bbox_cost: float | int = 5
    giou_cost: float | int = 2
    class_loss_coefficient: float | int = 2
    bbox_loss_coefficient: float | int = 5
    giou_loss_coefficient: float | int = 2
    auxiliary_loss: bool = True

    def __post_init__(self, **kwargs):
        # JSON turns tuples into lists; keep one canonical (immutable) form so configs compare equal after a reload.
        self.objectness_heads = tuple(self.objectness_heads)
        if self.objectness_weights is not None:
            self.objectness_weights = tuple(float(weight) for weight in self.objectness_weights)
        super().__post_init__(**kwargs)
        self._check_values()

    @property
    def disable_custom_kernels(self) -> bool:
        # Read by transformers' DeformableDetrMultiscaleDeformableAttention. The proposer always runs its pure
        # PyTorch grid_sample path (or a Hub kernel through `use_kernel_forward_from_hub`), never a CUDA build.
        return True

    @property
    def fused_objectness_weights(self) -> tuple[float, ...]:
        """Exponent of each objectness head in the fused score, one per ``objectness_heads`` entry."""
        if self.objectness_weights is None:
            return tuple(1.0 / len(self.objectness_heads) for _ in self.objectness_heads)
        return self.objectness_weights

    def _check_values(self) -> None:
        for name in (
            "input_dim",
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "encoder_n_points",
            "decoder_n_points",
            "num_queries",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value}.")
        if not 1 <= self.num_feature_levels <= _MAX_FEATURE_LEVELS:
            raise ValueError(
                f"`num_feature_levels` must be between 1 and {_MAX_FEATURE_LEVELS} (levels of the simple pyramid "
                f"built from one ViT map); got {self.num_feature_levels}. Released Groma uses 1."
            )
        if self.d_model % 4 != 0:
            raise ValueError(
                f"`d_model` must be a multiple of 4 (sine position features and the x4 pyramid level split it in "
                f"quarters); got {self.d_model}."
            )
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name) != 0:
                raise ValueError(
                    f"`d_model` ({self.d_model}) must be divisible by `{name}` ({getattr(self, name)}); choose a "
                    f"head count that divides it."
                )
        if self.two_stage and not self.with_box_refine:
            raise ValueError(
                "`two_stage=True` requires `with_box_refine=True` (the encoder proposals use their own box head, "
                "the last entry of `bbox_embed`); set `with_box_refine=True` or `two_stage=False`."
            )
        if self.content_queries not in _CONTENT_QUERY_MODES:
            raise ValueError(
                f"`content_queries` must be one of {_CONTENT_QUERY_MODES}; got {self.content_queries!r}. Use "
                f"'query_embeddings' for released Groma weights."
            )
        if len(self.objectness_heads) == 0:
            raise ValueError("`objectness_heads` must name at least one head, e.g. ('objectness',).")
        for head in self.objectness_heads:
            if not isinstance(head, str) or not head.isidentifier():
                raise ValueError(
                    f"`objectness_heads` entries must be identifiers (they name sub-modules); got {head!r}."
                )
        if len(set(self.objectness_heads)) != len(self.objectness_heads):
            raise ValueError(f"`objectness_heads` must be unique; got {self.objectness_heads}.")
        if self.objectness_weights is not None:
            if len(self.objectness_weights) != len(self.objectness_heads):
                raise ValueError(
                    f"`objectness_weights` needs one exponent per objectness head: {len(self.objectness_heads)} heads "
                    f"{self.objectness_heads} but {len(self.objectness_weights)} weights {self.objectness_weights}. "
                    f"Pass matching lengths or `objectness_weights=None` for a geometric mean."
                )
            if any(weight <= 0 for weight in self.objectness_weights):
                raise ValueError(f"`objectness_weights` must be positive; got {self.objectness_weights}.")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1); got {value}.")
        if self.activation_function not in ACT2FN:
            raise ValueError(
                f"`activation_function` must be a transformers activation name such as 'relu' or 'gelu'; got "
                f"{self.activation_function!r}."
            )
        if not 0.0 < self.focal_alpha < 1.0:
            raise ValueError(f"`focal_alpha` must be in (0, 1); got {self.focal_alpha}.")
        if self.init_std <= 0:
            raise ValueError(f"`init_std` must be positive; got {self.init_std}.")
        for name in (
            "focal_gamma",
            "class_cost",
            "bbox_cost",
            "giou_cost",
            "class_loss_coefficient",
            "bbox_loss_coefficient",
            "giou_loss_coefficient",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be non-negative; got {getattr(self, name)}.")
        if self.class_cost == 0 and self.bbox_cost == 0 and self.giou_cost == 0:
            raise ValueError("`class_cost`, `bbox_cost` and `giou_cost` cannot all be 0; the matcher needs a cost.")
