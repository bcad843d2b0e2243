"""TAP-v2 modeling: config presets, window attention, prompt encoding, routing, concept KL, captions, trainer."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskGeneration, set_seed

from hf_regionmm.modeling.configuration_tap import TapConfig
from hf_regionmm.modeling.modeling_tap import (
    TapModel,
    TapPromptEncoder,
    TapVisionEncoder,
    TapVisionLayer,
    interleaved_rotary,
    relative_position_index,
    route_masks,
)
from hf_regionmm.registry import get_system
from hf_regionmm.systems.tap import example_inputs, tiny_tap_config, tiny_tap_processor
from hf_regionmm.trainers.tap import TAP_STAGE_LOSS_WEIGHTS, sample_second_stage_prompts
from hf_regionmm.trainers.tiny_training import build_tiny_trainer


@pytest.fixture(scope="module")
def tiny():
    set_seed(0)
    config = tiny_tap_config()
    model = TapModel(config).eval()
    processor = tiny_tap_processor()
    return config, model, processor


# ---- config and parameter counts ------------------------------------------------------------------------------


def _expected_parameter_count(c: TapConfig) -> dict[str, int]:
    """Parameter counts from the architecture description alone (independent of the module code)."""
    hidden, grid, window = c.vision_hidden_size, c.vision_grid_size, c.vision_window_size
    mlp = int(hidden * c.vision_mlp_ratio)
    layer = 4 * hidden + (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden)
    layer += c.vision_num_attention_heads * (2 * window - 1) ** 2 + (hidden * mlp + mlp) + (mlp * hidden + hidden)
    half = hidden // 2
    cross = hidden * half + 2 * half + 9 * half * half + 2 * half + half * hidden + 2 * hidden
    e = c.embed_dim
    vision = 3 * c.patch_size**2 * hidden + hidden + grid * grid * hidden + c.vision_num_hidden_layers * layer
    vision += c.vision_num_cross_blocks * cross + 2 * hidden + (hidden * e + 2 * e) + (9 * e * e + 2 * e)

    prompt = 5 * e

    inner = e // c.decoder_attention_downsample_rate
    self_attention = 4 * (e * e + e)
    cross_attention = 3 * (e * inner + inner) + inner * e + e
    two_way_layer = (
        self_attention + 2 * cross_attention + 4 * 2 * e + (e * c.decoder_mlp_dim * 2 + c.decoder_mlp_dim + e)
    )
    hyper = 2 * (e * e + e) + e * (e // 8) + e // 8
    h = c.iou_head_hidden_dim
    iou_head = (e * h + h) + (c.iou_head_depth - 2) * (h * h + h) + (h * c.num_mask_outputs + c.num_mask_outputs)
    upscale = e * (e // 4) * 4 + e // 4 + 2 * (e // 4) + (e // 4) * (e // 8) * 4 + e // 8
    decoder = c.decoder_num_hidden_layers * two_way_layer + cross_attention + 2 * e
    decoder += (2 * c.num_mask_outputs + 1) * e + upscale + c.num_mask_outputs * hyper + iou_head

    hc, d = c.concept_hidden_size, c.concept_embed_dim
    concept = (e * hc + hc) + (hc * hc + hc) + (hc * d + d)

    t, v = c.text_hidden_size, c.text_vocab_size
    text_mlp = int(t * c.text_mlp_ratio)
    text_layer = 4 * t + (3 * t * t + 3 * t) + (t * t + t) + (t * text_mlp + text_mlp) + (text_mlp * t + t)
    text = e * t + v * t + c.text_num_hidden_layers * text_layer + 2 * t + t * v
    return {
        "vision_encoder": vision,
        "prompt_encoder": prompt,
        "image_decoder": decoder,
        "concept_head": concept,
        "text_decoder": text,
    }


@pytest.mark.parametrize("preset", ["tap-vit-b", "tap-vit-l", "tap-vit-h", "tap-tiny"])
def test_preset_parameter_counts_match_the_architecture(preset: str):
    config = TapConfig.from_preset(preset)
    with torch.device("meta"):
        model = TapModel(config)
    expected = _expected_parameter_count(config)
    actual = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in expected}
    assert actual == expected
    if preset != "tap-tiny":
        assert config.image_size == 1024 and config.vision_grid_size == 64 and config.mask_size == 256
        # The paper's "Small-38M" text decoder: the 12 transformer layers of width 512.
        layers = sum(p.numel() for p in model.text_decoder.layers.parameters())
        assert 37e6 < layers < 39e6
    if preset == "tap-vit-b":
        assert 85e6 < actual["vision_encoder"] < 100e6  # "approximately 0.1 B"
    if preset == "tap-vit-l":
        assert 300e6 < actual["vision_encoder"] < 330e6  # "approximately 0.3 B"


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="vision_window_size"):
        TapConfig.from_preset("tap-tiny", vision_window_size=3)
    with pytest.raises(ValueError, match="vision_num_cross_blocks"):
        TapConfig.from_preset("tap-tiny", vision_num_cross_blocks=3)
    with pytest.raises(ValueError, match="Unknown TAP preset"):
        TapConfig.from_preset("tap-vit-g")
    assert TapConfig.from_preset("tap-vit-b").vision_cross_block_indices == (2, 5, 8, 11)


# ---- image encoder ---------------------------------------------------------------------------------------------


def test_relative_position_index_by_hand():
    index = relative_position_index(2)
    # Tokens (0,0), (0,1), (1,0), (1,1); entry = (dy + 1) * 3 + (dx + 1).
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(index, expected)


def test_window_attention_stays_inside_its_window(tiny):
    config, model, _ = tiny
    layer: TapVisionLayer = model.vision_encoder.layers[0]
    grid, window = config.vision_grid_size, config.vision_window_size
    hidden = torch.randn(2, grid, grid, config.vision_hidden_size)
    with torch.no_grad():
        before = layer(hidden)
        changed = hidden.clone()
        changed[:, 0, 0] += 3.0 * torch.randn(config.vision_hidden_size)  # one token of the top-left window
        after = layer(changed)
    assert before.shape == hidden.shape
    moved = (after - before).abs().amax(dim=(0, 3)) > 1e-6
    expected = torch.zeros(grid, grid, dtype=torch.bool)
    expected[:window, :window] = True
    assert torch.equal(moved, expected)


def test_cross_window_blocks_spread_information_across_windows(tiny):
    config, _, _ = tiny
    set_seed(1)
    encoder = TapVisionEncoder(config).eval()
    with torch.no_grad():
        for block in encoder.cross_blocks:
            block.norm3.weight.fill_(1.0)  # undo the identity init so the conv path is active
        pixels = torch.randn(1, 3, config.image_size, config.image_size)
        changed = pixels.clone()
        changed[..., : config.patch_size, : config.patch_size] += 3.0  # first patch only
        delta = (encoder(changed) - encoder(pixels)).abs().amax(dim=1)[0]
    assert encoder(pixels).shape == (1, config.embed_dim, config.vision_grid_size, config.vision_grid_size)
    window = config.vision_window_size
    assert delta[window:, window:].max() > 1e-5  # the bottom-right window sees the top-left patch


# ---- prompt encoder --------------------------------------------------------------------------------------------


def test_prompt_encoding_hand_case():
    config = TapConfig.from_preset("tap-tiny", embed_dim=4, decoder_num_attention_heads=1)
    encoder = TapPromptEncoder(config)
    with torch.no_grad():
        encoder.coord_matrix.copy_(torch.eye(2))
        encoder.point_embed.weight.copy_(torch.arange(20, dtype=torch.float32).reshape(5, 4))
    # (x, y) = (31.5, 15.5) in a 64-pixel frame: c = (0.5, 0.25); r = (4 pi c - 2 pi) @ I = (0, -pi).
    points = torch.tensor([[[[31.5, 15.5], [31.5, 15.5]]]])
    labels = torch.tensor([[[1, 4]]])
    embedded = encoder(points, labels)
    positive = torch.tensor([0.0, math.sin(-3.1415926), 1.0, math.cos(-3.1415926)]) + torch.tensor([4.0, 5, 6, 7])
    torch.testing.assert_close(embedded[0, 0, 0], positive, atol=1e-6, rtol=0)
    torch.testing.assert_close(embedded[0, 0, 1], torch.tensor([16.0, 17, 18, 19]))  # padding: label embedding only
    dense = encoder.dense_positional_embeddings(2)  # cell centres (0.25, 0.75)
    r = 4 * 3.1415926 * 0.25 - 2 * 3.1415926
    torch.testing.assert_close(dense[:, 0, 0], torch.tensor([math.sin(r), math.sin(r), math.cos(r), math.cos(r)]))


# ---- routing ---------------------------------------------------------------------------------------------------


def test_decoder_tokens_and_prompt_labels_start_at_unit_scale():
    # Regression: transformers' default std 0.02 made the 9 decoder output tokens ~50x smaller than the unit-scale
    # Fourier prompt features; SAM / TAP initialize these embeddings N(0, 1), and the std must survive post_init.
    set_seed(0)
    model = TapModel(tiny_tap_config())
    decoder = model.image_decoder
    for embedding in (
        decoder.semantic_tokens,
        decoder.iou_token,
        decoder.mask_tokens,
        model.prompt_encoder.point_embed,
    ):
        weight = embedding.weight.detach()
        assert 0.6 < float(weight.std()) < 1.6 and float(weight.abs().max()) > 1.0
    # Ordinary embeddings keep the config's initializer_range.
    assert float(model.text_decoder.embed_tokens.weight.detach().std()) < 0.05


def test_routing_rule_by_hand():
    iou = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.1, 0.2, 0.3, 0.8], [0.9, 0.1, 0.5, 0.3]])
    is_box = torch.tensor([False, False, True])
    assert route_masks(iou, is_box).tolist() == [2, 3, 0]


def test_model_routes_boxes_to_output_zero_and_points_by_iou(tiny):
    config, model, processor = tiny
    inputs = example_inputs(processor, config)
    with torch.no_grad():
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
        )
        single = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            multimask_output=False,
        )
    is_box = (inputs["input_labels"] == 2).any(-1)
    assert is_box.tolist() == [[False, False, True], [False, True, False]]
    expected = torch.where(is_box, 0, outputs.iou_scores[..., 1:].argmax(-1) + 1)
    assert torch.equal(outputs.mask_index, expected)
    assert outputs.pred_masks.shape == (2, 3, 4, config.mask_size, config.mask_size)
    chosen = outputs.pred_masks[torch.arange(2)[:, None], torch.arange(3)[None], expected]
    torch.testing.assert_close(single.pred_masks[:, :, 0], chosen)
    torch.testing.assert_close(
        outputs.selected_semantic_tokens,
        outputs.semantic_tokens[torch.arange(2)[:, None], torch.arange(3)[None], expected],
    )


def test_boxes_as_input_boxes_equal_box_corner_points(tiny):
    config, model, _ = tiny
    pixels = torch.randn(1, 3, config.image_size, config.image_size)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 30.0]]])
    with torch.no_grad():
        via_boxes = model(pixel_values=pixels, input_boxes=boxes)
        via_points = model(
            pixel_values=pixels, input_points=boxes.reshape(1, 1, 2, 2), input_labels=torch.tensor([[[2, 3]]])
        )
    torch.testing.assert_close(via_boxes.pred_masks, via_points.pred_masks)
    assert via_boxes.mask_index.tolist() == [[0]]


# ---- concept head and losses -----------------------------------------------------------------------------------


def test_concept_kl_matches_hand_computation(tiny):
    config, model, _ = tiny
    logits = torch.randn(1, 2, config.num_concepts)
    targets = torch.softmax(torch.randn(1, 2, config.num_concepts), dim=-1)
    prompt_mask = torch.tensor([[True, False]])
    loss = model._concept_loss(logits, targets, prompt_mask)
    predicted = torch.softmax(logits[0, 0], dim=-1)
    expected = (targets[0, 0] * (targets[0, 0].log() - predicted.log())).sum()
    torch.testing.assert_close(loss, expected)
    assert float(model._concept_loss(targets.log(), targets, prompt_mask)) == pytest.approx(0.0, abs=1e-6)


def test_concept_logits_are_scaled_cosines(tiny):
    config, model, _ = tiny
    tokens = torch.randn(3, config.embed_dim)
    with torch.no_grad():
        embeddings, logits = model.concept_head(tokens)
    bank = model.concept_head.concept_embeddings
    expected = (
        torch.nn.functional.cosine_similarity(embeddings[:, None], bank[None], dim=-1) * config.concept_logit_scale
    )
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
    assert logits.abs().max() <= config.concept_logit_scale + 1e-3


def test_total_loss_combines_terms_with_stage_weights(tiny):
    config, model, processor = tiny
    inputs = example_inputs(processor, config)
    with torch.no_grad():
        for stage, weights in TAP_STAGE_LOSS_WEIGHTS.items():
            outputs = model(**inputs, **weights)
            terms = outputs.loss_dict
            assert set(terms) == {"loss_concept", "loss_mask_focal", "loss_mask_dice", "loss_iou", "loss_caption"}
            segmentation = 20 * terms["loss_mask_focal"] + terms["loss_mask_dice"] + terms["loss_iou"]
            expected = (
                weights["concept_loss_weight"] * terms["loss_concept"]
                + weights["seg_loss_weight"] * segmentation
                + weights["caption_loss_weight"] * terms["loss_caption"]
            )
            torch.testing.assert_close(outputs.loss, expected, msg=stage)
        only_masks = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
            mask_labels=inputs["mask_labels"],
        )
    assert float(only_masks.loss_dict["loss_concept"]) == 0.0 and float(only_masks.loss_dict["loss_caption"]) == 0.0


def test_caption_loss_is_next_token_cross_entropy(tiny):
    config, model, processor = tiny
    inputs = example_inputs(processor, config)
    with torch.no_grad():
        outputs = model(**inputs)
    ids = inputs["caption_ids"]
    targets = ids[..., 1:].masked_fill(ids[..., 1:] == config.pad_token_id, -100)
    expected = torch.nn.functional.cross_entropy(
        outputs.caption_logits.reshape(-1, config.text_vocab_size), targets.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(outputs.loss_dict["loss_caption"], expected)


def test_concept_bank_swap_survives_save_and_load(tiny, tmp_path: Path):
    config, _, processor = tiny
    set_seed(0)
    model = TapModel(tiny_tap_config()).eval()
    bank = torch.randn(5, config.concept_embed_dim)
    model.set_concept_bank(bank, ["cat", "dog", "car", "tree", "sky"])
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(stored["concept_head.concept_embeddings"], torch.nn.functional.normalize(bank, dim=-1))
    reloaded = AutoModelForMaskGeneration.from_pretrained(tmp_path)
    assert type(reloaded) is TapModel and type(AutoModel.from_pretrained(tmp_path)) is TapModel
    assert reloaded.concept_names == ["cat", "dog", "car", "tree", "sky"]
    torch.testing.assert_close(reloaded.concept_head.concept_embeddings, model.concept_head.concept_embeddings)
    inputs = example_inputs(processor, config)
    with torch.no_grad():
        logits = reloaded(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
        ).concept_logits
    assert logits.shape == (2, 3, 5)
    with pytest.raises(ValueError, match="`names` has 2 entries"):
        model.set_concept_bank(bank, ["a", "b"])
    with pytest.raises(ValueError, match=r"`embeddings` must have shape \(num_concepts, 64\)"):
        model.set_concept_bank(torch.randn(5, 3))


# ---- text decoder ----------------------------------------------------------------------------------------------


def test_interleaved_rotary_rotates_channel_pairs():
    states = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
    rotated = interleaved_rotary(states, torch.tensor([2]), theta=100.0)
    # Pair 0 turns by 2 * 1 rad, pair 1 by 2 * 100^(-1/2) = 0.2 rad.
    expected = torch.tensor([math.cos(2.0), math.sin(2.0), math.cos(0.2), math.sin(0.2)])
    torch.testing.assert_close(rotated[0, 0, 0], expected)


def test_greedy_captions_with_and_without_cache_agree(tiny):
    config, model, _ = tiny
    set_seed(3)
    tokens = torch.randn(2, 3, config.embed_dim)
    with torch.no_grad():
        cached = model.generate_captions(tokens, max_new_tokens=10, use_cache=True)
        uncached = model.generate_captions(tokens, max_new_tokens=10, use_cache=False)
    assert cached.shape[:2] == (2, 3) and cached.shape[2] >= 3
    assert torch.equal(cached, uncached)
    # Greedy: up to EOS, each token is the argmax of a teacher-forced pass over [prefix, BOS, generated...].
    length = cached.shape[-1]
    flat_tokens, flat_ids = tokens.reshape(-1, config.embed_dim), cached.reshape(-1, length)
    with torch.no_grad():
        sequence = torch.cat([torch.full((6, 1), config.bos_token_id), flat_ids[:, :-1]], dim=1)
        logits, _ = model.text_decoder(sequence, flat_tokens)
    greedy = logits[:, 1:].argmax(-1)
    for row in range(6):
        ids = flat_ids[row].tolist()
        end = ids.index(config.eos_token_id) + 1 if config.eos_token_id in ids else length
        assert greedy[row, :end].tolist() == ids[:end]
        assert all(token == config.pad_token_id for token in ids[end:])


def test_captions_stop_at_eos_and_pad_after(tiny):
    config, model, _ = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        # Constant final hidden state (LayerNorm weight 0, bias 1) and a head that scores only EOS.
        model.text_decoder.norm.weight.zero_()
        model.text_decoder.norm.bias.fill_(1.0)
        model.text_decoder.lm_head.weight.zero_()
        model.text_decoder.lm_head.weight[config.eos_token_id] = 1.0
        ids = model.generate_captions(torch.randn(4, config.embed_dim), max_new_tokens=5)
        model.text_decoder.lm_head.weight[config.eos_token_id] = 0.0
        model.text_decoder.lm_head.weight[config.eos_token_id, 0] = -1.0  # now EOS is the one token never chosen
        longest = model.generate_captions(torch.randn(4, config.embed_dim), max_new_tokens=5)
    assert ids.shape == (4, 1) and (ids == config.eos_token_id).all()
    assert longest.shape == (4, 5) and not (longest == config.eos_token_id).any()
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate_captions(torch.randn(1, config.embed_dim), max_new_tokens=config.text_max_length)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_forward_rejects_unknown_arguments_and_bad_captions(tiny):
    config, model, processor = tiny
    inputs = example_inputs(processor, config)
    with pytest.raises(TypeError, match="unexpected arguments \\['labels'\\]"):
        model(**inputs, labels=inputs["caption_ids"])
    too_long = torch.ones(2, 3, config.text_max_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="`caption_ids` length"):
        model(**{**inputs, "caption_ids": too_long})
    with pytest.raises(ValueError, match="exactly one of"):
        model(input_points=inputs["input_points"])


# ---- training --------------------------------------------------------------------------------------------------


def test_second_stage_sampler_interactive_and_non_interactive():
    truth = torch.zeros(1, 1, 8, 8)
    truth[0, 0, 2:6, 2:6] = 1
    predicted = torch.full((1, 1, 8, 8), -1.0)
    predicted[0, 0, 4:8, 4:8] = 1.0  # overlaps the bottom-right quarter of the truth
    first_points, first_labels = torch.tensor([[[[10.0, 12.0], [0.0, 0.0]]]]), torch.tensor([[[1, 4]]])
    prompt_mask = torch.tensor([[True]])
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        points, labels = sample_second_stage_prompts(
            predicted, truth, first_points, first_labels, prompt_mask, 32, generator, non_interactive_probability=0.0
        )
        real = labels[0, 0] != 4
        assert points[0, 0, 0].tolist() == [10.0, 12.0] and labels[0, 0, 0] == 1  # first prompt kept
        new_points, new_labels = points[0, 0][real][1:], labels[0, 0][real][1:]
        assert 1 <= len(new_points) <= 8
        cells = ((new_points + 0.5) / 4 - 0.5).round().long()  # back to mask cells (stride 4)
        for (col, row), label in zip(cells.tolist(), new_labels.tolist()):
            in_truth, in_prediction = bool(truth[0, 0, row, col]), bool(predicted[0, 0, row, col] > 0)
            assert in_truth != in_prediction  # error region
            assert label == int(in_truth)  # missed -> positive, spurious -> negative
        generator = torch.Generator().manual_seed(seed)
        points, labels = sample_second_stage_prompts(
            predicted, truth, first_points, first_labels, prompt_mask, 32, generator, non_interactive_probability=1.0
        )
        real = labels[0, 0] != 4
        assert 1 <= int(real.sum()) <= 9 and (labels[0, 0][real] == 1).all()
        cells = ((points[0, 0][real] + 0.5) / 4 - 0.5).round().long()
        assert all(bool(truth[0, 0, row, col]) for col, row in cells.tolist())


def test_stage1_trainer_freezes_text_decoder_and_logs_every_term(tmp_path: Path):
    spec = get_system("tap")
    trainer = build_tiny_trainer(spec, tmp_path, max_steps=2, num_samples=4, stage="stage1")
    text_before = {n: p.detach().clone() for n, p in trainer.model.text_decoder.named_parameters()}
    encoder_before = trainer.model.image_decoder.iou_head.proj_out.weight.detach().clone()
    assert trainer.loss_weights["caption_loss_weight"] == 0.0
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"loss_concept", "loss_mask_focal", "loss_mask_dice", "loss_iou", "loss_caption"} <= set(entry)
        assert entry["loss_caption"] == 0.0  # stage 1 data carry no captions
    for name, parameter in trainer.model.text_decoder.named_parameters():
        assert not parameter.requires_grad and torch.equal(parameter, text_before[name]), name
    assert not torch.equal(trainer.model.image_decoder.iou_head.proj_out.weight, encoder_before)


def test_mask_generation_pipeline_runs_on_tap(tiny):
    from PIL import Image
    from transformers import pipeline

    _, model, processor = tiny
    generator = pipeline("mask-generation", model=model, image_processor=processor.image_processor, device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    result = generator(
        image, points_per_batch=16, points_per_crop=4, pred_iou_thresh=-10.0, stability_score_thresh=-10.0
    )
    assert result["masks"] and all(mask.shape == (60, 80) for mask in result["masks"])
    assert len(result["scores"]) == len(result["masks"])


# ---- TAP-v2-Chat -----------------------------------------------------------------------------------------------


def test_tap_chat_preset_projector_size_and_token_count():
    from hf_regionmm.modeling.configuration_tap import TapChatConfig
    from hf_regionmm.modeling.modeling_tap import TapChatForConditionalGeneration

    config = TapChatConfig.from_preset("tap-chat-l")
    with torch.device("meta"):
        model = TapChatForConditionalGeneration(config)
    vision, text = config.vision_config.vision_hidden_size, config.text_config.hidden_size
    half = vision // 2
    block = vision * half + 2 * half + 9 * half * half + 2 * half + half * vision + 2 * vision
    expected = 3 * block + (4 * vision * text + text) + (text * text + text)
    assert sum(p.numel() for p in model.model.multi_modal_projector.parameters()) == expected
    assert config.num_image_tokens == 1024  # 64 x 64 patches merged 2 x 2
    tokenizer_parts = _expected_parameter_count(config.vision_config)["vision_encoder"]
    neck = vision * 256 + 2 * 256 + 9 * 256 * 256 + 2 * 256
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == tokenizer_parts - neck


def test_tap_chat_projector_starts_as_merge_plus_mlp():
    from hf_regionmm.modeling.modeling_tap import TapChatProjector
    from hf_regionmm.systems.tap import tiny_tap_chat_config

    set_seed(0)
    config = tiny_tap_chat_config()
    model_projector = TapChatProjector(config).eval()
    for block in model_projector.blocks:
        torch.nn.init.zeros_(block.norm3.weight)  # the paper's zero-initialized last layer
    channels = config.vision_config.vision_hidden_size
    features = torch.arange(2 * 4 * 4 * channels, dtype=torch.float32).reshape(2, 4, 4, channels) / 100
    with torch.no_grad():
        output = model_projector(features)
    # Merged token (row 0, col 1) = patches (0, 2), (0, 3), (1, 2), (1, 3), concatenated.
    merged = torch.cat([features[:, 0, 2], features[:, 0, 3], features[:, 1, 2], features[:, 1, 3]], dim=-1)
    with torch.no_grad():
        expected = model_projector.linear_2(model_projector.activation(model_projector.linear_1(merged)))
    assert output.shape == (2, 4, config.text_config.hidden_size)
    torch.testing.assert_close(output[:, 1], expected)


def test_tap_chat_writes_visual_tokens_into_the_image_slots():
    spec = get_system("tap_chat")
    set_seed(0)
    config = spec.tiny_config()
    model = spec.main_model_class(config).eval()
    processor = spec.tiny_processor()
    inputs = spec.example_inputs(processor, config)
    with torch.no_grad():
        outputs = model.model(
            input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"]
        )
        visual = model.get_image_features(inputs["pixel_values"]).pooler_output
        embeddings = model.model.language_model.get_input_embeddings()(inputs["input_ids"])
        slots = inputs["input_ids"] == config.image_token_id
        embeddings[slots] = visual.reshape(-1, visual.shape[-1])
        manual = model.model.language_model(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"])
    assert int(slots.sum()) == 2 * config.num_image_tokens
    torch.testing.assert_close(outputs.last_hidden_state, manual.last_hidden_state)
    torch.testing.assert_close(outputs.image_hidden_states, visual)


def test_tap_chat_caption_stage_trains_only_the_last_vision_blocks(tmp_path: Path):
    spec = get_system("tap_chat")
    trainer = build_tiny_trainer(spec, tmp_path, max_steps=1, num_samples=2, stage="caption")
    config = trainer.model.config
    depth, k = config.vision_config.vision_num_hidden_layers, config.num_trainable_vision_blocks
    trainable_blocks = {
        int(name.split(".")[3])
        for name, p in trainer.model.named_parameters()
        if p.requires_grad and name.startswith("model.vision_tower.layers.")
    }
    assert trainable_blocks == set(range(depth - k, depth))
    assert not trainer.model.model.vision_tower.patch_embed.weight.requires_grad
    assert trainer.model.model.multi_modal_projector.linear_1.weight.requires_grad
    assert trainer.model.lm_head.weight.requires_grad
    frozen_before = trainer.model.model.vision_tower.layers[0].attn.qkv.weight.detach().clone()
    trainer.train()
    assert torch.equal(trainer.model.model.vision_tower.layers[0].attn.qkv.weight, frozen_before)


def test_eager_and_sdpa_attention_agree(tiny, tmp_path: Path):
    config, model, processor = tiny
    model.save_pretrained(tmp_path)
    eager = TapModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = TapModel.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert eager.image_decoder.transformer_config._attn_implementation == "eager"
    inputs = example_inputs(processor, config)
    with torch.no_grad():
        eager_outputs, sdpa_outputs = eager(**inputs), sdpa(**inputs)
        captions = [
            m.generate_captions(eager_outputs.selected_semantic_tokens, max_new_tokens=6) for m in (eager, sdpa)
        ]
    for key in ("pred_masks", "iou_scores", "concept_logits", "caption_logits", "loss"):
        torch.testing.assert_close(eager_outputs[key], sdpa_outputs[key], atol=1e-4, rtol=1e-4, msg=key)
    assert torch.equal(captions[0], captions[1])
