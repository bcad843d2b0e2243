"""Tests of the class-agnostic Deformable-DETR region proposer (Groma section 3.1) and its config."""

import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

from hf_regionmm.modeling.configuration_detr_proposer import DetrProposerConfig
from hf_regionmm.modeling.detr_proposer import DetrProposer, DetrProposerOutput

INPUT_DIM = 16


def tiny_config(**overrides) -> DetrProposerConfig:
    sizes = dict(
        input_dim=INPUT_DIM,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        dropout=0.0,
    )
    sizes.update(overrides)
    return DetrProposerConfig(**sizes)


def tiny_model(**overrides) -> DetrProposer:
    torch.manual_seed(0)
    return DetrProposer(tiny_config(**overrides)).eval()


def randomize_box_heads(model: DetrProposer) -> None:
    # Box heads start at zero (boxes == references) with tiny hidden layers; give them O(1) deltas so the
    # refinement paths really differ.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for head in model.bbox_embed:
            for layer in head.layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 1.5 / layer.in_features**0.5)


def features(batch: int = 2, height: int = 6, width: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, INPUT_DIM, height, width, generator=torch.Generator().manual_seed(seed))


TARGETS = [
    {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.25, 0.3, 0.2, 0.3]])},
    {"boxes": torch.tensor([[0.6, 0.4, 0.5, 0.5]]), "class_labels": torch.tensor([17])},
]


# ---------------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_released_groma_proposer():
    config = DetrProposerConfig()
    assert (config.input_dim, config.d_model, config.num_feature_levels) == (1024, 256, 1)
    assert (config.encoder_layers, config.decoder_layers, config.num_queries) == (6, 6, 300)
    assert config.two_stage and config.with_box_refine and not config.update_reference_points
    assert config.content_queries == "query_embeddings"
    assert config.objectness_heads == ("coco", "sa1b") and config.objectness_weights == (0.4, 0.6)
    assert (config.class_cost, config.bbox_cost, config.giou_cost) == (2, 5, 2)
    assert config.hidden_size == 256 and config.model_type == "detr_proposer"
    assert config.base_config_key == "proposer_config"


def test_config_json_round_trip(tmp_path):
    config = tiny_config(objectness_heads=["objectness"], objectness_weights=None, num_feature_levels=3)
    config.save_pretrained(tmp_path)
    reloaded = DetrProposerConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.objectness_heads == ("objectness",) and reloaded.fused_objectness_weights == (1.0,)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"num_feature_levels": 5}, "num_feature_levels"),
        ({"d_model": 30}, "d_model"),
        ({"encoder_attention_heads": 3, "d_model": 32}, "encoder_attention_heads"),
        ({"two_stage": True, "with_box_refine": False}, "with_box_refine"),
        ({"content_queries": "learned"}, "content_queries"),
        ({"objectness_weights": (1.0,)}, "objectness_weights"),
        ({"objectness_heads": ("a.b",), "objectness_weights": None}, "objectness_heads"),
        ({"objectness_heads": ("x", "x")}, "objectness_heads"),
        ({"dropout": 1.5}, "dropout"),
        ({"activation_function": "swishy"}, "activation_function"),
        ({"num_queries": 0}, "num_queries"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}"):
        DetrProposerConfig(**overrides)


def test_config_rejects_wrong_types():
    with pytest.raises(StrictDataclassFieldValidationError, match="d_model"):
        DetrProposerConfig(d_model="256")


# ---------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("num_feature_levels", [1, 2])
def test_forward_shapes_and_ranges(num_feature_levels):
    model = tiny_model(num_feature_levels=num_feature_levels)
    with torch.no_grad():
        output = model(features(batch=2, height=6, width=5))
    assert isinstance(output, DetrProposerOutput) and output.loss is None
    assert output.scores.shape == (2, 10)
    assert output.logits.shape == (2, 10, 2)
    assert output.pred_boxes.shape == (2, 10, 4)
    assert ((output.pred_boxes >= 0) & (output.pred_boxes <= 1)).all()
    assert ((output.scores >= 0) & (output.scores <= 1)).all()
    expected_shapes = [[6, 5]] if num_feature_levels == 1 else [[6, 5], [3, 3]]
    assert output.spatial_shapes.tolist() == expected_shapes
    num_positions = sum(h * w for h, w in expected_shapes)
    assert output.encoder_last_hidden_state.shape == (2, num_positions, 32)
    assert output.decoder_last_hidden_state.shape == (2, 10, 32)
    assert len(output.aux_outputs) == 1 and output.aux_outputs[0]["pred_boxes"].shape == (2, 10, 4)
    assert output.enc_outputs["logits"].shape == (2, num_positions, 1)
    assert output.enc_outputs["pred_boxes"].shape == (2, num_positions, 4)
    # The decoder starts from the selected encoder proposals.
    selected = torch.gather(
        output.enc_outputs["pred_boxes"], 1, output.enc_outputs["topk_indices"].unsqueeze(-1).expand(-1, -1, 4)
    )
    torch.testing.assert_close(output.init_reference_points, selected)


def test_pyramid_scales_for_four_levels_and_one_map_per_level():
    model = tiny_model(num_feature_levels=4)
    with torch.no_grad():
        from_one_map = model(features(batch=1, height=5, width=7))
        one_per_level = model([features(batch=1, height=5, width=7, seed=level) for level in range(4)])
    # x4, x2, x1, /2 of a 5x7 map, finest first.
    assert from_one_map.spatial_shapes.tolist() == [[20, 28], [10, 14], [5, 7], [3, 4]]
    assert one_per_level.spatial_shapes.tolist() == from_one_map.spatial_shapes.tolist()
    assert not torch.allclose(one_per_level.pred_boxes, from_one_map.pred_boxes)


def test_fused_score_matches_the_released_formula():
    model = tiny_model()
    with torch.no_grad():
        output = model(features())
    coco, sa1b = output.logits.unbind(-1)
    torch.testing.assert_close(output.scores, coco.sigmoid() ** 0.4 * sa1b.sigmoid() ** 0.6)
    aux = output.aux_outputs[0]
    torch.testing.assert_close(
        aux["scores"], aux["logits"][..., 0].sigmoid() ** 0.4 * aux["logits"][..., 1].sigmoid() ** 0.6
    )


def test_single_head_score_is_plain_sigmoid():
    model = tiny_model(objectness_heads=("objectness",), objectness_weights=None)
    with torch.no_grad():
        output = model(features())
    assert output.logits.shape == (2, 10, 1)
    torch.testing.assert_close(output.scores, output.logits[..., 0].sigmoid())


def test_fresh_init_follows_deformable_detr():
    model = tiny_model()
    with torch.no_grad():
        output = model(features())
    # Zero-initialised box heads: the final boxes are exactly the selected proposals.
    torch.testing.assert_close(output.pred_boxes, output.init_reference_points)
    # Focal prior: every objectness logit starts near log(0.01 / 0.99) (weights are small).
    prior = math.log(0.01 / 0.99)
    for heads in model.objectness_heads.values():
        for head in heads:
            assert head.bias.item() == pytest.approx(prior)
    # Deformable-attention sampling grid: head h points along angle 2*pi*h/heads, point k at distance k + 1.
    offsets = model.encoder.layers[0].self_attn.sampling_offsets.bias.view(2, 1, 4, 2)
    torch.testing.assert_close(offsets[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(offsets[1, 0, :, 0], -torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_all_valid_pixel_mask_changes_nothing_and_padding_does():
    model = tiny_model()
    feature_map = features()
    mask = torch.ones(2, 6, 6, dtype=torch.long)
    with torch.no_grad():
        plain = model(feature_map)
        masked = model(feature_map, pixel_mask=mask)
        mask[:, :, 3:] = 0
        padded = model(feature_map, pixel_mask=mask)
    torch.testing.assert_close(plain.pred_boxes, masked.pred_boxes)
    assert not torch.allclose(plain.encoder_last_hidden_state, padded.encoder_last_hidden_state)
    # Proposals on padded positions are invalid: saturated boxes.
    invalid = ~mask.bool().flatten(1)
    assert (padded.enc_outputs["pred_boxes"][invalid] == 1).all()


# -------------------------------------------------------------------------------------- reference points


def capture_decoder_references(model: DetrProposer) -> tuple[list, list, list]:
    references, hidden_states, handles = [], [], []
    for layer in model.decoder.layers:
        handles.append(layer.register_forward_pre_hook(lambda module, args: references.append(args[2].clone())))
        handles.append(layer.register_forward_hook(lambda module, args, output: hidden_states.append(output)))
    return references, hidden_states, handles


def test_released_mode_keeps_reference_points_fixed_and_chains_two_deltas():
    model = tiny_model(update_reference_points=False, decoder_layers=3)
    randomize_box_heads(model)
    references, hidden_states, handles = capture_decoder_references(model)
    with torch.no_grad():
        output = model(features())
    for handle in handles:
        handle.remove()
    init_reference = output.init_reference_points
    # Every layer samples around the initial proposals (valid ratios are 1, one level).
    for layer_reference in references:
        torch.testing.assert_close(layer_reference[:, :, 0], init_reference)
    for layer in range(3):
        torch.testing.assert_close(output.sampling_reference_points[layer], init_reference)
    # Hand-built released chain: box_l = sigmoid(d_l + logit(sigmoid(d_{l-1} + logit(r)))).
    deltas = [model.bbox_embed[layer](hidden_states[layer]) for layer in range(3)]
    expected = [(deltas[0] + inverse_sigmoid(init_reference)).sigmoid()]
    for layer in (1, 2):
        previous = (deltas[layer - 1] + inverse_sigmoid(init_reference)).sigmoid()
        expected.append((deltas[layer] + inverse_sigmoid(previous)).sigmoid())
    torch.testing.assert_close(output.aux_outputs[0]["pred_boxes"], expected[0])
    torch.testing.assert_close(output.aux_outputs[1]["pred_boxes"], expected[1])
    torch.testing.assert_close(output.pred_boxes, expected[2])


def test_standard_mode_samples_around_the_previous_layer_boxes():
    released = tiny_model(update_reference_points=False, decoder_layers=3)
    randomize_box_heads(released)
    standard = tiny_model(update_reference_points=True, decoder_layers=3)
    standard.load_state_dict(released.state_dict())
    references, hidden_states, handles = capture_decoder_references(standard)
    with torch.no_grad():
        standard_output = standard(features())
        released_output = released(features())
    for handle in handles:
        handle.remove()
    layer_boxes = [aux["pred_boxes"] for aux in standard_output.aux_outputs] + [standard_output.pred_boxes]
    torch.testing.assert_close(references[0][:, :, 0], standard_output.init_reference_points)
    for layer in (1, 2):
        torch.testing.assert_close(references[layer][:, :, 0], layer_boxes[layer - 1])
        torch.testing.assert_close(standard_output.sampling_reference_points[layer], layer_boxes[layer - 1])
        # Standard iterative refinement: each layer's delta applies to the previous layer's boxes.
        delta = standard.bbox_embed[layer](hidden_states[layer])
        torch.testing.assert_close(layer_boxes[layer], (delta + inverse_sigmoid(layer_boxes[layer - 1])).sigmoid())
    assert (references[1] - references[0]).abs().max() > 1e-2
    # Same weights and same first layer, different later layers.
    torch.testing.assert_close(layer_boxes[0], released_output.aux_outputs[0]["pred_boxes"])
    assert (standard_output.pred_boxes - released_output.pred_boxes).abs().max() > 1e-2


def test_two_stage_pos_trans_and_single_stage_variants():
    split = tiny_model(content_queries="two_stage_pos_trans")
    assert not hasattr(split, "query_position_embeddings")
    single_stage = tiny_model(two_stage=False, with_box_refine=False)
    assert len(single_stage.bbox_embed) == 1 and single_stage.query_position_embeddings.weight.shape == (10, 64)
    with torch.no_grad():
        split_output = split(features())
        single_output = single_stage(features())
    assert split_output.pred_boxes.shape == single_output.pred_boxes.shape == (2, 10, 4)
    assert single_output.enc_outputs is None and single_output.init_reference_points.shape == (2, 10, 2)
    # Without two-stage the first box head starts from sigmoid(-2)-sized boxes around the learned centres.
    torch.testing.assert_close(single_output.pred_boxes[..., 2:], torch.full((2, 10, 2), torch.tensor(-2.0).sigmoid()))
    torch.testing.assert_close(single_output.pred_boxes[..., :2], single_output.init_reference_points)


@pytest.mark.parametrize("update_reference_points", [False, True])
def test_single_stage_with_box_refinement_trains(update_reference_points):
    model = tiny_model(two_stage=False, with_box_refine=True, update_reference_points=update_reference_points).train()
    output = model(features(), targets=TARGETS)
    output.loss.backward()
    assert torch.isfinite(output.loss) and "coco_loss_bbox_enc" not in output.loss_dict
    references = output.sampling_reference_points
    assert references[0].shape == (2, 10, 2)
    # Standard refinement turns the learned centres into boxes after the first layer; the released mode never moves.
    assert references[1].shape == ((2, 10, 4) if update_reference_points else (2, 10, 2))
    assert model.bbox_embed[1].layers[-1].weight.grad.any()


# ---------------------------------------------------------------------------------------------------- loss


def test_loss_terms_and_per_head_combination():
    model = tiny_model()
    feature_map = features()
    output = model(feature_map, targets=TARGETS)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    for head in ("coco", "sa1b"):
        for term in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_enc", "loss_giou_enc"):
            assert f"{head}_{term}" in output.loss_dict
    # Without "source" every image trains both heads: the loss is their mean.
    torch.testing.assert_close(output.loss, (output.loss_dict["coco_loss"] + output.loss_dict["sa1b_loss"]) / 2)
    # Box terms do not depend on the head; focal terms do.
    torch.testing.assert_close(output.loss_dict["coco_loss_bbox_enc"], output.loss_dict["sa1b_loss_bbox_enc"])

    # A batch from one data source trains only that head (the released training step).
    coco_only = model(feature_map, targets=[dict(target, source="coco") for target in TARGETS])
    assert not any(name.startswith("sa1b") for name in coco_only.loss_dict)
    torch.testing.assert_close(coco_only.loss, output.loss_dict["coco_loss"])

    # Weighted sum with the config coefficients (2, 5, 2) over final, auxiliary and encoder terms.
    terms = output.loss_dict
    expected = sum(
        weight * terms[f"coco_{name}{suffix}"]
        for name, weight in (("loss_ce", 2), ("loss_bbox", 5), ("loss_giou", 2))
        for suffix in ("", "_0", "_enc")
    )
    torch.testing.assert_close(terms["coco_loss"], expected)


def test_mixed_sources_weight_heads_by_image_count():
    model = tiny_model()
    feature_map = features()
    mixed = model(feature_map, targets=[dict(TARGETS[0], source="coco"), dict(TARGETS[1], source="sa1b")])
    torch.testing.assert_close(mixed.loss, 0.5 * mixed.loss_dict["coco_loss"] + 0.5 * mixed.loss_dict["sa1b_loss"])
    # The coco head only saw image 0: its loss equals a batch of image 0 alone.
    alone = model(feature_map[:1], targets=[dict(TARGETS[0], source="coco")])
    torch.testing.assert_close(mixed.loss_dict["coco_loss"], alone.loss)


def test_loss_decreases_when_overfitting_one_target():
    torch.manual_seed(0)
    model = DetrProposer(tiny_config(objectness_heads=("objectness",), objectness_weights=None)).train()
    feature_map, targets = features(batch=1), [TARGETS[0]]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(feature_map, targets=targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = DetrProposer(tiny_config(num_feature_levels=2)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # One step first: the zero-initialised last box layers block gradients to the layers below them at step 0.
    for _ in range(2):
        optimizer.zero_grad()
        model(features(), targets=TARGETS).loss.backward()
        optimizer.step()
    without_gradient = [
        name for name, parameter in model.named_parameters() if parameter.grad is None or not parameter.grad.any()
    ]
    assert without_gradient == []


def test_activation_checkpointing_recomputes_layers_with_the_same_loss_and_gradients():
    model = tiny_model().train()
    mlp_calls = []
    model.encoder.layers[0].mlp.register_forward_pre_hook(lambda module, args: mlp_calls.append(1))
    plain_loss = model(features(), targets=TARGETS).loss
    plain_loss.backward()
    plain_grad = model.encoder.layers[0].mlp.fc1.weight.grad.clone()
    assert len(mlp_calls) == 1
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed_loss = model(features(), targets=TARGETS).loss
    checkpointed_loss.backward()
    assert len(mlp_calls) == 3  # forward + recompute during backward
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    torch.testing.assert_close(model.encoder.layers[0].mlp.fc1.weight.grad, plain_grad)


# ---------------------------------------------------------------------------------------------------- hub


def test_save_pretrained_round_trip_is_exact(tmp_path):
    model = tiny_model(num_feature_levels=2)
    randomize_box_heads(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = DetrProposer.from_pretrained(tmp_path)
    assert {**reloaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()
    with torch.no_grad():
        expected, actual = model(features()), reloaded(features())
    assert torch.equal(expected.pred_boxes, actual.pred_boxes)
    assert torch.equal(expected.scores, actual.scores)
    assert torch.equal(expected.logits, actual.logits)


def test_checkpoint_names_follow_the_released_layout():
    names = set(tiny_model().state_dict())
    for name in (
        "input_proj.0.0.weight",
        "input_proj.0.1.weight",
        "level_embed",
        "encoder.layers.0.self_attn.sampling_offsets.weight",
        "decoder.layers.1.encoder_attn.value_proj.weight",
        "query_position_embeddings.weight",
        "enc_output.weight",
        "enc_output_norm.weight",
        "pos_trans.weight",
        "pos_trans_norm.weight",
        "class_embed_enc.weight",
        "objectness_heads.coco.1.weight",
        "objectness_heads.sa1b.0.bias",
        "bbox_embed.2.layers.2.weight",
    ):
        assert name in names
    assert not any(name.startswith("decoder.bbox_embed") for name in names)


def test_released_size_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = DetrProposer(DetrProposerConfig())
    count = sum(parameter.numel() for parameter in model.parameters())
    d, ffn, in_dim, queries, levels, points, heads = 256, 1024, 1024, 300, 1, 4, 8
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out  # noqa: E731
    deformable = linear(d, heads * levels * points * 2) + linear(d, heads * levels * points) + 2 * linear(d, d)
    mlp = linear(d, ffn) + linear(ffn, d)
    encoder_layer = deformable + mlp + 2 * 2 * d
    decoder_layer = 4 * linear(d, d) + deformable + mlp + 3 * 2 * d
    box_head = 2 * linear(d, d) + linear(d, 4)
    expected = (
        linear(in_dim, d)
        + 2 * d  # input_proj.0
        + levels * d  # level_embed
        + 6 * encoder_layer
        + 6 * decoder_layer
        + queries * d  # query_position_embeddings (content queries)
        + linear(d, d)
        + 2 * d  # enc_output + norm
        + linear(2 * d, 2 * d)
        + 2 * 2 * d  # pos_trans + norm
        + linear(d, 1)  # class_embed_enc
        + 2 * 6 * linear(d, 1)  # coco + sa1b objectness heads per decoder layer
        + 7 * box_head  # 6 decoder layers + encoder proposals
    )
    assert count == expected == 11_377_833


# ---------------------------------------------------------------------------------------------------- bad input


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="has 8 channels but `config.input_dim` is 16"):
        tiny_model()(torch.randn(2, 8, 6, 6))


def test_token_sequence_instead_of_map_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(batch, input_dim=16, height, width\).*reshape"):
        tiny_model()(torch.randn(2, 36, INPUT_DIM))


def test_wrong_number_of_maps_is_a_clear_error():
    with pytest.raises(ValueError, match="3 maps but the proposer has 2 feature levels"):
        tiny_model(num_feature_levels=2)([features()] * 3)


def test_too_few_positions_for_the_queries_is_a_clear_error():
    with pytest.raises(ValueError, match="only 9 positions.*`config.num_queries` is 10"):
        tiny_model()(features(height=3, width=3))


@pytest.mark.parametrize(
    "targets, message",
    [
        ([{"boxes": torch.tensor([[120.0, 80.0, 40.0, 30.0]])}] * 2, r"normalized cxcywh in \[0, 1\].*box 0"),
        ([{"boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}] * 2, "cxcywh"),
        ([{"boxes": torch.tensor([0.5, 0.5, 0.1, 0.2])}] * 2, r"shape \(n, 4\)"),
        ([{"labels": torch.tensor([0])}] * 2, "must be a dict with 'boxes'"),
        ([{"boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]])}], "1 entries but `features` has batch size 2"),
        ([{"boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]]), "source": "lvis"}] * 2, "must name an objectness head"),
        (
            [{"boxes": torch.tensor([[0.5, 0.5, 0.1, 0.2]]), "class_labels": torch.tensor([1, 2])}] * 2,
            "class_labels",
        ),
    ],
)
def test_bad_targets_are_clear_errors(targets, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(features(), targets=targets)


def test_bad_pixel_mask_is_a_clear_error():
    with pytest.raises(ValueError, match="`pixel_mask` must be a tensor"):
        tiny_model()(features(), pixel_mask=torch.ones(6, 6))
