"""u-LLaVA config, model, heads, losses and trainer recipe (u-LLaVA issue items 1, 2 and 4)."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import CLIPVisionModel, LlamaModel, LogitsProcessorList, set_seed
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPromptEncoder, SamVisionEncoder

from hf_regionmm.modeling import configuration_ullava
from hf_regionmm.modeling.configuration_ullava import ULlavaConfig
from hf_regionmm.modeling.modeling_ullava import (
    LOSS_TERMS,
    ULlavaForConditionalGeneration,
    decode_location,
    encode_location,
    mask_logits_to_box,
    order_box_corners,
    sam_resized_size,
)
from hf_regionmm.processing import processing_ullava
from hf_regionmm.systems.ullava import _example_scenes, example_inputs, tiny_ullava_config, tiny_ullava_processor
from hf_regionmm.trainers.region_trainer import apply_training_stage, stage_by_name
from hf_regionmm.trainers.ullava import ULLAVA_STAGES, ULlavaCollator, ULlavaTrainingDataset


@pytest.fixture(scope="module")
def processor():
    return tiny_ullava_processor()


@pytest.fixture(scope="module")
def config():
    return tiny_ullava_config()


def _model(config: ULlavaConfig, seed: int = 0) -> ULlavaForConditionalGeneration:
    set_seed(seed)
    return ULlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model(config):
    return _model(config)


@pytest.fixture(scope="module")
def inputs(processor, config):
    return example_inputs(processor, config)


# ---- config ------------------------------------------------------------------------------------------------------


def test_released_token_ids_and_token_counts():
    config = ULlavaConfig.from_preset("ullava-7b")
    assert config.text_config.vocab_size == 32011
    ids = [config.new_token_id(token) for token in configuration_ullava.ULLAVA_NEW_TOKENS]
    assert ids == list(range(32000, 32011))
    assert (config.image_patch_token_id, config.video_patch_token_id) == (32001, 32002)
    assert (config.image_start_token_id, config.image_end_token_id) == (32003, 32004)
    assert (config.video_start_token_id, config.video_end_token_id) == (32005, 32006)
    assert (config.seg_token_id, config.loc_token_id, config.tag_start_token_id, config.tag_end_token_id) == (
        32007,
        32008,
        32009,
        32010,
    )
    assert config.num_image_tokens == 256 and config.num_video_tokens == 8 + 256
    assert config.vision_feature_layer == -2 and config.sam_image_size == 1024 and config.sam_prompt_dim == 256
    weights = (config.ce_loss_weight, config.bce_loss_weight, config.dice_loss_weight)
    assert weights == (1.0, 2.0, 0.5) and (config.l1_loss_weight, config.giou_loss_weight) == (1.0, 1.0)
    assert config.loc_head_hidden_sizes == (256, 128) and config.seg_token_offset == "previous"


def test_config_and_processor_token_lists_agree():
    assert configuration_ullava.ULLAVA_NEW_TOKENS == processing_ullava.ULLAVA_NEW_TOKENS


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"seg_token_offset": "next"}, "seg_token_offset"),
        ({"rec_fusion": "max"}, "rec_fusion"),
        ({"image_size": 50}, "patch_size"),
        ({"text_config": {"vocab_size": 5}}, "vocab_size"),
        ({"sam_config": {"mask_decoder_config": {"hidden_size": 48}}}, "sam_config"),
        ({"loc_head_hidden_sizes": []}, "loc_head_hidden_sizes"),
        ({"loc_box_activation": "relu"}, "loc_box_activation"),
        ({"loc_prior_box": (0.7, 0.3, 0.3, 0.7)}, "loc_prior_box"),
        ({"loc_prior_box": (0.0, 0.3, 0.5, 0.7)}, "loc_prior_box"),
    ],
)
def test_bad_config_values_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        ULlavaConfig.from_preset("ullava-tiny", **overrides)


def test_config_round_trip(tmp_path, config):
    config.save_pretrained(tmp_path)
    reloaded = ULlavaConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.sam_config.vision_config.image_size == 64 and reloaded.seg_token_id == config.seg_token_id


def _numel(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_7b_preset_builds_on_meta_and_matches_an_independent_parameter_count():
    config = ULlavaConfig.from_preset("ullava-7b")
    start = time.perf_counter()
    with torch.device("meta"):
        model = ULlavaForConditionalGeneration(config)
        clip = CLIPVisionModel(config.vision_config)
        llama = LlamaModel(config.text_config)
        sam_parts = (
            SamVisionEncoder(config.sam_config.vision_config),
            SamPromptEncoder(config.sam_config),
            SamMaskDecoder(config.sam_config.mask_decoder_config),
        )
    assert time.perf_counter() - start < 60
    total = _numel(model)
    hidden, vocab = 4096, 32011
    # Llama-7B by hand: embeddings, 32 x (4 attention 4096^2 + 3 MLP 4096x11008 + 2 norms), final norm.
    llama_by_hand = vocab * hidden + 32 * (4 * hidden * hidden + 3 * hidden * 11008 + 2 * hidden) + hidden
    assert _numel(llama) == llama_by_hand
    heads = (
        vocab * hidden  # lm_head
        + (1024 * hidden + hidden)  # linear projector
        + 2 * (hidden * hidden + hidden + hidden * 256 + 256)  # seg_projector, loc_projector
        + (256 * 256 + 256 + 256 * 128 + 128 + 128 * 4 + 4)  # loc_head
    )
    independent = _numel(clip) + llama_by_hand + sum(_numel(part) for part in sam_parts) + heads
    assert total == independent
    # CLIP ViT-L/14 vision 303.2M, SAM ViT-H ~641M, Vicuna-7B 6.74B: u-LLaVA-7B ~7.72B.
    assert 303_000_000 < _numel(clip) < 304_000_000
    assert 7_700_000_000 < total < 7_750_000_000


# ---- forward, heads ----------------------------------------------------------------------------------------------


def _special_positions(input_ids, token_id):
    return [(row == token_id).nonzero().squeeze(1) for row in input_ids]


@pytest.mark.parametrize("offset", ["previous", "self"])
def test_seg_mask_comes_from_the_configured_hidden_state(offset, inputs):
    config = tiny_ullava_config(seg_token_offset=offset)
    model = _model(config)
    with torch.no_grad():
        outputs = model(**inputs)
        hidden = model.model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
        ).last_hidden_state
        (position,) = _special_positions(inputs["input_ids"], config.seg_token_id)[0].tolist()
        state = hidden[0, position - 1 if offset == "previous" else position]
        embedding = model.model.get_sam_image_embeddings(inputs["sam_pixel_values"][:1])[0]
        low_res = model.model.decode_masks(embedding, model.seg_projector(state[None]))
        height, width = inputs["image_sizes"][0].tolist()
        expected = model.model.postprocess_masks(low_res, (height, width))
    torch.testing.assert_close(outputs.pred_masks[0], expected)
    # The [LOC] box reads the same convention.
    (loc_position,) = _special_positions(inputs["input_ids"], config.loc_token_id)[1].tolist()
    loc_state = hidden[1, loc_position - 1 if offset == "previous" else loc_position]
    expected_box = decode_location(model.loc_head(model.loc_projector(loc_state)), config.loc_box_activation)
    torch.testing.assert_close(outputs.pred_boxes[1, 0], expected_box)


def test_previous_convention_ignores_the_seg_token_itself(inputs):
    # With "previous" the mask depends only on tokens before [SEG] (causal LM): replacing [SEG]'s own input
    # embedding row changes nothing; with "self" it changes the mask.
    results = {}
    for offset in ("previous", "self"):
        config = tiny_ullava_config(seg_token_offset=offset)
        model = _model(config)
        with torch.no_grad():
            before = model(**inputs).pred_masks[0].clone()
            model.get_input_embeddings().weight[config.seg_token_id] += 1.0
            after = model(**inputs).pred_masks[0]
        results[offset] = torch.equal(before, after)
    assert results == {"previous": True, "self": False}


def test_masks_come_out_at_the_original_image_size(model, inputs):
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = inputs["image_sizes"].tolist()
    assert [tuple(mask.shape) for mask in outputs.pred_masks] == [(1, *sizes[0]), (0, *sizes[1])]


def test_postprocess_masks_crops_the_padding_before_resizing(model):
    # Image 32x64 -> SAM resizes it to 32x64 inside a 64x64 input: the top half of the low-res map is the image.
    assert sam_resized_size(32, 64, 64) == (32, 64)
    low_res = torch.full((2, 32, 32), -10.0)
    low_res[0, :16] = 10.0  # the image region
    low_res[1, 16:] = 10.0  # only padding
    masks = model.model.postprocess_masks(low_res, (32, 64))
    assert masks.shape == (2, 32, 64)
    assert bool((masks[0] > 0).all()) and bool((masks[1] < 0).all())


def test_location_decoding_is_always_valid_and_inverts_on_valid_boxes():
    set_seed(0)
    raw = torch.randn(4096, 4) * 6
    boxes = decode_location(raw, "center_size")
    assert bool((boxes[:, 2:] >= boxes[:, :2]).all())
    # Centre and size are both in (0, 1), so a box reaches at most half its size past the square.
    assert bool((boxes > -0.5).all()) and bool((boxes < 1.5).all())
    sigmoid = decode_location(raw, "sigmoid")
    assert bool(((sigmoid >= 0) & (sigmoid <= 1)).all())
    # Hand-computed: raw 0 -> centre 0.5, size 0.5 -> (0.25, 0.25, 0.75, 0.75).
    torch.testing.assert_close(decode_location(torch.zeros(4), "center_size"), torch.tensor([0.25, 0.25, 0.75, 0.75]))
    corners = torch.rand(256, 2) * 0.5
    valid = torch.cat([corners, corners + 0.05 + torch.rand(256, 2) * 0.4], dim=1)
    for activation in ("center_size", "sigmoid", "none"):
        torch.testing.assert_close(decode_location(encode_location(valid, activation), activation), valid)
    with pytest.raises(ValueError, match="activation"):
        decode_location(raw, "relu")


@pytest.mark.parametrize("activation", ["center_size", "sigmoid", "none"])
def test_fresh_location_head_starts_at_the_prior_box(activation, inputs):
    model = _model(tiny_ullava_config(loc_box_activation=activation))
    with torch.no_grad():
        outputs = model(**inputs)
    boxes = outputs.pred_boxes[outputs.pred_boxes_mask]
    # The last layer's small random weights move the box only slightly off the prior.
    torch.testing.assert_close(boxes, torch.tensor([[0.3, 0.3, 0.7, 0.7]] * 2), atol=0.02, rtol=0)
    custom = _model(tiny_ullava_config(loc_box_activation=activation, loc_prior_box=[0.1, 0.2, 0.5, 0.9]))
    with torch.no_grad():
        boxes = custom(**inputs).pred_boxes[0, 0]
    torch.testing.assert_close(boxes, torch.tensor([0.1, 0.2, 0.5, 0.9]), atol=0.02, rtol=0)


def test_box_head_gives_valid_boxes_for_any_weights_and_raw_keeps_the_release(config, inputs):
    model = _model(config)
    assert config.loc_box_activation == "center_size"
    with torch.no_grad():
        for parameter in model.loc_head.parameters():
            parameter.normal_(0, 5.0)
        outputs = model(**inputs)
        prediction = model.predict(
            inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            sam_pixel_values=inputs["sam_pixel_values"],
            image_sizes=inputs["image_sizes"],
            attention_mask=inputs["attention_mask"],
        )
    boxes = outputs.pred_boxes[outputs.pred_boxes_mask]
    assert boxes.shape == (2, 4) and bool((boxes[:, 2:] >= boxes[:, :2]).all())
    for sample_boxes in prediction.boxes:
        assert bool((sample_boxes[:, 2:] >= sample_boxes[:, :2]).all())
        assert bool(((sample_boxes >= 0) & (sample_boxes <= 1)).all())
    # The released parametrisation reads the same decoder outputs as raw xyxy.
    raw = ULlavaForConditionalGeneration(tiny_ullava_config(loc_box_activation="none")).eval()
    raw.load_state_dict(model.state_dict())
    with torch.no_grad():
        raw_boxes = raw(**inputs).pred_boxes
    torch.testing.assert_close(decode_location(raw_boxes, "center_size")[outputs.pred_boxes_mask], boxes)


def test_box_losses_reach_the_location_head_and_the_llm(inputs):
    # Only the box terms weigh: the gradient of the total loss is the box losses' gradient.
    config = tiny_ullava_config(ce_loss_weight=0.0, bce_loss_weight=0.0, dice_loss_weight=0.0)
    model = _model(config).train()
    model(**inputs).loss.backward()
    assert float(model.loc_head[-1].weight.grad.abs().sum()) > 0
    assert float(model.loc_projector[0].weight.grad.abs().sum()) > 0
    assert float(model.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum()) > 0
    assert model.seg_projector[0].weight.grad is None or float(model.seg_projector[0].weight.grad.abs().sum()) == 0


def test_fresh_sam_image_encoder_gives_non_degenerate_features(model):
    assert ULlavaConfig.from_preset("ullava-7b").sam_config.vision_config.initializer_range == 0.02
    assert ULlavaConfig().sam_config.vision_config.initializer_range == 0.02
    set_seed(0)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.model.get_sam_image_embeddings(images)
        # transformers' SamVisionConfig default (1e-10, meant for loading pretrained SAM) would give ~0 features.
        degenerate = _model(
            tiny_ullava_config(sam_config={"vision_config": {"initializer_range": 1e-10}})
        ).model.get_sam_image_embeddings(images)
    assert float(features.std()) > 0.5 and float((features[0] - features[1]).abs().mean()) > 0.1
    assert float(degenerate.abs().max()) < 1e-6


def test_order_box_corners_and_mask_box():
    boxes = torch.tensor([[0.6, 0.1, 0.2, 0.5]])
    torch.testing.assert_close(order_box_corners(boxes), torch.tensor([[0.2, 0.1, 0.6, 0.5]]))
    logits = torch.full((4, 8), -1.0)
    logits[1:3, 2:4] = 1.0
    # Pixel box [2, 1, 4, 3] in a 4x8 image; the white-padded square is 8x8 with the image 2 rows down.
    torch.testing.assert_close(mask_logits_to_box(logits, 0.0, 4, 8), torch.tensor([2 / 8, 3 / 8, 4 / 8, 5 / 8]))
    assert mask_logits_to_box(torch.full((4, 8), -1.0), 0.0, 4, 8) is None


# ---- losses ------------------------------------------------------------------------------------------------------


def test_loss_is_the_weighted_sum_of_named_terms(model, inputs):
    with torch.no_grad():
        outputs = model(**inputs)
    terms = outputs.loss_dict
    assert tuple(terms) == LOSS_TERMS and all(float(value) > 0 for value in terms.values())
    config = model.config
    expected = (
        config.ce_loss_weight * terms["lm_loss"]
        + config.bce_loss_weight * terms["mask_bce"]
        + config.dice_loss_weight * terms["mask_dice"]
        + config.l1_loss_weight * terms["box_l1"]
        + config.giou_loss_weight * terms["box_giou"]
    )
    torch.testing.assert_close(outputs.loss, expected)
    predictions = order_box_corners(outputs.pred_boxes[outputs.pred_boxes_mask])
    targets = inputs["loc_boxes"][inputs["loc_boxes_mask"]]
    torch.testing.assert_close(terms["box_l1"], (predictions - targets).abs().mean())
    logits, target = outputs.pred_masks[0], inputs["seg_masks"][0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(terms["mask_bce"], bce)


def test_absent_terms_are_zero_with_the_same_keys(model, inputs):
    plain = {key: value for key, value in inputs.items() if key not in ("seg_masks", "loc_boxes", "loc_boxes_mask")}
    with torch.no_grad():
        outputs = model(**plain)
    assert tuple(outputs.loss_dict) == LOSS_TERMS
    assert [float(outputs.loss_dict[name]) for name in LOSS_TERMS[1:]] == [0.0] * 4
    torch.testing.assert_close(outputs.loss, outputs.loss_dict["lm_loss"])
    # A batch whose box targets exist but whose mask targets are all empty: mask terms 0, box terms > 0.
    no_masks = {**inputs, "seg_masks": [torch.zeros(0, *m.shape[-2:]) for m in inputs["seg_masks"]]}
    with torch.no_grad():
        terms = model(**no_masks).loss_dict
    assert float(terms["mask_bce"]) == 0.0 and float(terms["mask_dice"]) == 0.0 and float(terms["box_l1"]) > 0


def test_box_targets_must_match_loc_tokens(model, inputs):
    wrong = {**inputs, "loc_boxes_mask": torch.tensor([[True], [False]])}
    with pytest.raises(ValueError, match=r"`loc_boxes`.*\[LOC\]"):
        model(**wrong)


# ---- video -------------------------------------------------------------------------------------------------------


def test_video_tokens_are_temporal_then_spatial_means(model, config):
    set_seed(1)
    frames = torch.randn(2, config.num_video_frames, 3, config.image_size, config.image_size)
    with torch.no_grad():
        features = model.model.get_video_features(frames)
        tokens = model.model.encode_images(frames.flatten(0, 1)).reshape(
            2, config.num_video_frames, -1, config.vision_config.hidden_size
        )
        expected = model.model.multi_modal_projector(torch.cat([tokens.mean(2), tokens.mean(1)], dim=1))
    assert features.shape == (2, config.num_video_tokens, config.text_config.hidden_size)
    torch.testing.assert_close(features, expected)


# ---- generation and predict ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["box", "mask", "mean"])
def test_predict_runs_heads_on_generated_tokens_and_fuses_rec_boxes(fusion, processor):
    config = tiny_ullava_config(rec_fusion=fusion, mask_threshold=-1e9)  # every pixel is foreground
    model = _model(config)
    prompt = processor(images=[_example_scenes()[0]["image"]], text=["where is the circle?"], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **{k: v for k, v in prompt.items() if k != "sam_pixel_values"}, max_new_tokens=2, do_sample=False
        )
    # Append a u-LLaVA answer tail as if it had been generated.
    tail = torch.tensor([[config.seg_token_id, config.loc_token_id, config.text_config.eos_token_id]])
    sequences = torch.cat([generated, tail], dim=1)
    with torch.no_grad():
        prediction = model.predict(
            sequences,
            pixel_values=prompt["pixel_values"],
            sam_pixel_values=prompt["sam_pixel_values"],
            image_sizes=prompt["image_sizes"],
            attention_mask=prompt["attention_mask"],
        )
    height, width = prompt["image_sizes"][0].tolist()
    assert prediction.masks[0].shape == (1, height, width) and bool(prediction.masks[0].all())
    side = max(height, width)
    left, top = (side - width) // 2, (side - height) // 2
    whole_image = torch.tensor([left, top, left + width, top + height], dtype=torch.float32) / side
    box = prediction.boxes[0][0]
    expected = {"box": box, "mask": whole_image, "mean": (box + whole_image) / 2}[fusion]
    torch.testing.assert_close(prediction.rec_boxes[0], expected)


def test_seg_without_image_and_video_frame_errors(model, processor, config):
    text_only = processor(text=["find it"], answers=[processing_ullava.res_answer("red circle")], return_tensors="pt")
    with pytest.raises(ValueError, match=r"\[SEG\].*image"):
        model(**text_only, seg_masks=[torch.zeros(1, 4, 4)])
    frames = torch.zeros(1, config.num_video_frames + 1, 3, config.image_size, config.image_size)
    with pytest.raises(ValueError, match="num_video_frames"):
        model.model.get_video_features(frames)


# ---- trainer recipe ----------------------------------------------------------------------------------------------


def test_stages_freeze_the_papers_parts(config):
    model = ULlavaForConditionalGeneration(config)
    apply_training_stage(model, stage_by_name(ULLAVA_STAGES, "align"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("model.multi_modal_projector.") for name in trainable)
    apply_training_stage(model, stage_by_name(ULLAVA_STAGES, "instruct"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for prefix in (
        "model.language_model.",
        "seg_projector.",
        "loc_projector.",
        "loc_head.",
        "model.sam_mask_decoder.",
    ):
        assert any(name.startswith(prefix) for name in trainable), prefix
    for prefix in ("model.vision_tower.", "model.sam_vision_encoder."):
        assert not any(name.startswith(prefix) for name in trainable), prefix


def test_collator_builds_mixed_batches(processor):
    from hf_regionmm.data.synthetic import generate_scenes, generate_videos

    scenes = generate_scenes(4, seed=3, image_size_range=(64, 80), max_objects=3, with_masks=True)
    videos = generate_videos(1, seed=3, num_frames=6, image_size=64)
    dataset = ULlavaTrainingDataset(scenes, videos, tasks=("res", "rec", "caption", "salient"), seed=0)
    examples = [dataset[index] for index in range(len(dataset))]
    assert [example["task"] for example in examples][:3] == ["res", "rec", "caption"]
    batch = ULlavaCollator(processor)(examples)
    assert batch["pixel_values"].shape[0] == 4 and batch["pixel_values_videos"].shape[:2] == (1, 4)
    assert [tuple(masks.shape[:1]) for masks in batch["seg_masks"]] == [(1,), (0,), (0,), (1,), (0,)]
    assert batch["loc_boxes_mask"].sum(1).tolist() == [1, 1, 0, 1, 0]
    model = _model(tiny_ullava_config())
    with torch.no_grad():
        outputs = model(**batch)
    assert torch.isfinite(outputs.loss) and all(float(outputs.loss_dict[name]) > 0 for name in LOSS_TERMS)


def test_predict_without_special_tokens_keeps_the_per_sample_layout(model, processor):
    prompt = processor(images=[_example_scenes()[1]["image"]], text=["what is it?"], return_tensors="pt")
    eos = torch.tensor([[model.config.text_config.eos_token_id]])
    with torch.no_grad():
        prediction = model.predict(
            torch.cat([prompt["input_ids"], eos], dim=1),
            pixel_values=prompt["pixel_values"],
            sam_pixel_values=prompt["sam_pixel_values"],
            image_sizes=prompt["image_sizes"],
        )
    height, width = prompt["image_sizes"][0].tolist()
    assert prediction.masks[0].shape == (0, height, width) and prediction.boxes[0].shape == (0, 4)
    assert prediction.rec_boxes == [None]
    (masks,) = processor.post_process_segmentation(prediction.mask_logits, prompt["image_sizes"])
    assert masks.shape == (0, height, width)


def test_plain_trl_sft_trainer_trains_on_messages_and_images(processor, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": scene["image_caption"]}]},
            ],
            "images": [scene["image"]],
        }
        for scene in _example_scenes()
    ]
    model = _model(tiny_ullava_config()).train()
    before = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    arguments = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        max_length=None,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=arguments, train_dataset=Dataset.from_list(rows), processing_class=processor
    )
    trainer.train()
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.model.multi_modal_projector.linear_1.weight.detach())


class _ForceTokens:
    """Logits processor writing `tokens` after the prompt (one per step), so generation emits `[SEG]`/`[LOC]`."""

    def __init__(self, prompt_length: int, tokens: list[int]) -> None:
        self.prompt_length, self.tokens = prompt_length, tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.tokens):
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.tokens[step]] = 0.0
        return scores


def test_predict_from_generated_hidden_states_equals_the_teacher_forced_pass(model, processor):
    config = model.config
    scenes = _example_scenes()
    prompt = processor(
        images=[scenes[0]["image"], scenes[1]["image"]],
        text=["where is the circle?", "find the big one"],
        padding_side="left",
        return_tensors="pt",
    )
    # Sample 0 writes a word, [SEG], [LOC] and more words; the heads read the states before the special tokens.
    forced = [5, config.seg_token_id, config.loc_token_id, 6, 7]
    with torch.no_grad():
        generated = model.generate(
            **{k: v for k, v in prompt.items() if k != "sam_pixel_values"},
            max_new_tokens=len(forced),
            min_new_tokens=len(forced),
            do_sample=False,
            logits_processor=LogitsProcessorList([_ForceTokens(prompt["input_ids"].shape[1], forced)]),
            output_hidden_states=True,
            return_dict_in_generate=True,
        )
        common = {
            "pixel_values": prompt["pixel_values"],
            "sam_pixel_values": prompt["sam_pixel_values"],
            "image_sizes": prompt["image_sizes"],
            "attention_mask": prompt["attention_mask"],
        }
        fast = model.predict(generated.sequences, generated_hidden_states=generated.hidden_states, **common)
        slow = model.predict(generated.sequences, **common)
    assert [masks.shape[0] for masks in fast.mask_logits] == [1, 1]
    for name in ("mask_logits", "boxes"):
        for ours, reference in zip(getattr(fast, name), getattr(slow, name), strict=True):
            torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    for ours, reference in zip(fast.rec_boxes, slow.rec_boxes, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    # The states of another call do not fit.
    with pytest.raises(ValueError, match="generated_hidden_states"):
        model.predict(generated.sequences[:, :-1], generated_hidden_states=generated.hidden_states, **common)
