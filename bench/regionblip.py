"""RegionBLIP against its nearest transformers peers (RegionBLIP issue, item 9; targets in PERFORMANCE.md).

1. Image-region captioning latency (prefill + 30 greedy tokens, the released `max_len`; `min_new_tokens` pins the
   count): `RegionBlipForConditionalGeneration` vs transformers' `Blip2ForConditionalGeneration` with the same
   vision / Q-Former / OPT config and weights (ours built with `from_blip2` from the peer). Paper size (EVA ViT-g
   1408 x 39, Q-Former 768 x 12, OPT-2.7B 2560 x 32, 32 queries) cannot run on a 2-core CPU, so every width is
   scaled by 1/8 with depths, heads, token counts (224 px -> 257 ViT tokens, 32 queries) and the 50k vocabulary
   kept (quick: depths / 4 too). Two rows: with the modality's LoRA adapters active (peft, unmerged: extra low-rank
   matmuls on Q-Former query/value and OPT q/v), and with them merged into the base weights (target <= 1.05). The
   region modality also runs PaFE; the peer captions the whole image with the same number of query tokens. Both use
   the same suppressed `<image>` token, so generation runs the same logits processors.
2. Modality switch: `set_modality` between two modalities (adapter change between batches of semi-hybrid training)
   vs one image-region forward of the same model. The switch cost depends on the number of LoRA layers, not on
   widths, so the full run (paper depths) measures the paper-size cost; the paper-size preset built on the meta
   device is timed too (`extra.paper_size_switch_ms`). Target < 1 ms with no module rebuilt (checked by identity).
3. Point-BERT grouping, 8,192 points -> 512 groups x 32 (batch of 4 clouds; quick: 1): ours
   (`farthest_point_sample` + `knn_group`: `cdist` + `topk` on a (G, N) table) against two peers written in this
   file: the released algorithm (`misc.fps` + `knn_point`: the same FPS loop and a (G, N) squared-distance matmul,
   re-implemented here from its description) and the naive per-group loop of PERFORMANCE.md (one distance vector
   and top-k per centre). Points/s is in `extra`; neither ours nor the released one builds an N x N matrix.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from peft.tuners.lora import LoraLayer
from transformers import Blip2Config, Blip2ForConditionalGeneration

from hf_regionmm.modeling.configuration_regionblip import RegionBlipConfig
from hf_regionmm.modeling.modeling_regionblip import RegionBlipForConditionalGeneration
from hf_regionmm.modeling.point_bert import farthest_point_sample, knn_group

from .harness import Comparison, compare

__all__ = ["run"]

NUM_QUERY_TOKENS = 32
IMAGE_TOKEN_INDEX = 50265
BOS_TOKEN_ID = 2


# ----------------------------------------------------------------------------------------------------------------
# 1 + 2: scaled RegionBLIP-OPT-2.7B vs scaled BLIP-2 OPT-2.7B


def _scaled_blip2_config(quick: bool) -> Blip2Config:
    """BLIP-2 OPT-2.7B at 1/8 width (quick: also 1/4 depth); heads, token counts and vocabulary as released."""
    depth = 4 if quick else 1
    vision_width, qformer_width, text_width = 1408 // 8, 768 // 8, 2560 // 8
    return Blip2Config(
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": 6144 // 8,
            "num_hidden_layers": max(39 // depth, 1),
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "qkv_bias": True,
            "layer_norm_eps": 1e-6,
        },
        qformer_config={
            "hidden_size": qformer_width,
            "num_hidden_layers": 12 // depth,
            "num_attention_heads": 12,
            "intermediate_size": 3072 // 8,
            "cross_attention_frequency": 2,
            "encoder_hidden_size": vision_width,
            "vocab_size": 30523,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": 50304,
            "hidden_size": text_width,
            "ffn_dim": 10240 // 8,
            "word_embed_proj_dim": text_width,
            "num_hidden_layers": 32 // depth,
            "num_attention_heads": 32,
            "max_position_embeddings": 2048,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": 50118,
            "pad_token_id": 1,
            "do_layer_norm_before": True,
            "tie_word_embeddings": True,
        },
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN_INDEX,
    )


def _models(quick: bool) -> tuple[RegionBlipForConditionalGeneration, Blip2ForConditionalGeneration]:
    torch.manual_seed(0)
    blip2 = Blip2ForConditionalGeneration(_scaled_blip2_config(quick)).eval()
    regionblip = RegionBlipForConditionalGeneration.from_blip2(
        blip2,
        # Point-BERT does not run in image-region captioning; a small one keeps memory down.
        point_bert_config={"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2, "num_groups": 64},
        use_itc=False,
        use_itm=False,
        use_itg=False,
    ).eval()
    with torch.no_grad():
        # Trained adapters are not zero; the timing does not depend on the values, only realism does.
        for name, parameter in regionblip.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.02)
    # Same logits processors on both sides: ours suppresses the `<image>` placeholder in generation.
    blip2.generation_config.suppress_tokens = list(regionblip.generation_config.suppress_tokens)
    return regionblip, blip2


def _inputs(config: Blip2Config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    # OPT's released prompt is empty: the queries' placeholders, then BOS.
    input_ids = torch.tensor([[IMAGE_TOKEN_INDEX] * NUM_QUERY_TOKENS + [BOS_TOKEN_ID]])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, size, size, generator=generator),
    }


def _merge_adapters(model: RegionBlipForConditionalGeneration, modality: str) -> int:
    """Merge `modality`'s LoRA into the base weights of every layer that holds it; returns the layer count."""
    layers = [module for module in model.modules() if isinstance(module, LoraLayer) and modality in module.lora_A]
    for layer in layers:
        layer.merge(adapter_names=[modality])
    return len(layers)


def _caption_comparisons(quick: bool, repeats: int) -> list[Comparison]:
    regionblip, blip2 = _models(quick)
    peer_inputs = _inputs(blip2.config)
    ours_inputs = {**peer_inputs, "region_boxes": torch.tensor([[0.12, 0.25, 0.64, 0.9]])}
    new_tokens = 8 if quick else 30
    generation = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "num_beams": 1}
    with torch.inference_mode():
        ours_ids = regionblip.generate(**ours_inputs, **generation)
        peer_ids = blip2.generate(**peer_inputs, **generation)
    scale = "width 1/8, paper depths" if not quick else "width 1/8, depth 1/4 (quick)"
    extra = {
        "scale": scale,
        "new_tokens": new_tokens,
        # Sequence lengths returned by `generate` (prompt included where the model returns it).
        "ours_output_length": int(ours_ids.shape[1]),
        "peer_output_length": int(peer_ids.shape[1]),
        "query_tokens": NUM_QUERY_TOKENS,
        "vit_tokens": (blip2.config.vision_config.image_size // 14) ** 2 + 1,
    }

    def ours():
        return regionblip.generate(**ours_inputs, **generation)

    def peer():
        return blip2.generate(**peer_inputs, **generation)

    comparisons = [
        compare(
            f"image-region caption, prefill + {new_tokens} tokens, LoRA active (scaled OPT-2.7B)",
            ours,
            peer,
            ours_label="RegionBlipForConditionalGeneration (peft LoRA, unmerged)",
            peer_label="Blip2ForConditionalGeneration",
            repeats=repeats,
            target="-",
            notes="Same BLIP-2 weights and config; ours adds the image-region adapters, PaFE and its queries.",
            extra=extra,
        )
    ]

    # Switch cost, measured before merging (a merged adapter can no longer be switched off).
    comparisons.append(_switch_comparison(regionblip, ours_inputs, repeats=max(repeats, 5), quick=quick))

    with torch.inference_mode():
        unmerged_logits = regionblip(**ours_inputs, logits_to_keep=1).logits
    merged_layers = _merge_adapters(regionblip, "image_region")
    with torch.inference_mode():
        merged_logits = regionblip(**ours_inputs, logits_to_keep=1).logits
    assert torch.allclose(merged_logits, unmerged_logits, atol=1e-4), "merging must not change the outputs"
    comparisons.append(
        compare(
            f"image-region caption, prefill + {new_tokens} tokens, LoRA merged (scaled OPT-2.7B)",
            ours,
            peer,
            ours_label="RegionBlipForConditionalGeneration (image_region LoRA merged)",
            peer_label="Blip2ForConditionalGeneration",
            repeats=repeats,
            target="<= 1.05",
            notes="peft `merge` of the modality's adapters into the base weights: the same matmuls as BLIP-2.",
            extra={**extra, "merged_lora_layers": merged_layers},
        )
    )
    return comparisons


# ----------------------------------------------------------------------------------------------------------------
# 2: adapter switch


_SWITCHES_PER_CALL = 50


def _paper_size_switch_ms() -> float:
    """`set_modality` on the paper-size preset built on the meta device (no weight memory; switching touches none)."""
    config = RegionBlipConfig.from_preset("regionblip-opt-2.7b", use_itc=False, use_itm=False, use_itg=False)
    with torch.device("meta"):
        model = RegionBlipForConditionalGeneration(config)
    start = time.perf_counter()
    for index in range(_SWITCHES_PER_CALL):
        model.set_modality("point_cloud" if index % 2 == 0 else "image_region")
    return (time.perf_counter() - start) / _SWITCHES_PER_CALL * 1e3


def _switch_comparison(
    model: RegionBlipForConditionalGeneration, inputs: dict[str, torch.Tensor], repeats: int, quick: bool
) -> Comparison:
    modules_before = {name: id(module) for name, module in model.named_modules()}

    def switches():
        # Every call changes the adapter (point cloud <-> image region), as between batches of two modalities.
        for index in range(_SWITCHES_PER_CALL):
            model.set_modality("point_cloud" if index % 2 == 0 else "image_region")

    def forward():
        return model(**inputs, logits_to_keep=1)

    result = compare(
        "modality switch (set_modality) vs one image-region forward",
        switches,
        forward,
        ours_label="set_modality (one switch)",
        peer_label="one image-region forward (same model)",
        repeats=repeats,
        target="switch < 1 ms",
        notes=(
            "Ratio = one switch / one forward (prefill, 33 tokens). Switch cost scales with the number of LoRA "
            "layers (paper depths in the full run), not widths."
        ),
    )
    modules_after = {name: id(module) for name, module in model.named_modules()}
    per_switch = result.ours_seconds / _SWITCHES_PER_CALL
    lora_layers = sum(isinstance(module, LoraLayer) for module in model.modules())
    extra = {
        "switch_ms": round(per_switch * 1e3, 4),
        "modules_rebuilt": sum(modules_before.get(name) != ident for name, ident in modules_after.items())
        + len(modules_before.keys() ^ modules_after.keys()),
        "lora_layers": lora_layers,
        "depths": "paper" if not quick else "1/4 (quick)",
    }
    if not quick:
        extra["paper_size_switch_ms"] = round(_paper_size_switch_ms(), 4)
    return dataclasses.replace(
        result,
        ours_seconds=per_switch,
        ratio=per_switch / result.peer_seconds if result.peer_seconds > 0 else float("inf"),
        extra=extra,
    )


# ----------------------------------------------------------------------------------------------------------------
# 3: Point-BERT grouping


def released_style_grouping(points: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    """Peer: Point-BERT / RegionBLIP's pure-torch grouping (`misc.fps` then `knn_point`), re-implemented from its
    description: FPS with a running distance vector, then squared distances centre x point as
    |c|^2 + |p|^2 - 2 c.p (one (B, G, N) matmul) and an unsorted top-k. Returns `(B, G, K, 3)` centred neighbours."""
    batch_size, num_points, _ = points.shape
    batch_index = torch.arange(batch_size)
    chosen = torch.zeros(batch_size, num_groups, dtype=torch.long)
    distance = torch.full((batch_size, num_points), 1e10)
    farthest = torch.zeros(batch_size, dtype=torch.long)  # the original starts at random; 0 for a fair timing
    for step in range(num_groups):
        chosen[:, step] = farthest
        centre = points[batch_index, farthest].view(batch_size, 1, 3)
        distance = torch.minimum(distance, ((points - centre) ** 2).sum(-1))
        farthest = distance.max(-1)[1]
    centres = points[batch_index[:, None], chosen]
    squared = -2 * centres @ points.transpose(1, 2)
    squared += (centres**2).sum(-1)[..., None]
    squared += (points**2).sum(-1)[:, None, :]
    index = squared.topk(group_size, dim=-1, largest=False, sorted=False).indices
    return points[batch_index[:, None, None], index] - centres[:, :, None]


def per_group_loop_grouping(points: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    """Peer (PERFORMANCE.md): the same FPS, then a Python loop over the centres, one distance vector and top-k each."""
    batch_size = points.shape[0]
    centre_index = farthest_point_sample(points, num_groups)
    groups = torch.empty(batch_size, num_groups, group_size, 3, dtype=points.dtype)
    for sample in range(batch_size):
        cloud = points[sample]
        for group in range(num_groups):
            centre = cloud[centre_index[sample, group]]
            nearest = ((cloud - centre) ** 2).sum(-1).topk(group_size, largest=False).indices
            groups[sample, group] = cloud[nearest] - centre
    return groups


def _ours_grouping(points: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    centre_index = farthest_point_sample(points, num_groups)
    centres = points[torch.arange(points.shape[0])[:, None], centre_index]
    return knn_group(points, centres, group_size)


def _grouping_comparisons(quick: bool, repeats: int) -> list[Comparison]:
    num_points, num_groups, group_size = 8192, 512, 32
    batch_size = 1 if quick else 4
    points = torch.randn(batch_size, num_points, 3, generator=torch.Generator().manual_seed(0))
    points = points / points.norm(dim=-1).max()  # unit sphere, as `pc_norm` leaves object clouds

    def sorted_groups(groups: torch.Tensor) -> torch.Tensor:
        # Neighbour order differs between the methods and does not matter after Point-BERT's max-pools.
        return groups.flatten(-2).sort(dim=-1).values

    ours_groups = _ours_grouping(points, num_groups, group_size)
    assert torch.allclose(
        sorted_groups(ours_groups), sorted_groups(released_style_grouping(points, num_groups, group_size)), atol=1e-5
    ), "ours and the released-style grouping must pick the same neighbourhoods"

    def ours():
        return _ours_grouping(points, num_groups, group_size)

    comparisons = []
    for label, peer, target in (
        ("released Point-BERT grouping (misc.fps + knn_point)", released_style_grouping, "-"),
        ("naive per-group loop", per_group_loop_grouping, "report points/s"),
    ):
        result = compare(
            f"Point-BERT grouping {num_points} points -> {num_groups} x {group_size} vs {label.split(' (')[0]}",
            ours,
            lambda peer=peer: peer(points, num_groups, group_size),
            ours_label="farthest_point_sample + knn_group (cdist + topk)",
            peer_label=f"{label}, written in bench/regionblip.py",
            repeats=repeats,
            target=target,
            notes="Same inputs and FPS start; O(N * G) memory for ours, no N x N matrix.",
        )
        result.extra = {
            "batch": batch_size,
            "ours_points_per_s": round(batch_size * num_points / result.ours_seconds),
            "peer_points_per_s": round(batch_size * num_points / result.peer_seconds),
        }
        comparisons.append(result)
    return comparisons


def run(quick: bool = False) -> list[Comparison]:
    """All RegionBLIP measurements; `quick` uses fewer repetitions, 1/4 depths and 8 new tokens."""
    comparisons = _caption_comparisons(quick, repeats=2 if quick else 5)
    comparisons.extend(_grouping_comparisons(quick, repeats=2 if quick else 5))
    return comparisons
