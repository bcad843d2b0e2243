"""Point-BERT in pure torch: FPS, kNN grouping, mini-PointNet tokens, transformer; O(N * G) memory, tiny sizes."""

import numpy as np
import pytest
import torch

from hf_regionmm.modeling import point_bert
from hf_regionmm.modeling.point_bert import (
    PointBertConfig,
    PointBertGroupEncoder,
    PointBertModel,
    farthest_point_sample,
    knn_group,
)
from hf_regionmm.processing.point_cloud_processing import farthest_point_sample_numpy

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_groups": 8,
    "group_size": 4,
    "encoder_dims": 16,
    "position_hidden_size": 8,
    "drop_path_rate": 0.0,
}


def _model(seed: int = 0, **overrides) -> PointBertModel:
    torch.manual_seed(seed)
    return PointBertModel(PointBertConfig(**{**TINY, **overrides})).eval()


def test_fps_on_a_line_picks_ends_then_midpoints():
    # x = 0, 1, ..., 8 on a line: start 0 -> farthest 8 -> 4 (distance 4) -> 2 (first of the ties 2 and 6) -> 6.
    points = torch.zeros(1, 9, 3)
    points[0, :, 0] = torch.arange(9.0)
    assert farthest_point_sample(points, 5).tolist() == [[0, 8, 4, 2, 6]]
    assert farthest_point_sample(points, 2, start_index=3).tolist() == [[3, 8]]


def test_fps_indices_are_distinct_and_generator_controls_the_start():
    points = torch.randn(2, 50, 3, generator=torch.Generator().manual_seed(0))
    indices = farthest_point_sample(points, 20)
    for row in indices:
        assert len(set(row.tolist())) == 20
    first = farthest_point_sample(points, 5, generator=torch.Generator().manual_seed(3))
    again = farthest_point_sample(points, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    # The start is the first index; every later index is the farthest from those chosen before it.
    chosen = first[0].tolist()
    for step in range(1, 5):
        distances = torch.cdist(points[0], points[0, chosen[:step]]).min(dim=1).values
        assert chosen[step] == int(distances.argmax())


def test_torch_and_numpy_fps_agree():
    points = np.random.default_rng(0).normal(size=(200, 3))
    expected = farthest_point_sample_numpy(points, 32, start_index=7)
    actual = farthest_point_sample(torch.from_numpy(points)[None], 32, start_index=7)[0].numpy()
    np.testing.assert_array_equal(actual, expected)


def test_knn_group_matches_brute_force_and_is_centred():
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(2, 40, 3, generator=generator)
    centres = points[:, :5]
    groups = knn_group(points, centres, 6)
    assert groups.shape == (2, 5, 6, 3)
    for b in range(2):
        for g in range(5):
            order = ((points[b] - centres[b, g]) ** 2).sum(-1).argsort()[:6]
            torch.testing.assert_close(groups[b, g], points[b, order] - centres[b, g])
    # The centre is its own nearest neighbour.
    assert torch.allclose(groups[:, :, 0], torch.zeros(2, 5, 3))


def test_group_encoder_ignores_neighbour_order():
    torch.manual_seed(0)
    encoder = PointBertGroupEncoder(16).eval()
    neighbourhoods = torch.randn(2, 3, 8, 3)
    shuffled = neighbourhoods[:, :, torch.randperm(8)]
    torch.testing.assert_close(encoder(neighbourhoods), encoder(shuffled), rtol=1e-5, atol=1e-6)


def test_output_shape_cls_first_and_point_order_invariance():
    model = _model()
    points = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(2))
    outputs = model(points)
    assert outputs.last_hidden_state.shape == (2, 1 + 8, 32)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0])
    # Keep point 0 (the FPS start) in place and shuffle the rest: same centres, same groups, same tokens.
    permutation = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(63)])
    shuffled = model(points[:, permutation]).last_hidden_state
    torch.testing.assert_close(shuffled, outputs.last_hidden_state, rtol=1e-4, atol=1e-5)


def test_position_embedding_is_added_before_every_block():
    model = _model()
    points = torch.randn(1, 64, 3, generator=torch.Generator().manual_seed(3))
    block_inputs = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0].clone()))
    centres, _ = model.group(points)
    positions = torch.cat([model.cls_pos, model.position_embedding(centres)], dim=1)
    model(points)
    first_block_output = model.blocks[0](block_inputs[0])
    torch.testing.assert_close(block_inputs[1], first_block_output + positions)


def test_memory_is_linear_in_points(monkeypatch):
    shapes = []
    real_cdist = torch.cdist

    def recording_cdist(a, b, *args, **kwargs):
        shapes.append((tuple(a.shape), tuple(b.shape)))
        return real_cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(point_bert.torch, "cdist", recording_cdist)
    model = _model()
    model(torch.randn(1, 2048, 3))
    # Only the (G, N) centre-to-point table is ever built, never N x N.
    assert shapes == [((1, 8, 3), (1, 2048, 3))]


def test_bad_point_clouds_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"`point_clouds`.*at least 8"):
        model(torch.randn(1, 7, 3))
    with pytest.raises(ValueError, match=r"`point_clouds`.*\(batch, num_points, 3\)"):
        model(torch.randn(1, 64, 6))
    with pytest.raises(ValueError, match=r"NaN"):
        model(torch.full((1, 64, 3), float("nan")))
    with pytest.raises(ValueError, match=r"`num_samples`"):
        farthest_point_sample(torch.randn(1, 4, 3), 5)


def test_config_validation_and_meta_construction():
    with pytest.raises(ValueError, match="divisible"):
        PointBertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_groups"):
        PointBertConfig(num_groups=0)
    config = PointBertConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_groups, config.group_size) == (384, 12, 512, 32)
    with torch.device("meta"):
        model = PointBertModel(config)
    # Independent count: mini-PointNet + reduce_dim + CLS/pos + position MLP + 12 blocks + final norm.
    h, e = 384, 256
    pointnet = (3 * 128 + 128) + 2 * 128 + (128 * 256 + 256) + (512 * 512 + 512) + 2 * 512 + (512 * e + e)
    block = 2 * h + 3 * h * h + (h * h + h) + 2 * h + (h * 4 * h + 4 * h) + (4 * h * h + h)
    expected = pointnet + (e * h + h) + 2 * h + (3 * 128 + 128 + 128 * h + h) + 12 * block + 2 * h
    assert sum(p.numel() for p in model.parameters()) == expected
