"""TAP-v2 against its nearest transformers peers (TAP issue, item 10; targets in PERFORMANCE.md).

1. Image encoder at 1024 px: `TapModel.get_image_embeddings` (ViT in 16x16 windows everywhere + residual conv blocks
   + conv neck) vs transformers' `SamVisionModel` (ViT in 14x14 windows + global attention + conv neck) of the same
   width, depth, heads and MLP ratio, on the same 1024x1024 input (64x64 tokens). ViT-B (768 wide, 12 deep) cannot
   run repeatedly on a shared 2-core CPU, so both are scaled the same way: width 1/4 (192, 3 heads of 64) and depth
   1/2 (6 blocks) keeping ViT-B's pattern of one special block in three (SAM: global attention after blocks 2 and 5;
   TAP: conv blocks after blocks 2 and 5). Quick mode: width 1/6 (128, 2 heads), depth 3 (one special block).
   The 1024-px token count, window sizes and the share of special blocks -- what decides the ratio -- are kept.
2. Per-prompt decode with cached image embeddings, one box: `TapModel(image_embeddings=..., input_boxes=...)` (prompt
   encoder + two-way decoder + semantic tokens + concept head over 2560 concepts) vs `SamModel(image_embeddings=...,
   input_boxes=...)` (prompt encoder + mask decoder), both at paper size (256-d, MLP 2048, 2 layers, 8 heads).
3. Caption decode, 39 greedy tokens after BOS (40 with BOS): `TapModel.generate_captions` with its KV cache vs the same
   decoder recomputing the whole sequence each step (`use_cache=False`), at paper size (12 layers, 512 wide, 8 heads,
   32k vocabulary; quick: 6 layers), one prompt. EOS's logit is pinned far below the others so every run writes all 39
   tokens (random weights would stop some captions early). Quick run on the shared 2-core CPU: 2.2x. A cached step
   still streams every weight once (the 32k x 512 output projection alone is 64 MB in fp32: a third of the step) and
   runs ~40 small ops per layer; recomputing <= 41 positions per step adds only ~1.2x that, because matrix-matrix
   products use the CPU far better than matrix-vector ones. The saving grows with prompts per batch and length.
"""

from __future__ import annotations

import torch
from transformers import SamConfig, SamModel, SamVisionConfig, SamVisionModel

from hf_regionmm.modeling.configuration_tap import TapConfig
from hf_regionmm.modeling.modeling_tap import TapModel

from .harness import Comparison, compare

__all__ = ["run"]

IMAGE_SIZE = 1024
CAPTION_TOKENS = 39  # after BOS: 40 positions, the release's text_seq_len


def _small_heads() -> dict:
    # The concept bank and the text decoder play no part in the encoder / decoder timings; keep them small to build.
    return {"num_concepts": 8, "text_vocab_size": 64, "text_num_hidden_layers": 1}


# ----------------------------------------------------------------------------------------------------------------
# 1. Image encoder


def _encoder_pair(quick: bool) -> tuple[TapModel, SamVisionModel, dict]:
    width, heads, depth = (128, 2, 3) if quick else (192, 3, 6)
    special = tuple(range(2, depth, 3))  # ViT-B's (2, 5, 8, 11) pattern at this depth
    tap_config = TapConfig.from_preset(
        "tap-vit-b",
        vision_hidden_size=width,
        vision_num_attention_heads=heads,
        vision_num_hidden_layers=depth,
        vision_num_cross_blocks=len(special),
        **_small_heads(),
    )
    sam_config = SamVisionConfig(
        hidden_size=width,
        num_attention_heads=heads,
        num_hidden_layers=depth,
        global_attn_indexes=special,
        image_size=IMAGE_SIZE,
        patch_size=16,
        window_size=14,
        mlp_ratio=4.0,
        output_channels=256,
    )
    torch.manual_seed(0)
    tap = TapModel(tap_config).eval()
    sam = SamVisionModel(sam_config).eval()
    assert tap_config.vision_cross_block_indices == special
    scale = "width 1/6, depth 3 (quick)" if quick else "width 1/4 (192), depth 1/2 (6), ViT-B's 1-in-3 special blocks"
    extra = {
        "scale": scale,
        "tokens": (IMAGE_SIZE // 16) ** 2,
        "tap_cross_blocks_after": list(special),
        "sam_global_attention_blocks": list(special),
        "tap_encoder_parameters": sum(p.numel() for p in tap.vision_encoder.parameters()),
        "sam_encoder_parameters": sum(p.numel() for p in sam.parameters()),
    }
    return tap, sam, extra


def _encoder_comparison(quick: bool) -> Comparison:
    tap, sam, extra = _encoder_pair(quick)
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    label = extra["scale"]
    return compare(
        f"image encoder at 1024 px (ViT-B scaled: {label})",
        lambda: tap.get_image_embeddings(pixel_values),
        lambda: sam(pixel_values=pixel_values).last_hidden_state,
        ours_label="TapModel.get_image_embeddings",
        peer_label="SamVisionModel",
        repeats=2 if quick else 3,
        target="<= 0.7",
        notes="Same width/depth/heads/MLP, 64x64 tokens; TAP: windows everywhere + conv blocks, SAM: global blocks.",
        extra=extra,
    )


# ----------------------------------------------------------------------------------------------------------------
# 2. Per-prompt decode


def _decode_comparison(quick: bool) -> Comparison:
    torch.manual_seed(0)
    # Paper-size prompt encoder / decoder / concept head; a 1-block, 64-wide ViT only so the model builds fast.
    tap = TapModel(
        TapConfig.from_preset(
            "tap-vit-b",
            vision_hidden_size=64,
            vision_num_attention_heads=1,
            vision_num_hidden_layers=4,
            text_vocab_size=64,
            text_num_hidden_layers=1,
        )
    ).eval()
    sam = SamModel(
        SamConfig(vision_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1})
    ).eval()
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(1, 256, 64, 64, generator=generator)
    box = torch.tensor([[[200.0, 300.0, 640.0, 700.0]]])
    with torch.inference_mode():
        outputs = tap(image_embeddings=embeddings, input_boxes=box)
        peer_outputs = sam(image_embeddings=embeddings, input_boxes=box)
    assert outputs.pred_masks.shape[-2:] == peer_outputs.pred_masks.shape[-2:] == (256, 256)
    return compare(
        "per-prompt decode, 1 box, cached 64x64 embeddings",
        lambda: tap(image_embeddings=embeddings, input_boxes=box),
        lambda: sam(image_embeddings=embeddings, input_boxes=box),
        ours_label="TapModel prompt encoder + decoder + concept head",
        peer_label="SamModel prompt encoder + mask decoder",
        repeats=5 if quick else 15,
        target="<= 1.2",
        notes="Paper sizes (256-d, MLP 2048); TAP also returns 4 semantic tokens and 2560 concept logits.",
        extra={
            "tap_masks": list(outputs.pred_masks.shape),
            "sam_masks": list(peer_outputs.pred_masks.shape),
            "tap_concepts": tap.config.num_concepts,
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. Caption decode with and without the KV cache


def _caption_model(quick: bool) -> TapModel:
    config = TapConfig.from_preset(
        "tap-vit-b",
        vision_hidden_size=64,
        vision_num_attention_heads=1,
        vision_num_hidden_layers=4,
        num_concepts=8,
        text_num_hidden_layers=6 if quick else 12,
        text_dropout=0.0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = TapModel(config).eval()
    with torch.no_grad():
        # Random weights would end some captions early. Channel 0 of the final LayerNorm is pinned to 100 and only
        # EOS reads it (with weight -100), so EOS's logit is -1e4 and never the argmax: both sides write 39 tokens.
        model.text_decoder.norm.weight[0] = 0.0
        model.text_decoder.norm.bias[0] = 100.0
        model.text_decoder.lm_head.weight[:, 0] = 0.0
        model.text_decoder.lm_head.weight[config.eos_token_id] = 0.0
        model.text_decoder.lm_head.weight[config.eos_token_id, 0] = -100.0
    return model


def _caption_comparison(quick: bool) -> Comparison:
    model = _caption_model(quick)
    tokens = torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cached = model.generate_captions(tokens, max_new_tokens=CAPTION_TOKENS, use_cache=True)
        uncached = model.generate_captions(tokens, max_new_tokens=CAPTION_TOKENS, use_cache=False)
    if cached.shape[-1] != CAPTION_TOKENS or not torch.equal(cached, uncached):
        raise RuntimeError(
            f"Cached and uncached decoding disagree or stopped early ({cached.shape[-1]} tokens); the benchmark "
            "would compare different work."
        )
    layers = model.config.text_num_hidden_layers
    comparison = compare(
        f"caption decode, {CAPTION_TOKENS + 1} tokens, KV cache vs recompute ({layers} layers, 512-d, 32k vocab)",
        lambda: model.generate_captions(tokens, max_new_tokens=CAPTION_TOKENS, use_cache=True),
        lambda: model.generate_captions(tokens, max_new_tokens=CAPTION_TOKENS, use_cache=False),
        ours_label="generate_captions(use_cache=True)",
        peer_label="generate_captions(use_cache=False)",
        repeats=2 if quick else 3,
        target="ratio <= 0.33 (>= 3x faster)",
        notes=(
            "One prompt, greedy, all 39 tokens written (EOS disabled); speed-up = 1 / ratio. Batch-1 decode is bound "
            "by streaming the weights each step, which the cache cannot remove (see bench/tap.py)."
        ),
        extra={"layers": layers, "tokens_written": CAPTION_TOKENS},
    )
    comparison.extra["speedup"] = round(1.0 / comparison.ratio, 2)
    return comparison


def run(quick: bool = False) -> list[Comparison]:
    """All TAP measurements; `quick` uses smaller encoders, a 6-layer text decoder and fewer repetitions."""
    return [_encoder_comparison(quick), _decode_comparison(quick), _caption_comparison(quick)]
