"""Groma model: config and presets, region slots, placeholders, generation, detection loss, released quirks.

Region selection is tested on hand-made proposals (the proposer is replaced by fixed boxes and scores), so expected
slots, masks and `<rK>` substitutions are computed by hand. Everything uses the tiny preset and runs in seconds.
"""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from hf_regionmm.modeling import configuration_groma
from hf_regionmm.modeling.box_ops import box_iou, box_xyxy_to_cxcywh
from hf_regionmm.modeling.configuration_groma import GromaConfig
from hf_regionmm.modeling.detr_proposer import DetrProposerOutput
from hf_regionmm.modeling.modeling_groma import GromaForConditionalGeneration, GromaRegionEncoder
from hf_regionmm.processing import processing_groma
from hf_regionmm.systems.groma import generation_inputs, tiny_groma_config, tiny_groma_processor

MAX_REGIONS = 8

# Hand-made proposals, normalized xyxy, for a batch of two images.
# Image 0: P1 overlaps P0 (IoU 0.88 > 0.6) and is suppressed, P3 is below the 0.15 threshold,
# so the slots are P0 (0.9), P2 (0.5), P4 (0.3). Image 1: nothing passes the threshold, the best box is kept.
PROPOSALS = [
    [[0.10, 0.10, 0.40, 0.40], [0.12, 0.10, 0.42, 0.40], [0.50, 0.50, 0.90, 0.90], [0.60, 0.10, 0.90, 0.30],
     [0.00, 0.60, 0.30, 1.00]],
    [[0.20, 0.20, 0.60, 0.60], [0.30, 0.30, 0.50, 0.90], [0.00, 0.00, 1.00, 1.00], [0.10, 0.70, 0.20, 0.80],
     [0.50, 0.00, 0.90, 0.40]],
]  # fmt: skip
SCORES = [[0.9, 0.8, 0.5, 0.1, 0.3], [0.05, 0.12, 0.02, 0.01, 0.03]]


def _model(seed: int = 0, **overrides) -> GromaForConditionalGeneration:
    torch.manual_seed(seed)
    return GromaForConditionalGeneration(tiny_groma_config(**overrides)).eval()


def _patch_proposals(model: GromaForConditionalGeneration, boxes=PROPOSALS, scores=SCORES) -> None:
    """Replace the proposer's output with fixed boxes / scores (the rest of the forward is unchanged)."""
    boxes_cxcywh = box_xyxy_to_cxcywh(torch.tensor(boxes))
    scores = torch.tensor(scores)

    def propose(vision_maps, detection_targets=None):
        batch_size = vision_maps[0].shape[0]
        return DetrProposerOutput(pred_boxes=boxes_cxcywh[:batch_size], scores=scores[:batch_size])

    model.model.propose_regions = propose


def _images(count: int = 2, size: int = 100) -> list[PIL.Image.Image]:
    rng = np.random.RandomState(0)
    images = []
    for _ in range(count):
        array = np.full((size, size, 3), 230, dtype=np.uint8)
        x1, y1 = rng.randint(0, size // 2, 2)
        array[y1 : y1 + size // 3, x1 : x1 + size // 3] = rng.randint(0, 255, 3)
        images.append(PIL.Image.fromarray(array))
    return images


class _Recorder:
    """Records the keyword arguments the language model receives (inputs_embeds, attention_mask, position_ids)."""

    def __init__(self, model: GromaForConditionalGeneration):
        self.calls: list[dict] = []
        model.model.language_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({key: value for key, value in kwargs.items() if isinstance(value, torch.Tensor)})


# ---- config ---------------------------------------------------------------------------------------------------


def test_special_tokens_of_config_and_processor_agree():
    for max_region_num in (1, MAX_REGIONS, 100):
        assert configuration_groma.groma_special_tokens(max_region_num) == processing_groma.groma_special_tokens(
            max_region_num
        )
    assert configuration_groma.GROMA_BASE_NEW_TOKENS == processing_groma.GROMA_BASE_NEW_TOKENS

    config, processor = tiny_groma_config(), tiny_groma_processor()
    text_vocab = config.text_config.vocab_size
    assert len(processor.tokenizer) == config.total_vocab_size == text_vocab + 14 + MAX_REGIONS
    assert processor.tokenizer.convert_tokens_to_ids(config.new_tokens) == list(
        range(text_vocab, text_vocab + config.num_new_tokens)
    )
    assert processor.image_token_id == config.image_token_id == text_vocab + 8
    assert config.region_token_id == text_vocab + 9 and config.ground_box_token_id == text_vocab + 11
    assert config.region_index_token_ids == processor.region_index_token_ids
    assert processor.num_image_tokens == config.num_image_tokens == 16


def test_presets_and_behaviour_bundles(tmp_path):
    released = GromaConfig.from_preset("groma-7b")
    assert released.num_new_tokens == 114 and released.total_vocab_size == 32114
    assert released.num_image_tokens == 256 and released.vision_config.image_size == 518
    assert released.region_box_format == "cxcywh_as_xyxy" and released.proposer_feature_source == "mean_last_4"
    assert released.proposer_config.num_feature_levels == 1
    # Released strides 14/8, 14/4, 14/2 on maps whose true strides are 3.5, 7, 14.
    assert released.region_spatial_scales == pytest.approx((8 / 14, 4 / 14, 2 / 14))
    assert released.region_feature_map_sizes == (128, 64, 32)
    assert GromaConfig.for_released_checkpoint().to_dict() == released.to_dict()

    paper = GromaConfig.from_preset("groma-7b", behaviour="paper")
    assert paper.region_box_format == "xyxy" and paper.region_feature_strides is None
    assert paper.region_spatial_scales == pytest.approx((128 / 448, 64 / 448, 32 / 448))
    assert paper.proposer_config.num_feature_levels == 4

    released.save_pretrained(tmp_path)
    reloaded = GromaConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == released.to_dict()
    assert reloaded.region_feature_strides == (1.75, 3.5, 7.0)

    with pytest.raises(ValueError, match="num_new_tokens"):
        GromaConfig(num_new_tokens=100)
    with pytest.raises(ValueError, match="region_box_format"):
        GromaConfig(region_box_format="cxcywh")
    with pytest.raises(ValueError, match="proposer_config.input_dim"):
        GromaConfig.from_preset("groma-tiny", proposer_config={"input_dim": 64})
    with pytest.raises(ValueError, match="Unknown Groma preset"):
        GromaConfig.from_preset("groma-13b")


def _linear(inputs: int, outputs: int, bias: bool = True) -> int:
    return inputs * outputs + (outputs if bias else 0)


def _conv(inputs: int, outputs: int, kernel: int, bias: bool = True) -> int:
    return inputs * outputs * kernel * kernel + (outputs if bias else 0)


def _norm(width: int) -> int:
    return 2 * width


# Shapes of the released modules (reference/original_repos.md §1a/§1b), counted without looking at our code.
DINOV2_L = (
    2 * 1024  # cls_token, mask_token
    + (37 * 37 + 1) * 1024  # position table at image_size 518
    + _conv(3, 1024, 14)
    + 24 * (2 * _norm(1024) + 4 * _linear(1024, 1024) + _linear(1024, 4096) + _linear(4096, 1024) + 2 * 1024)
    + _norm(1024)
)
_DEFORMABLE_ATTENTION = _linear(256, 8 * 1 * 4 * 2) + _linear(256, 8 * 1 * 4) + 2 * _linear(256, 256)
_ENCODER_LAYER = _DEFORMABLE_ATTENTION + _linear(256, 1024) + _linear(1024, 256) + 2 * _norm(256)
_DECODER_LAYER = (
    4 * _linear(256, 256) + _DEFORMABLE_ATTENTION + _linear(256, 1024) + _linear(1024, 256) + 3 * _norm(256)
)
DDETR = (
    _conv(1024, 256, 1) + _norm(256)  # input_proj.0
    + 256  # level_embed (1 level)
    + 6 * _ENCODER_LAYER + 6 * _DECODER_LAYER
    + 300 * 256  # query_position_embeddings (content queries)
    + _linear(256, 256) + _norm(256)  # enc_output(_norm)
    + _linear(512, 512) + _norm(512)  # pos_trans(_norm)
    + _linear(256, 1)  # class_embed_enc
    + 2 * 6 * _linear(256, 1)  # class_embed_coco / class_embed_sa1b
    + 7 * (2 * _linear(256, 256) + _linear(256, 4))  # bbox_embed
)  # fmt: skip
LLAMA_7B = 2 * 32000 * 4096 + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096  # incl. lm_head
IMG_TXT_BRIDGE = _linear(4 * 1024, 4096) + _linear(4096, 4096)
REGION_ENCODER = (
    3 * _conv(1026, 1024, 1)  # mlvl_fuse.input_conv
    + 5 * (_conv(1024, 1024, 3, bias=False) + _norm(1024))  # mlvl_fuse.fuse_convs.{conv,gn}
    + 3 * _conv(1024, 1024, 3)  # pconvs
    + _linear(4, 256) + _norm(256) + _linear(256, 1024) + _norm(1024)  # pos_embedd
    + _linear(1024 * 14 * 14, 1024)  # flatten_linear
    + _linear(1024, 4096)  # updims
)  # fmt: skip
NEW_TOKENS = 2 * 114 * 4096  # extra_lm_head + new_input_embs
GROMA_7B_PARAMETERS = DINOV2_L + DDETR + LLAMA_7B + IMG_TXT_BRIDGE + REGION_ENCODER + NEW_TOKENS


def test_groma_7b_on_meta_device_matches_released_parameter_count():
    config = GromaConfig.from_preset("groma-7b")
    with torch.device("meta"):
        model = GromaForConditionalGeneration(config)
    parameters = list(model.parameters())
    assert all(parameter.is_meta for parameter in parameters)
    assert sum(parameter.numel() for parameter in parameters) == GROMA_7B_PARAMETERS == 7_377_311_657
    assert model.extra_lm_head.weight.shape == (114, 4096) and model.lm_head.weight.shape == (32000, 4096)
    assert model.model.new_token_embeddings.weight.shape == (114, 4096)


# ---- forward --------------------------------------------------------------------------------------------------


def test_forward_with_labels_is_the_cross_entropy_over_the_extended_vocabulary():
    model, processor = _model(), tiny_groma_processor()
    config = model.config
    image = _images(1)[0]
    inputs = processor(
        images=[image, image],
        text=[processing_groma.rec_prompt("the red square"), processing_groma.region_caption_prompt()],
        boxes=[[], [[10.0, 20.0, 60.0, 70.0]]],
        ground_boxes=[[[5.0, 5.0, 40.0, 50.0]], []],
        answers=[processing_groma.rec_answer(), "a red square ."],
    )
    outputs = model(**inputs)
    batch_size, length = inputs["input_ids"].shape
    assert outputs.logits.shape == (batch_size, length, config.text_config.vocab_size + config.num_new_tokens)
    assert torch.isfinite(outputs.loss)
    labels = outputs.labels
    assert not bool((labels == config.ground_box_token_id).any())
    expected = nn.functional.cross_entropy(
        outputs.logits[:, :-1].reshape(-1, config.total_vocab_size).float(), labels[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(outputs.loss, expected)
    assert outputs.loss_dict["lm_loss"] == pytest.approx(outputs.loss.item())
    outputs.loss.backward()
    for module in (model.model.region_encoder, model.model.multi_modal_projector, model.extra_lm_head):
        assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in module.parameters())


def test_region_slots_are_filled_in_score_order_and_empty_slots_are_masked():
    model, processor = _model(), tiny_groma_processor()
    _patch_proposals(model)
    recorder = _Recorder(model)
    config = model.config
    inputs = processor(images=_images(2), text=[processing_groma.grounded_caption_prompt()] * 2)
    with torch.no_grad():
        outputs = model(**inputs)

    proposals = torch.tensor(PROPOSALS)
    assert outputs.region_mask.tolist() == [[True] * 3 + [False] * 5, [True] + [False] * 7]
    torch.testing.assert_close(outputs.region_boxes[0, :3], proposals[0, [0, 2, 4]])
    torch.testing.assert_close(outputs.region_boxes[1, :1], proposals[1, [1]])
    assert bool((outputs.region_boxes[~outputs.region_mask] == 0).all())
    torch.testing.assert_close(outputs.region_scores[0, :3], torch.tensor([0.9, 0.5, 0.3]))

    # Both tokens of every empty slot are hidden; nothing else changes.
    input_ids = inputs["input_ids"]
    expected_mask = inputs["attention_mask"].clone()
    for sample in range(2):
        slot_positions = (input_ids[sample] == config.region_token_id).nonzero().squeeze(1)
        assert slot_positions.numel() == MAX_REGIONS
        for slot, position in enumerate(slot_positions.tolist()):
            assert input_ids[sample, position - 1] == config.region_index_token_ids[slot]
            if not outputs.region_mask[sample, slot]:
                expected_mask[sample, [position - 1, position]] = 0
    torch.testing.assert_close(outputs.attention_mask, expected_mask, rtol=0, atol=0)

    call = recorder.calls[-1]
    torch.testing.assert_close(call["attention_mask"], expected_mask, rtol=0, atol=0)
    torch.testing.assert_close(call["position_ids"], (expected_mask.cumsum(-1) - 1).clamp(min=0), rtol=0, atol=0)

    # Filled slots carry the region encoder's token for their box; `<image>` slots the projected image tokens.
    embeds = call["inputs_embeds"]
    with torch.no_grad():
        vision_maps = model.model.encode_image(inputs["pixel_values"])
        image_tokens = model.model.project_image_tokens(vision_maps)
        for sample in range(2):
            boxes = outputs.region_boxes[sample][outputs.region_mask[sample]]
            region_tokens = model.model.region_encoder(
                [level[sample : sample + 1] for level in vision_maps[-3:]], [boxes]
            )
            slot_positions = (input_ids[sample] == config.region_token_id).nonzero().squeeze(1)
            torch.testing.assert_close(embeds[sample, slot_positions[: len(boxes)]], region_tokens)
            image_positions = (input_ids[sample] == config.image_token_id).nonzero().squeeze(1)
            torch.testing.assert_close(embeds[sample, image_positions], image_tokens[sample])

    regions = model.get_regions(inputs["pixel_values"])
    torch.testing.assert_close(regions.region_boxes, outputs.region_boxes)
    assert torch.equal(regions.region_mask, outputs.region_mask)


def test_user_boxes_take_the_first_slots_and_feed_refer_feat():
    model, processor = _model(), tiny_groma_processor()
    _patch_proposals(model)
    recorder = _Recorder(model)
    config = model.config
    # U0 coincides with P0 (suppressed, and P1 with it); U1 overlaps nothing. 100x100 image: pixels / 100.
    user_boxes = [[10.0, 10.0, 40.0, 40.0], [55.0, 5.0, 95.0, 35.0]]
    prompt = "Compare " + processing_groma.REFERRED_REGION + " and " + processing_groma.REFERRED_REGION + " ."
    inputs = processor(images=_images(1), text=[prompt], boxes=[user_boxes])
    assert inputs["refer_boxes"].shape == (1, 2, 4)
    with torch.no_grad():
        outputs = model(**inputs)
    expected = torch.tensor([user_boxes[0], user_boxes[1]]) / 100
    expected = torch.cat([expected, torch.tensor(PROPOSALS[0])[[2, 4]]])
    assert outputs.region_mask[0].tolist() == [True] * 4 + [False] * 4
    torch.testing.assert_close(outputs.region_boxes[0, :4], expected)
    torch.testing.assert_close(outputs.region_scores[0, :4], torch.tensor([1.0, 1.0, 0.5, 0.3]))

    # The i-th `<refer_feat>` holds the token of slot i, i.e. user box i.
    embeds = recorder.calls[-1]["inputs_embeds"][0]
    input_ids = inputs["input_ids"][0]
    refer_positions = (input_ids == config.refer_feat_token_id).nonzero().squeeze(1)
    slot_positions = (input_ids == config.region_token_id).nonzero().squeeze(1)
    assert refer_positions.numel() == 2
    torch.testing.assert_close(embeds[refer_positions], embeds[slot_positions[:2]])

    # An unresolved `<refer_box>` is resolved in the model to the same `<r{i}>`.
    unresolved = inputs["input_ids"].clone()
    roi_indices = (unresolved[0] == config.new_token_id("<roi>")).nonzero().squeeze(1) + 1
    assert unresolved[0, roi_indices].tolist() == config.region_index_token_ids[:2]
    unresolved[0, roi_indices] = config.refer_box_token_id
    with torch.no_grad():
        again = model(**{**inputs, "input_ids": unresolved})
    torch.testing.assert_close(again.logits, outputs.logits)

    # Shuffling permutes proposal slots only.
    shuffled_model = _model(shuffle_regions=True)
    _patch_proposals(shuffled_model)
    torch.manual_seed(3)
    shuffled = shuffled_model.get_regions(inputs["pixel_values"], inputs["refer_boxes"], inputs["refer_boxes_mask"])
    torch.testing.assert_close(shuffled.region_boxes[0, :2], expected[:2])
    proposal_rows = sorted(map(tuple, shuffled.region_boxes[0, 2:4].tolist()))
    assert proposal_rows == sorted(map(tuple, expected[2:].tolist()))


def test_ground_box_placeholders_become_the_best_iou_slot():
    model, processor = _model(), tiny_groma_processor()
    _patch_proposals(model)
    recorder = _Recorder(model)
    config = model.config
    # G0 overlaps P0 (IoU 0.94 > 0.6) and loses NMS to it -> slot 0. G1 overlaps nothing enough and becomes a region
    # of its own with score 0.2, after P0 (0.9), P2 (0.5), P4 (0.3) -> slot 3.
    ground = [[11.0, 10.0, 41.0, 40.0], [60.0, 60.0, 70.0, 95.0]]
    inputs = processor(
        images=_images(1),
        text=[processing_groma.multi_grounding_prompt("squares")],
        ground_boxes=[ground],
        answers=[processing_groma.multi_grounding_answer(2)],
    )
    with torch.no_grad():
        outputs = model(**inputs)
    torch.testing.assert_close(outputs.region_boxes[0, 3], torch.tensor(ground[1]) / 100)
    assert outputs.region_scores[0, 3] == pytest.approx(0.2)
    ious = box_iou(torch.tensor(ground) / 100, outputs.region_boxes[0, :4])
    assert ious.argmax(1).tolist() == [0, 3]

    placeholder_positions = (inputs["labels"][0] == config.ground_box_token_id).nonzero().squeeze(1)
    assert placeholder_positions.numel() == 2
    r0, r3 = config.new_token_id("<r0>"), config.new_token_id("<r3>")
    assert outputs.labels[0, placeholder_positions].tolist() == [r0, r3]
    unchanged = torch.ones_like(inputs["labels"][0], dtype=torch.bool)
    unchanged[placeholder_positions] = False
    assert torch.equal(outputs.labels[0][unchanged], inputs["labels"][0][unchanged])
    # The input ids were rewritten too: those positions carry the `<r0>` / `<r3>` embeddings.
    embeds = recorder.calls[-1]["inputs_embeds"][0]
    text_vocab = config.text_config.vocab_size
    expected_rows = model.model.new_token_embeddings.weight[[r0 - text_vocab, r3 - text_vocab]]
    torch.testing.assert_close(embeds[placeholder_positions], expected_rows)

    with pytest.raises(ValueError, match="`ground_boxes` is None"):
        model(**{key: value for key, value in inputs.items() if not key.startswith("ground_boxes")})


def test_generate_with_kv_cache_matches_a_no_cache_greedy_loop_and_uses_pixels_once():
    model, processor = _model(), tiny_groma_processor()
    _patch_proposals(model)
    inputs = generation_inputs(processor, model.config)
    assert bool((inputs["attention_mask"][:, 0] == 0).any())  # left padding is exercised
    with torch.no_grad():
        prefill_mask = model(**inputs).attention_mask
    assert bool((prefill_mask < inputs["attention_mask"]).any())
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    num_new = 5
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=num_new, do_sample=False, use_cache=True)
    assert len(calls) == num_new
    assert calls[0]["pixel_values"] is not None and calls[0]["refer_boxes"] is not None
    assert all(call.get("pixel_values") is None and call.get("refer_boxes") is None for call in calls[1:])
    # Decode steps keep the empty slots hidden: the effective mask was carried over from prefill.
    torch.testing.assert_close(calls[-1]["attention_mask"][:, : prefill_mask.shape[1]], prefill_mask)

    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(num_new):
            step = model(**{**inputs, "input_ids": input_ids, "attention_mask": attention_mask}, use_cache=False)
            next_token = step.logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    assert torch.equal(generated, input_ids)


# ---- detection pretraining and released quirks ----------------------------------------------------------------


def test_detection_loss_decreases_when_overfitting_one_image():
    model = _model()
    model.train()
    pixel_values = torch.randn(1, 3, 112, 112)
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}]
    optimizer = torch.optim.Adam(model.model.proposer.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        outputs = model(pixel_values=pixel_values, detection_targets=targets)
        assert outputs.logits is None and outputs.proposer_outputs.pred_boxes.shape == (1, 20, 4)
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        losses.append(outputs.loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert {"proposer_loss", "proposer_coco_loss_bbox", "proposer_sa1b_loss_giou"} <= set(outputs.loss_dict)
    assert losses[-1] < 0.8 * losses[0], losses


def test_released_region_box_quirk_reads_cxcywh_as_xyxy():
    strides = (1.75, 3.5, 7.0)
    released_config = tiny_groma_config(region_box_format="cxcywh_as_xyxy", region_feature_strides=strides)
    paper_config = tiny_groma_config(region_box_format="xyxy", region_feature_strides=strides)
    torch.manual_seed(0)
    released = GromaRegionEncoder(released_config).eval()
    paper = GromaRegionEncoder(paper_config).eval()
    paper.load_state_dict(released.state_dict())
    maps = [torch.randn(1, 32, 8, 8) for _ in range(3)]
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.4, 0.1, 0.9, 0.6]])
    with torch.no_grad():
        released_tokens = released(maps, [boxes])
        paper_tokens = paper(maps, [boxes])
        # The quirk is exactly "the cxcywh numbers used as an xyxy box" (inverted boxes included).
        reread = paper(maps, [box_xyxy_to_cxcywh(boxes)])
    assert not torch.allclose(released_tokens, paper_tokens, atol=1e-3)
    torch.testing.assert_close(released_tokens, reread)

    derived = GromaRegionEncoder(tiny_groma_config(region_box_format="xyxy")).eval()
    derived.load_state_dict(released.state_dict())
    assert derived.roi_align.spatial_scales == pytest.approx((32 / 112, 16 / 112, 8 / 112))
    with torch.no_grad():
        assert not torch.allclose(derived(maps, [boxes]), paper_tokens, atol=1e-3)


def test_legacy_position_interpolation_uses_the_transformers_4_32_scale_factor():
    legacy = _model(vision_pos_embed_interpolation="legacy_scale_factor").model.vision_tower.embeddings
    table = legacy.position_embeddings  # (1, 1 + 9 * 9, 32)
    embeddings = torch.zeros(1, 1 + 8 * 8, 32)
    resized = legacy.interpolate_pos_encoding(embeddings, 112, 112)
    grid = table[:, 1:].reshape(1, 9, 9, 32).permute(0, 3, 1, 2)
    expected = nn.functional.interpolate(grid, scale_factor=(8.1 / 9, 8.1 / 9), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 64, 32))
    by_size = nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert not torch.allclose(expected, by_size, atol=1e-4)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model, processor = _model(), tiny_groma_processor()
    config = model.config
    inputs = dict(processor(images=_images(1), text=["Locate <p>the square</p> in the image ."]))

    def call(**changes):
        return model(**{**inputs, **changes})

    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \(batch, 3, 112, 112\)"):
        call(pixel_values=torch.zeros(3, 112, 112))
    with pytest.raises(TypeError, match="`pixel_values`"):
        call(pixel_values=torch.zeros(1, 3, 112, 112, dtype=torch.long))
    for boxes, match in (
        ([[0.1, 0.1, 0.5, float("nan")]], "NaN"),
        ([[-0.2, 0.1, 0.5, 0.5]], r"\[0, 1\]"),
        ([[0.6, 0.1, 0.5, 0.5]], "x2 >= x1"),
    ):
        with pytest.raises(ValueError, match=f"`refer_boxes`.*{match}"):
            call(refer_boxes=torch.tensor([boxes]))
    with pytest.raises(ValueError, match=r"`refer_boxes` has 9 boxes .* max_region_num=8"):
        call(refer_boxes=torch.full((1, 9, 4), 0.5))

    input_ids = inputs["input_ids"]
    image_position = (input_ids[0] == config.image_token_id).nonzero()[0, 0]
    with pytest.raises(ValueError, match=r"16 `<image>` tokens"):
        call(input_ids=torch.cat([input_ids[:, :image_position], input_ids[:, image_position + 1 :]], 1))
    swapped = input_ids.clone()
    slots = (swapped[0] == config.region_token_id).nonzero().squeeze(1)
    swapped[0, slots[1] - 1] = config.new_token_id("<r0>")
    with pytest.raises(ValueError, match=r"`<rk><region>`"):
        call(input_ids=swapped)
    with pytest.raises(ValueError, match=r"`input_ids` contains id"):
        call(input_ids=input_ids.clamp(max=0) + config.total_vocab_size)
    with_feat = input_ids.clone()
    with_feat[0, -2] = config.refer_feat_token_id
    with pytest.raises(ValueError, match=r"`<refer_feat>`.*`refer_boxes`"):
        call(input_ids=with_feat)
    with pytest.raises(ValueError, match="`pixel_values` is None"):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="`labels` must have the shape"):
        call(labels=input_ids[:, 1:])
    with pytest.raises(ValueError, match="targets"):
        model(pixel_values=inputs["pixel_values"], detection_targets=[{"boxes": torch.tensor([[0.5, 0.5, 2.0, 0.1]])}])
    with pytest.raises(ValueError, match="vocabulary is fixed"):
        model.resize_token_embeddings(config.total_vocab_size + 1)
    assert model.resize_token_embeddings(config.total_vocab_size) is model.get_input_embeddings()
