"""Region feature blocks: multi-scale RoIAlign, box position embedding, 2-D token merge."""

import pytest
import torch
from torch import nn

from hf_regionmm.modeling.box_position_embedding import BoxPositionEmbedding
from hf_regionmm.modeling.region_pooling import MultiScaleRoIAlign
from hf_regionmm.modeling.token_merge import TokenMerge2d, merge_tokens_2d

# ---------------------------------------------------------------------------------------------------- RoIAlign


def _column_index_map(batch_size=1, channels=1, height=8, width=8):
    """A feature map whose value at (y, x) is x: bilinear samples then read back their x coordinate."""
    return torch.arange(width, dtype=torch.float32).expand(batch_size, channels, height, width).contiguous()


def test_roi_align_on_constant_map_returns_the_constant():
    pooler = MultiScaleRoIAlign(output_size=3, spatial_scales=(1.0,))
    features = [torch.full((1, 2, 8, 8), 3.5)]
    pooled = pooler(features, [torch.tensor([[1.0, 1.0, 6.0, 5.0], [2.0, 2.0, 3.0, 7.0]])])
    assert pooled.shape == (2, 1, 2, 3, 3)
    torch.testing.assert_close(pooled, torch.full_like(pooled, 3.5))


def test_roi_align_on_linear_map_gives_bin_centres():
    # aligned=True maps continuous coordinate c to feature index c - 0.5, so on the map f(y, x) = x every bin reads
    # (its centre x) - 0.5. Box x in [2, 6] with 2 bins: centres 3 and 5 -> 2.5 and 4.5; the mean is 3.5.
    pooler = MultiScaleRoIAlign(output_size=2, spatial_scales=(1.0,), sampling_ratio=2, aligned=True)
    pooled = pooler([_column_index_map()], [torch.tensor([[2.0, 1.0, 6.0, 5.0]])])
    expected = torch.tensor([[2.5, 4.5], [2.5, 4.5]])
    torch.testing.assert_close(pooled[0, 0, 0], expected)
    assert float(pooled.mean()) == pytest.approx(3.5)


def test_roi_align_spatial_scale_maps_boxes_onto_each_level():
    # Level 0 at scale 1 and level 1 at scale 0.5 (half resolution): the box [4, 2, 12, 10] lands at x in [2, 6] on
    # the coarse level and [4, 12] on the fine one, so their means are 3.5 and 7.5.
    pooler = MultiScaleRoIAlign(output_size=4, spatial_scales=(1.0, 0.5))
    features = [_column_index_map(height=16, width=16), _column_index_map(height=8, width=8)]
    pooled = pooler(features, [torch.tensor([[4.0, 2.0, 12.0, 10.0]])])
    assert pooled.shape == (1, 2, 1, 4, 4)
    assert float(pooled[0, 0].mean()) == pytest.approx(7.5)
    assert float(pooled[0, 1].mean()) == pytest.approx(3.5)


def test_roi_align_keeps_boxes_with_their_images_in_order():
    features = [torch.stack([torch.full((2, 6, 6), 1.0), torch.full((2, 6, 6), 2.0)])]
    boxes = [torch.tensor([[0.0, 0.0, 3.0, 3.0]]), torch.tensor([[1.0, 1.0, 4.0, 4.0], [0.0, 0.0, 6.0, 6.0]])]
    pooled = MultiScaleRoIAlign(output_size=2)(features, boxes)
    assert pooled.shape == (3, 1, 2, 2, 2)
    assert pooled.flatten(1).mean(dim=1).tolist() == [1.0, 2.0, 2.0]


def test_roi_align_accepts_inverted_boxes_like_the_groma_checkpoint():
    # The released Groma encoder reads cxcywh as xyxy, so x2 < x1 is normal there; the kernel samples backwards,
    # which on f(y, x) = x mirrors the bins of the un-inverted box.
    pooler = MultiScaleRoIAlign(output_size=2)
    features = [_column_index_map()]
    forward_box = pooler(features, [torch.tensor([[2.0, 1.0, 6.0, 5.0]])])
    backward_box = pooler(features, [torch.tensor([[6.0, 1.0, 2.0, 5.0]])])
    torch.testing.assert_close(backward_box, forward_box.flip(-1))


def test_roi_align_zero_boxes_and_gradient():
    pooler = MultiScaleRoIAlign(output_size=2, spatial_scales=(1.0, 0.5))
    features = [torch.rand(2, 3, 8, 8, requires_grad=True), torch.rand(2, 3, 4, 4, requires_grad=True)]
    empty = pooler(features, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty.shape == (0, 2, 3, 2, 2)

    pooled = pooler(features, [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 4.0, 4.0]])])
    assert pooled.shape == (1, 2, 3, 2, 2)
    pooled.sum().backward()
    # Only image 1 holds a box, so only image 1 receives gradient.
    assert features[0].grad[0].abs().sum() == 0 and features[0].grad[1].abs().sum() > 0
    assert features[1].grad[1].abs().sum() > 0


def test_roi_align_follows_feature_dtype():
    pooler = MultiScaleRoIAlign(output_size=2)
    pooled = pooler([torch.ones(1, 1, 4, 4, dtype=torch.float64)], [torch.tensor([[0.0, 0.0, 2.0, 2.0]])])
    assert pooled.dtype == torch.float64


@pytest.mark.parametrize(
    ("features", "boxes", "error", "match"),
    [
        (torch.zeros(1, 1, 4, 4), [torch.zeros(1, 4)], TypeError, r"`features` must be a list"),
        ([torch.zeros(1, 1, 4, 4)] * 2, [torch.zeros(1, 4)], ValueError, r"`features` has 2 levels.*`spatial_scales`"),
        ([torch.zeros(1, 4, 4)], [torch.zeros(1, 4)], ValueError, r"`features\[0\]` must be a \(B, C, H, W\) tensor"),
        (
            [torch.zeros(1, 1, 4, 4, dtype=torch.long)],
            [torch.zeros(1, 4)],
            TypeError,
            r"`features\[0\]` must be float",
        ),
        ([torch.zeros(1, 1, 4, 4)], torch.zeros(1, 1, 4), TypeError, r"`boxes` must be a list with one \(n_i, 4\)"),
        ([torch.zeros(1, 1, 4, 4)], [torch.zeros(1, 4)] * 2, ValueError, r"`boxes` has 2 entries.*batch size 1"),
        ([torch.zeros(1, 1, 4, 4)], [torch.zeros(1, 5)], ValueError, r"`boxes\[0\]` must have shape \(n, 4\)"),
        ([torch.zeros(1, 1, 4, 4)], [torch.zeros(4)], ValueError, r"`boxes\[0\]` must have shape \(n, 4\)"),
        (
            [torch.zeros(1, 1, 4, 4)],
            [torch.zeros(1, 4, dtype=torch.long)],
            TypeError,
            r"`boxes\[0\]` must be floating",
        ),
        ([torch.zeros(1, 1, 4, 4)], [torch.tensor([[0.0, float("nan"), 1, 1]])], ValueError, r"`boxes\[0\]`.*NaN"),
        ([torch.zeros(1, 1, 4, 4)], [[0.0, 0.0, 1.0, 1.0]], TypeError, r"`boxes\[0\]` must be a tensor"),
    ],
)
def test_roi_align_rejects_bad_input(features, boxes, error, match):
    with pytest.raises(error, match=match):
        MultiScaleRoIAlign(output_size=2)(features, boxes)


def test_roi_align_rejects_levels_with_different_batch_or_channels():
    pooler = MultiScaleRoIAlign(spatial_scales=(1.0, 0.5))
    with pytest.raises(ValueError, match=r"`features\[1\]` has batch and channels \(1, 3\)"):
        pooler([torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 4, 4)], [torch.zeros(1, 4)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output_size": 0}, r"`output_size` must be an integer >= 1"),
        ({"spatial_scales": ()}, r"`spatial_scales` must hold at least one positive"),
        ({"spatial_scales": (1.0, -0.5)}, r"`spatial_scales` must hold"),
        ({"sampling_ratio": 1.5}, r"`sampling_ratio` must be an integer"),
    ],
)
def test_roi_align_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiScaleRoIAlign(**kwargs)


# ---------------------------------------------------------------------------------------------------- position MLP


def test_box_position_embedding_groma_layout_and_keys():
    embedding = BoxPositionEmbedding(in_features=4, hidden_size=8, out_features=6)
    assert [type(layer) for layer in embedding.layers] == [
        nn.Linear,
        nn.ReLU,
        nn.LayerNorm,
        nn.Linear,
        nn.ReLU,
        nn.LayerNorm,
    ]
    # Groma checkpoint keys are region_encoder.roi_align.pos_embedd.{0,2,3,5}.*
    assert sorted({key.split(".")[1] for key in embedding.state_dict()}) == ["0", "2", "3", "5"]


def test_box_position_embedding_regionblip_pafe_layout():
    image_pafe = BoxPositionEmbedding(4, 128, 768, activation="gelu", layer_norm=False, final_activation=False)
    assert [type(layer) for layer in image_pafe.layers] == [nn.Linear, nn.GELU, nn.Linear]
    assert image_pafe.layers[0].weight.shape == (128, 4) and image_pafe.layers[2].weight.shape == (768, 128)
    point_cloud_pafe = BoxPositionEmbedding(24, 128, 768, activation="gelu", layer_norm=False, final_activation=False)
    assert point_cloud_pafe(torch.rand(2, 24)).shape == (2, 768)


def test_box_position_embedding_matches_hand_composition():
    torch.manual_seed(0)
    embedding = BoxPositionEmbedding(4, 5, 3, activation="gelu", layer_norm=False, final_activation=False)
    boxes = torch.rand(2, 7, 4)
    first, second = embedding.layers[0], embedding.layers[2]
    expected = torch.nn.functional.gelu(boxes @ first.weight.T + first.bias) @ second.weight.T + second.bias
    output = embedding(boxes)
    assert output.shape == (2, 7, 3)
    torch.testing.assert_close(output, expected)


def test_box_position_embedding_groma_output_is_normalized_and_differentiable():
    embedding = BoxPositionEmbedding(4, 16, 32)
    boxes = torch.rand(5, 4, requires_grad=True)
    output = embedding(boxes)
    # A default LayerNorm ends the Groma variant: zero mean, unit variance per box.
    torch.testing.assert_close(output.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)
    output[:, 0].sum().backward()
    assert boxes.grad.abs().sum() > 0
    assert all(parameter.grad is not None for parameter in embedding.parameters())


def test_box_position_embedding_casts_input_to_weight_dtype():
    embedding = BoxPositionEmbedding(4, 8, 8).to(torch.float64)
    assert embedding(torch.rand(3, 4)).dtype == torch.float64


@pytest.mark.parametrize(
    ("boxes", "error", "match"),
    [
        (torch.rand(3, 5), ValueError, r"`boxes` must have 4 coordinates in the last dim.*\(3, 5\)"),
        (torch.tensor(1.0), ValueError, r"`boxes` must have 4 coordinates"),
        (torch.ones(3, 4, dtype=torch.long), TypeError, r"`boxes` must be a floating point tensor"),
        ([[0.0, 0.0, 1.0, 1.0]], TypeError, r"`boxes` must be a torch.Tensor"),
    ],
)
def test_box_position_embedding_rejects_bad_input(boxes, error, match):
    with pytest.raises(error, match=match):
        BoxPositionEmbedding(4, 8, 8)(boxes)


def test_box_position_embedding_rejects_bad_config():
    with pytest.raises(ValueError, match=r"`activation` must be one of"):
        BoxPositionEmbedding(activation="swish2")
    with pytest.raises(ValueError, match=r"`hidden_size` must be an integer >= 1"):
        BoxPositionEmbedding(hidden_size=0)


# ---------------------------------------------------------------------------------------------------- token merge


def test_merge_order_on_arange_grid():
    # 4 x 4 grid, token value = row-major patch index, C = 1.
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    column_major = merge_tokens_2d(tokens, order="column_major")
    row_major = merge_tokens_2d(tokens, order="row_major")
    assert column_major.shape == row_major.shape == (1, 4, 4)
    # merged token 0 covers patches 0, 1 (row 0) and 4, 5 (row 1); merged token 1 covers 2, 3, 6, 7.
    assert column_major[0].tolist() == [[0, 4, 1, 5], [2, 6, 3, 7], [8, 12, 9, 13], [10, 14, 11, 15]]
    assert row_major[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_merge_matches_groma_slicing_on_non_square_grid():
    grid = torch.randn(2, 4, 6, 3)
    groma = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1)
    expected = groma.flatten(1, 2)
    torch.testing.assert_close(merge_tokens_2d(grid.flatten(1, 2), grid_size=(4, 6)), expected, rtol=0, atol=0)
    torch.testing.assert_close(merge_tokens_2d(grid), expected, rtol=0, atol=0)
    torch.testing.assert_close(TokenMerge2d(grid_size=(4, 6))(grid.flatten(1, 2)), expected, rtol=0, atol=0)


def test_merge_factor_three_and_gradient():
    tokens = torch.randn(1, 36, 2, requires_grad=True)
    merged = merge_tokens_2d(tokens, factor=3, order="row_major")
    assert merged.shape == (1, 4, 18)
    # Row-major: the first merged token holds patches (0,0), (0,1), (0,2), (1,0) ... = indices 0, 1, 2, 6, ...
    torch.testing.assert_close(merged[0, 0, :8].reshape(4, 2), tokens[0, [0, 1, 2, 6]].detach())
    merged.sum().backward()
    torch.testing.assert_close(tokens.grad, torch.ones_like(tokens))


def test_token_merge_module_keeps_options():
    module = TokenMerge2d(factor=2, order="row_major")
    assert (module.factor, module.order, module.grid_size) == (2, "row_major", None)
    assert "row_major" in repr(module)
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    assert module(tokens)[0, 0].tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize(
    ("tokens", "kwargs", "error", "match"),
    [
        (torch.zeros(1, 15, 2), {}, ValueError, r"`tokens` has 15 tokens, which is not a square grid"),
        (torch.zeros(1, 12, 2), {"grid_size": (4, 4)}, ValueError, r"`grid_size` \(4, 4\) gives 16 tokens.*has 12"),
        (torch.zeros(1, 9, 2), {}, ValueError, r"must be divisible by `factor` = 2"),
        (torch.zeros(1, 2, 6, 2), {"factor": 4}, ValueError, r"must be divisible by `factor` = 4"),
        (torch.zeros(1, 16, 2), {"order": "zigzag"}, ValueError, r"`order` must be one of"),
        (torch.zeros(16, 2), {}, ValueError, r"`tokens` must have shape \(B, H\*W, C\) or \(B, H, W, C\)"),
        (torch.zeros(1, 4, 4, 2), {"grid_size": (2, 8)}, ValueError, r"`grid_size` \(2, 8\) does not match"),
        (torch.zeros(1, 16, 2), {"factor": 0}, ValueError, r"`factor` must be an integer >= 1"),
        ([[0.0]], {}, TypeError, r"`tokens` must be a torch.Tensor"),
    ],
)
def test_merge_rejects_bad_input(tokens, kwargs, error, match):
    with pytest.raises(error, match=match):
        merge_tokens_2d(tokens, **kwargs)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_multiscale_roi_align_equals_torchvision_roi_align_per_level(aligned: bool, sampling_ratio: int):
    """The vectorised pooler (one embedding_bag over all levels) reproduces torchvision's kernel, edge rules included."""
    from torchvision.ops import roi_align

    generator = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    features = [torch.randn(2, 5, 17, 13, generator=generator), torch.randn(2, 5, 9, 7, generator=generator)]
    features.append(torch.randn(2, 5, 4, 4, generator=generator))
    scales = (1.0, 0.5, 0.25)
    boxes = [torch.rand(6, 4, generator=generator) * 24 - 4, torch.rand(3, 4, generator=generator) * 30 - 3]
    boxes[0][0] = torch.tensor([0.0, 0.0, 16.0, 12.0])  # the whole map
    boxes[0][1] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # zero size
    boxes[1][0] = torch.tensor([9.0, 8.0, 2.0, 1.0])  # inverted
    pooler = MultiScaleRoIAlign(output_size=3, spatial_scales=scales, sampling_ratio=sampling_ratio, aligned=aligned)
    pooled = pooler(features, boxes)
    expected = torch.stack([roi_align(f, boxes, 3, s, sampling_ratio, aligned) for f, s in zip(features, scales)], 1)
    assert pooled.shape == expected.shape == (9, 3, 5, 3, 3)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_multiscale_roi_align_gradient_equals_torchvision():
    from torchvision.ops import roi_align

    features = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 5.0], [5.0, 6.0, 2.0, 1.0]])]
    weights = torch.randn(2, 1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    (MultiScaleRoIAlign(output_size=2, spatial_scales=(1.0,))([features], boxes) * weights).sum().backward()
    ours = features.grad.clone()
    features.grad = None
    (roi_align(features, boxes, 2, 1.0, 2, True).unsqueeze(1) * weights).sum().backward()
    torch.testing.assert_close(ours, features.grad, atol=1e-6, rtol=1e-5)
