"""Shared blocks against their nearest library peers (foundation issue, item 6).

- multi-scale ROIAlign pooler vs torchvision's `MultiScaleRoIAlign` (same boxes, 3 levels, 14x14, sampling 2);
- 2x2 token merge vs `torch.nn.functional.pixel_unshuffle` (the same space-to-depth, other channel layout);
- NMS + score filter + top-k vs a plain `torchvision.ops.nms` followed by slicing.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision

from hf_regionmm.modeling.box_selection import select_boxes
from hf_regionmm.modeling.region_pooling import MultiScaleRoIAlign
from hf_regionmm.modeling.token_merge import merge_tokens_2d

from .harness import Comparison, compare


def _random_boxes(n: int, size: float, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size * 0.8
    wh = torch.rand(n, 2, generator=generator) * size * 0.2 + 4
    return torch.cat([xy, xy + wh], dim=1)


def run(quick: bool = False) -> list[Comparison]:
    generator = torch.Generator().manual_seed(0)
    repeats = 3 if quick else 9
    channels, image = (64, 448) if quick else (256, 448)
    grids = (128, 64, 32)
    features = [torch.randn(1, channels, g, g, generator=generator) for g in grids]
    boxes = _random_boxes(100, image, generator)
    ours_pooler = MultiScaleRoIAlign(output_size=14, spatial_scales=[g / image for g in grids], sampling_ratio=2)
    # torchvision's pooler maps each box to ONE level (FPN heuristic); ours pools every box from every level, as
    # Groma's region encoder does, so the peer is run once per level to do the same work.
    peer_poolers = [
        torchvision.ops.MultiScaleRoIAlign([f"l{i}"], output_size=14, sampling_ratio=2) for i in range(len(grids))
    ]
    peer_maps = [OrderedDict({f"l{i}": f}) for i, f in enumerate(features)]

    def ours_pool():
        return ours_pooler(features, [boxes])

    def peer_pool():
        return [pooler(m, [boxes], [(image, image)]) for pooler, m in zip(peer_poolers, peer_maps, strict=True)]

    tokens = torch.randn(8, 32 * 32, 1024, generator=generator)
    scores = torch.rand(300, generator=generator)
    proposals = _random_boxes(300, image, generator)

    def peer_select():
        keep = scores > 0.15
        kept = torchvision.ops.nms(proposals[keep], scores[keep], 0.6)[:100]
        return torch.nonzero(keep).squeeze(1)[kept]

    return [
        compare(
            "ROIAlign, 100 boxes x 3 levels",
            ours_pool,
            peer_pool,
            ours_label="MultiScaleRoIAlign",
            peer_label="torchvision MultiScaleRoIAlign x3",
            repeats=repeats,
            target="~1.0",
        ),
        compare(
            "2x2 token merge, 8 x 1024 tokens",
            lambda: merge_tokens_2d(tokens, (32, 32)),
            lambda: torch.nn.functional.pixel_unshuffle(tokens.view(8, 32, 32, 1024).permute(0, 3, 1, 2), 2),
            ours_label="merge_tokens_2d",
            peer_label="F.pixel_unshuffle",
            repeats=repeats,
            target="~1.0",
        ),
        compare(
            "NMS + score + top-k, 300 boxes",
            lambda: select_boxes(proposals, scores, score_threshold=0.15, iou_threshold=0.6, max_num=100),
            peer_select,
            ours_label="select_boxes",
            peer_label="torchvision nms + slicing",
            repeats=repeats,
            target="~1.0",
        ),
    ]
