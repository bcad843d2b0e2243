"""RegionBLIP's Q-Former losses (BLIP-2 stage 1, kept per modality): ITC, ITM hard negatives, ITG, the loss dict,
and zero-shot point-cloud classification by Q-Former text features. Tiny preset only."""

import pytest
import torch

from hf_regionmm.modeling.modeling_regionblip import (
    RegionBlipForConditionalGeneration,
    RegionBlipModel,
    contrastive_loss,
    qformer_text_inputs,
    sample_hard_negatives,
)
from hf_regionmm.systems.regionblip import example_inputs, tiny_regionblip_config, tiny_regionblip_processor

LOSS_NAMES = {"loss_lm", "loss_reg", "loss_itc", "loss_itm", "loss_itg"}


def _model(seed: int = 0, **overrides) -> RegionBlipForConditionalGeneration:
    torch.manual_seed(seed)
    return RegionBlipForConditionalGeneration(tiny_regionblip_config(**overrides)).eval()


@pytest.fixture(scope="module")
def processor():
    return tiny_regionblip_processor()


# ---- ITC ---------------------------------------------------------------------------------------------------------


def test_query_text_similarity_is_the_max_over_queries():
    queries = torch.nn.functional.normalize(
        torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]]), dim=-1
    )
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    similarity = RegionBlipModel.query_text_similarity(queries, texts)
    # Sample 0 has a query equal to each text; sample 1's best query scores 0.6 with text 0 and 0.8 with text 1.
    torch.testing.assert_close(similarity, torch.tensor([[1.0, 1.0], [0.6, 0.8]]))


def test_itc_of_aligned_features_is_below_misaligned_and_matches_hand_computed_smoothed_ce():
    torch.manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    noise = torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1)
    aligned = torch.cat([texts[:, None], noise], dim=1)  # every sample holds one query equal to its own text
    misaligned = aligned[torch.tensor([1, 2, 3, 0])]
    similarity = {
        name: torch.einsum("bqd,td->btq", queries, texts).amax(-1) / 0.07
        for name, queries in (("aligned", aligned), ("misaligned", misaligned))
    }
    aligned_loss = contrastive_loss(similarity["aligned"])
    assert aligned_loss < contrastive_loss(similarity["misaligned"])
    # Label smoothing 0.1 over 4 classes: target 0.925 on the diagonal, 0.025 elsewhere, averaged both ways.
    targets = torch.full((4, 4), 0.1 / 4) + 0.9 * torch.eye(4)
    by_hand = 0.5 * (
        -(targets * similarity["aligned"].log_softmax(1)).sum(1).mean()
        - (targets * similarity["aligned"].t().log_softmax(1)).sum(1).mean()
    )
    torch.testing.assert_close(aligned_loss, by_hand)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))


# ---- ITM hard negatives ------------------------------------------------------------------------------------------


def test_hard_negative_sampling_never_picks_the_positive_and_follows_the_similarities():
    generator = torch.Generator().manual_seed(0)
    similarity = torch.eye(5) * 6.0  # most of the softmax mass sits on the positive
    similarity[0, 3] = 6.0  # ... and, in row 0, as much on candidate 3, a hard negative
    draws = torch.stack([sample_hard_negatives(similarity, generator=generator) for _ in range(200)])
    assert not bool((draws == torch.arange(5)).any())
    assert (draws[:, 0] == 3).float().mean() > 0.9
    exclude = torch.zeros(5, 5, dtype=torch.bool)
    exclude[0, 3] = True  # e.g. the same caption: a false negative
    draws = torch.stack([sample_hard_negatives(similarity, exclude=exclude, generator=generator) for _ in range(50)])
    assert not bool((draws[:, 0] == 3).any()) and not bool((draws == torch.arange(5)).any())
    everything = ~torch.eye(5, dtype=torch.bool)  # no candidate left: only the positive stays excluded
    draws = sample_hard_negatives(similarity, exclude=everything, generator=generator)
    assert not bool((draws == torch.arange(5)).any())
    with pytest.raises(ValueError, match="batch >= 2"):
        sample_hard_negatives(torch.zeros(1, 1))


# ---- ITG ---------------------------------------------------------------------------------------------------------


def _query_and_text(model, processor, captions):
    inputs = example_inputs(processor, model.config)
    modality_inputs = {key: inputs[key] for key in ("pixel_values", "region_boxes")}
    query = model.model.get_query_features("image_region", **modality_inputs)
    text = qformer_text_inputs(processor.tokenizer, captions)
    return query, text["qformer_input_ids"], text["qformer_attention_mask"]


def test_itg_equals_hand_computed_smoothed_ce_from_prefix_passes(processor):
    model = _model()
    with torch.no_grad():
        query, ids, mask = _query_and_text(model, processor, ["a small red circle", "a large blue square"])
        loss = model.model._itg_loss("image_region", query, ids, mask)
        decoder_ids = ids.clone()
        decoder_ids[:, 0] = model.config.qformer_decoder_start_token_id
        # The queries never see the text, so the ITG pass reproduces their outputs (LAVIS reuses their cache).
        joint = model.model._qformer_text_pass(
            "image_region", decoder_ids, mask, query.query_inputs, query.encoder_hidden_states, causal=True
        )
        torch.testing.assert_close(joint[:, : query.query_inputs.shape[1]], query.query_output, rtol=1e-4, atol=1e-5)
        # Token t+1 is predicted from a pass over the prefix [DEC] .. t alone: equal to the full pass only if the
        # causal mask hides every later token.
        terms = []
        for sample in range(2):
            for position in range(int(mask[sample].sum()) - 1):
                prefix = decoder_ids[sample : sample + 1, : position + 1]
                hidden = model.model._qformer_text_pass(
                    "image_region", prefix, torch.ones_like(prefix), query.query_inputs[sample : sample + 1],
                    query.encoder_hidden_states[sample : sample + 1], causal=True,
                )  # fmt: skip
                logits = model.model.qformer_text.lm_logits(hidden[0, -1])
                log_probs = logits.log_softmax(-1)
                target = decoder_ids[sample, position + 1]
                terms.append(-0.9 * log_probs[target] - 0.1 * log_probs.mean())
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-4, atol=1e-5)


def test_itg_ignores_padding(processor):
    model = _model()
    with torch.no_grad():
        query, ids, mask = _query_and_text(model, processor, ["a small red circle", "a cube"])
        assert int(mask[1].sum()) < ids.shape[1]  # the second caption is padded
        batched = model.model._itg_loss("image_region", query, ids, mask)
        singles = []
        for sample in range(2):
            length = int(mask[sample].sum())
            single_query = type(query)(
                query_inputs=query.query_inputs[sample : sample + 1],
                encoder_hidden_states=query.encoder_hidden_states[sample : sample + 1],
            )
            single = model.model._itg_loss(
                "image_region", single_query, ids[sample : sample + 1, :length], mask[sample : sample + 1, :length]
            )
            singles.append((single, length - 1))
    expected = sum(loss * count for loss, count in singles) / sum(count for _, count in singles)
    torch.testing.assert_close(batched, expected, rtol=1e-4, atol=1e-5)


# ---- the loss dict and the total ---------------------------------------------------------------------------------


def test_loss_dict_has_every_term_and_the_total_is_the_weighted_sum(processor):
    model = _model(itc_loss_weight=0.5, itg_loss_weight=2.0, box_regression_loss_weight=0.25)
    inputs = example_inputs(processor, model.config)
    assert {"qformer_input_ids", "qformer_attention_mask"} <= set(inputs)
    outputs = model(**inputs)
    terms = outputs.loss_dict
    assert set(terms) == LOSS_NAMES
    assert float(terms["loss_itc"]) > 0 and float(terms["loss_itg"]) > 0 and float(terms["loss_reg"]) > 0
    assert float(terms["loss_itm"]) == 0.0  # released: ITM for the image modality only
    expected = terms["loss_lm"] + 0.25 * terms["loss_reg"] + 0.5 * terms["loss_itc"] + 2.0 * terms["loss_itg"]
    torch.testing.assert_close(outputs.loss.detach(), expected)
    # The image modality (no box) gets ITM: a binary CE, near log(2) at initialisation.
    image_inputs = {key: value for key, value in inputs.items() if key != "region_boxes"}
    image_terms = model(**image_inputs).loss_dict
    assert set(image_terms) == LOSS_NAMES and 0.3 < float(image_terms["loss_itm"]) < 1.5
    # Switched off: no Q-Former text side at all, and Q-Former text is refused with a clear message.
    plain = _model(use_itc=False, use_itm=False, use_itg=False)
    assert plain.model.qformer_text is None and plain.model.vision_projections is None
    with pytest.raises(ValueError, match="switches ITC, ITM and ITG off"):
        plain(**inputs)
    lm_only = plain(**{key: value for key, value in inputs.items() if not key.startswith("qformer_")})
    assert set(lm_only.loss_dict) == LOSS_NAMES and float(lm_only.loss_dict["loss_itc"]) == 0.0


def test_qformer_losses_train_the_heads_and_bad_qformer_text_fails_clearly(processor):
    model = _model().train()
    inputs = example_inputs(processor, model.config)
    model(**inputs).loss.backward()
    for parameter in (model.model.text_projection.weight, model.model.temperature,
                      model.model.vision_projections["image_region"].weight):  # fmt: skip
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="Q-Former vocabulary"):
        model(**{**inputs, "qformer_input_ids": inputs["qformer_input_ids"] + 10_000})
    with pytest.raises(ValueError, match=r"`qformer_input_ids` must have shape \(batch=2"):
        model(**{**inputs, "qformer_input_ids": inputs["qformer_input_ids"][:1]})
    with pytest.raises(ValueError, match="needs `use_itc`"):
        tiny_regionblip_config(use_itc=False, use_itm=True)
    with pytest.raises(ValueError, match="qformer_decoder_start_token_id"):
        tiny_regionblip_config(qformer_decoder_start_token_id=10_000)


# ---- zero-shot point-cloud classification ------------------------------------------------------------------------


def test_zero_shot_point_cloud_classification_scores_every_class(processor):
    model = _model()
    clouds = [torch.randn(80, 3).numpy() for _ in range(3)]
    scores = model.classify_point_clouds(clouds, ["cube", "sphere", "cone", "torus"], processor)
    assert scores.shape == (3, 4) and bool((scores.abs() <= 1 + 1e-5).all())
    assert model.active_modality == "point_cloud"
    # Scores are max-over-queries cosines of the point-cloud Q-Former's features: reproducible from the parts.
    point_clouds = processor(point_clouds=clouds)["point_clouds"]
    text = qformer_text_inputs(processor.tokenizer, [f"a point cloud model of {n}." for n in ("cube", "sphere")])
    parts = model.model.point_cloud_class_scores(
        point_clouds, text["qformer_input_ids"], text["qformer_attention_mask"]
    )
    torch.testing.assert_close(scores[:, :2], parts)
    with pytest.raises(TypeError, match="`class_names`"):
        model.classify_point_clouds(clouds, [], processor)


def test_tiny_towers_see_their_inputs():
    # Blip2VisionConfig's default initializer_range (1e-10) would give every image the same features, and no
    # modality loss could then learn anything from pixels.
    model = _model()
    pixels = torch.randn(2, 3, 56, 56)
    features = model.model.encode_images(pixels)
    assert float((features[0] - features[1]).abs().mean()) > 0.05 * float(features.abs().mean())
