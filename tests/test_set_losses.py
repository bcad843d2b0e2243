"""Hungarian matcher, DETR set criterion (hungarian_matching) and mask losses (mask_losses)."""

import math

import pytest
import torch

from hf_regionmm.modeling.hungarian_matching import HungarianMatcher, SetCriterion
from hf_regionmm.modeling.mask_losses import MaskLoss, bce_mask_loss, dice_loss, sigmoid_focal_mask_loss

# ---------------------------------------------------------------------------------------------------- matcher


def _targets():
    return [
        {
            "class_labels": torch.tensor([0, 0]),
            "boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.3, 0.3]]),
        },
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]


def _predictions():
    """Image 0: query 0 sits on target 1, query 2 on target 0, query 1 on nothing. Image 1 has no targets."""
    pred_boxes = torch.tensor(
        [
            [[0.74, 0.76, 0.3, 0.3], [0.5, 0.1, 0.05, 0.05], [0.26, 0.25, 0.2, 0.2]],
            [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1], [0.6, 0.6, 0.1, 0.1]],
        ]
    )
    logits = torch.zeros(2, 3, 1)
    return logits, pred_boxes


def test_matcher_assigns_the_obvious_permutation_and_handles_empty_images():
    logits, pred_boxes = _predictions()
    matches = HungarianMatcher()(logits, pred_boxes, _targets())
    assert len(matches) == 2
    pred_indices, target_indices = matches[0]
    assert pred_indices.tolist() == [0, 2] and target_indices.tolist() == [1, 0]
    assert pred_indices.dtype == target_indices.dtype == torch.long
    assert matches[1][0].numel() == 0 and matches[1][1].numel() == 0


def test_matcher_uses_class_cost():
    # Two queries on the same box; the class costs decide: the confident query wins.
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[[-4.0], [4.0]]])
    targets = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    assert HungarianMatcher()(logits, pred_boxes, targets)[0][0].tolist() == [1]


def test_matcher_with_more_targets_than_queries_and_no_targets_at_all():
    logits, pred_boxes = _predictions()
    targets = [
        {
            "class_labels": torch.zeros(4, dtype=torch.long),
            "boxes": torch.rand(4, 2, generator=torch.Generator().manual_seed(0)).repeat(1, 2) * 0.5 + 0.1,
        },
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    pred_indices, target_indices = HungarianMatcher()(logits, pred_boxes, targets)[0]
    assert len(pred_indices) == 3 and len(set(target_indices.tolist())) == 3
    nothing = HungarianMatcher()(logits, pred_boxes, [_targets()[1], _targets()[1]])
    assert all(pred.numel() == 0 and target.numel() == 0 for pred, target in nothing)


@pytest.mark.parametrize(
    ("logits", "pred_boxes", "targets", "error", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, 4), None, ValueError, r"`logits` must have shape \(B, Q, K\)"),
        (torch.zeros(2, 3, 1), torch.zeros(2, 4, 4), None, ValueError, r"`pred_boxes` must have shape \(B, Q, 4\)"),
        (torch.zeros(2, 3, 1, dtype=torch.long), torch.zeros(2, 3, 4), None, TypeError, r"`logits` and `pred_boxes`"),
        (
            torch.full((2, 3, 1), float("nan")),
            torch.rand(2, 3, 4),
            None,
            ValueError,
            r"`logits` / `pred_boxes` contain",
        ),
        (torch.zeros(2, 3, 1), torch.rand(2, 3, 4), [], ValueError, r"`targets` has 0 entries.*batch size 2"),
        (torch.zeros(2, 3, 1), torch.rand(2, 3, 4), [{"labels": 1}] * 2, ValueError, r"`targets\[0\]` must be a dict"),
    ],
)
def test_matcher_rejects_bad_input(logits, pred_boxes, targets, error, match):
    with pytest.raises(error, match=match):
        HungarianMatcher()(logits, pred_boxes, _targets() if targets is None else targets)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (
            {"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 4)},
            r"`targets\[0\]\['class_labels'\]` must lie in",
        ),
        ({"class_labels": torch.tensor([0]), "boxes": torch.rand(2, 4)}, r"`targets\[0\]\['boxes'\]` must have shape"),
        ({"class_labels": torch.tensor([0.0]), "boxes": torch.rand(1, 4)}, r"must be an integer tensor"),
        (
            {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])},
            r"`targets\[0\]\['boxes'\]` must be normalized cxcywh with w, h >= 0",
        ),
        ({"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, float("nan"), 0.1, 0.2]])}, r"NaN"),
    ],
)
def test_matcher_rejects_bad_targets(target, match):
    with pytest.raises(ValueError, match=match):
        HungarianMatcher()(torch.zeros(1, 3, 1), torch.rand(1, 3, 4), [target])


# ---------------------------------------------------------------------------------------------------- criterion


def test_criterion_hand_computed_single_pair():
    # One query, one target: logit 0 (p = 0.5), box off by 0.1 in cx.
    outputs = {"logits": torch.zeros(1, 1, 1), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    losses = SetCriterion(HungarianMatcher())(outputs, targets)
    # focal: alpha * CE * (1 - p)^gamma = 0.25 * ln 2 * 0.25
    assert float(losses["loss_ce"]) == pytest.approx(0.25 * math.log(2) * 0.25, rel=1e-5)
    assert float(losses["loss_bbox"]) == pytest.approx(0.1, rel=1e-5)
    # xyxy [0.4,0.4,0.6,0.6] vs [0.5,0.4,0.7,0.6]: IoU = 0.02 / 0.06, enclosing area = union -> GIoU = 1/3
    assert float(losses["loss_giou"]) == pytest.approx(2 / 3, rel=1e-5)
    expected_total = 2.0 * losses["loss_ce"] + 5.0 * losses["loss_bbox"] + 2.0 * losses["loss_giou"]
    torch.testing.assert_close(losses["loss"], expected_total)


def _perfect_and_wrong_outputs():
    targets = _targets()
    logits = torch.full((2, 3, 1), -20.0)
    logits[0, [0, 2]] = 20.0
    pred_boxes = torch.full((2, 3, 4), 0.5)
    pred_boxes[0, 0] = targets[0]["boxes"][1]
    pred_boxes[0, 2] = targets[0]["boxes"][0]
    perfect = {"logits": logits, "pred_boxes": pred_boxes}
    wrong = {"logits": -logits, "pred_boxes": pred_boxes.flip(-1) * 0.5}
    return perfect, wrong, targets


def test_criterion_is_near_zero_for_perfect_predictions_and_larger_for_wrong_ones():
    perfect, wrong, targets = _perfect_and_wrong_outputs()
    criterion = SetCriterion(HungarianMatcher())
    perfect_losses = criterion(perfect, targets)
    wrong_losses = criterion(wrong, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss"):
        assert float(perfect_losses[name]) < 1e-5, name
        assert float(wrong_losses[name]) > 0.1, name


def test_criterion_names_aux_and_encoder_terms_and_weights_them():
    perfect, wrong, targets = _perfect_and_wrong_outputs()
    outputs = dict(wrong, aux_outputs=[dict(perfect), dict(wrong)], enc_outputs=dict(wrong))
    criterion = SetCriterion(HungarianMatcher(), weight_dict={"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 0.0})
    losses = criterion(outputs, targets)
    names = {
        f"{base}{suffix}" for base in ("loss_ce", "loss_bbox", "loss_giou") for suffix in ("", "_0", "_1", "_enc")
    }
    assert set(losses) == names | {"loss"}
    # The aux layer 0 is perfect, layer 1 and the encoder equal the last layer.
    assert float(losses["loss_bbox_0"]) < 1e-5
    torch.testing.assert_close(losses["loss_bbox_1"], losses["loss_bbox"])
    torch.testing.assert_close(losses["loss_bbox_enc"], losses["loss_bbox"])
    expected = sum(
        2.0 * losses[f"loss_ce{suffix}"] + 5.0 * losses[f"loss_bbox{suffix}"] for suffix in ("", "_0", "_1", "_enc")
    )
    torch.testing.assert_close(losses["loss"], expected)
    # A suffixed key overrides the base weight of one layer only.
    only_enc = SetCriterion(HungarianMatcher(), weight_dict={"loss_bbox_enc": 1.0})(outputs, targets)
    torch.testing.assert_close(only_enc["loss"], only_enc["loss_bbox_enc"])


def test_criterion_accepts_transformers_auxiliary_outputs_key():
    perfect, wrong, targets = _perfect_and_wrong_outputs()
    losses = SetCriterion(HungarianMatcher())(dict(wrong, auxiliary_outputs=[perfect]), targets)
    assert float(losses["loss_giou_0"]) < 1e-5


def test_criterion_encoder_targets_are_class_agnostic():
    # With 3 classes, the encoder proposals are scored as objectness: label 2 becomes 0 for the encoder term.
    targets = [{"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits = torch.full((1, 1, 3), -20.0)
    logits[0, 0, 2] = 20.0
    encoder_logits = torch.full((1, 1, 3), -20.0)
    encoder_logits[0, 0, 0] = 20.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    outputs = {"logits": logits, "pred_boxes": boxes, "enc_outputs": {"logits": encoder_logits, "pred_boxes": boxes}}
    losses = SetCriterion(HungarianMatcher(), num_classes=3)(outputs, targets)
    assert float(losses["loss_ce"]) < 1e-5 and float(losses["loss_ce_enc"]) < 1e-5


def test_criterion_gradients_reach_logits_and_boxes():
    _, wrong, targets = _perfect_and_wrong_outputs()
    logits = wrong["logits"].clone().requires_grad_(True)
    pred_boxes = torch.rand(2, 3, 4).mul(0.3).add(0.2).requires_grad_(True)
    SetCriterion(HungarianMatcher())({"logits": logits, "pred_boxes": pred_boxes}, targets)["loss"].backward()
    assert logits.grad.abs().sum() > 0
    # Box losses only touch matched queries: image 0 queries from the match, nothing in image 1.
    assert pred_boxes.grad[1].abs().sum() == 0
    assert pred_boxes.grad[0].abs().sum() > 0


def test_criterion_normalises_by_number_of_boxes():
    _, wrong, targets = _perfect_and_wrong_outputs()
    criterion = SetCriterion(HungarianMatcher())
    default = criterion(wrong, targets)  # 2 target boxes
    explicit = criterion(wrong, targets, num_boxes=4.0)
    torch.testing.assert_close(explicit["loss_bbox"], default["loss_bbox"] / 2)
    no_targets = criterion(wrong, [_targets()[1], _targets()[1]])
    # Nothing is matched: no box loss, and the focal term (every query is a negative) is normalised by 1.
    assert float(no_targets["loss_bbox"]) == 0.0 and float(no_targets["loss_giou"]) == 0.0
    assert float(no_targets["loss_ce"]) > 0


def test_criterion_agrees_with_transformers_deformable_detr_loss():
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 2, generator=generator)
    pred_boxes = torch.rand(2, 5, 4, generator=generator) * 0.4 + 0.2
    targets = [
        {"class_labels": torch.tensor([0, 1, 1]), "boxes": torch.rand(3, 4, generator=generator) * 0.4 + 0.2},
        {"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=generator) * 0.4 + 0.2},
    ]
    reference = DeformableDetrImageLoss(
        matcher=DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0),
        num_classes=2,
        focal_alpha=0.25,
        losses=["labels", "boxes"],
    )({"logits": logits, "pred_boxes": pred_boxes}, targets)
    ours = SetCriterion(HungarianMatcher(), num_classes=2)({"logits": logits, "pred_boxes": pred_boxes}, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(ours[name], reference[name], msg=name)


@pytest.mark.parametrize(
    ("outputs", "error", "match"),
    [
        ({"logits": torch.zeros(2, 3, 1)}, ValueError, r"`outputs` must be a dict with 'logits'"),
        ({"logits": torch.zeros(2, 3, 2), "pred_boxes": torch.rand(2, 3, 4)}, ValueError, r"has 2 classes.*=1"),
        ({"logits": torch.zeros(2, 3, 1), "pred_boxes": torch.rand(2, 3)}, ValueError, r"`outputs\['pred_boxes'\]`"),
        (
            {"logits": torch.zeros(2, 3, 1), "pred_boxes": torch.rand(2, 3, 4), "aux_outputs": [{"logits": 1}]},
            ValueError,
            r"`outputs\['aux_outputs'\]\[0\]` must be a dict",
        ),
        (
            {
                "logits": torch.zeros(2, 3, 1),
                "pred_boxes": torch.rand(2, 3, 4),
                "enc_outputs": {"logits": torch.zeros(2, 3, 1), "pred_boxes": torch.rand(2, 4, 4)},
            },
            ValueError,
            r"`outputs\['enc_outputs'\]\['pred_boxes'\]` must have shape",
        ),
    ],
)
def test_criterion_rejects_bad_outputs(outputs, error, match):
    with pytest.raises(error, match=match):
        SetCriterion(HungarianMatcher())(outputs, _targets())


def test_criterion_rejects_bad_config():
    with pytest.raises(ValueError, match=r"`weight_dict` key 'loss_cls' is not a loss name"):
        SetCriterion(HungarianMatcher(), weight_dict={"loss_cls": 1.0})
    with pytest.raises(TypeError, match=r"`matcher` must be a HungarianMatcher"):
        SetCriterion(matcher=None)
    with pytest.raises(ValueError, match=r"`num_classes` must be an integer >= 1"):
        SetCriterion(HungarianMatcher(), num_classes=0)
    with pytest.raises(ValueError, match=r"`bbox_cost` must be a non-negative number"):
        HungarianMatcher(bbox_cost=-1.0)


# ---------------------------------------------------------------------------------------------------- mask losses


def test_dice_of_identical_masks_is_zero_and_of_disjoint_masks_hand_computed():
    targets = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]])
    perfect_logits = (targets * 2 - 1) * 100  # sigmoid = the targets
    assert float(dice_loss(perfect_logits, targets)) == pytest.approx(0.0, abs=1e-6)
    # All-negative prediction against a full 4-pixel mask: 1 - (0 + 1) / (0 + 4 + 1) = 0.8.
    assert float(dice_loss(torch.full((1, 4), -100.0), torch.ones(1, 4))) == pytest.approx(0.8, abs=1e-6)
    # smooth keeps an empty target with an empty prediction at 0.
    assert float(dice_loss(torch.full((1, 4), -100.0), torch.zeros(1, 4))) == pytest.approx(0.0, abs=1e-6)


def test_bce_and_focal_hand_computed_and_normalised_per_mask():
    logits = torch.zeros(3, 2, 2)
    targets = torch.ones(3, 2, 2)
    # p = 0.5: BCE = ln 2 per pixel, focal = alpha * ln 2 * (1 - p)^2.
    assert float(bce_mask_loss(logits, targets)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(sigmoid_focal_mask_loss(logits, targets)) == pytest.approx(0.25 * math.log(2) * 0.25, rel=1e-6)
    # Summed over 3 masks, divided by num_masks.
    assert float(bce_mask_loss(logits, targets, num_masks=6)) == pytest.approx(math.log(2) / 2, rel=1e-6)
    # Negative pixels weigh (1 - alpha).
    negatives = sigmoid_focal_mask_loss(logits, torch.zeros(3, 4).view(3, 2, 2))
    assert float(negatives) == pytest.approx(0.75 * math.log(2) * 0.25, rel=1e-6)


def test_mask_losses_accept_flat_and_bool_masks_and_give_gradients():
    logits = torch.randn(2, 6, requires_grad=True)
    targets = torch.rand(2, 6) > 0.5
    loss = MaskLoss(focal_weight=20.0, dice_weight=1.0)(logits, targets)
    assert set(loss) == {"loss_mask_focal", "loss_mask_dice", "loss"}
    torch.testing.assert_close(loss["loss"], 20.0 * loss["loss_mask_focal"] + loss["loss_mask_dice"])
    loss["loss"].backward()
    assert logits.grad.abs().sum() > 0
    ullava = MaskLoss(bce_weight=2.0, dice_weight=0.5)(logits.detach(), targets.float())
    assert set(ullava) == {"loss_mask_bce", "loss_mask_dice", "loss"}


def test_perfect_masks_score_lower_than_wrong_masks():
    targets = (torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    criterion = MaskLoss(focal_weight=1.0, bce_weight=1.0, dice_weight=1.0)
    perfect = criterion((targets * 2 - 1) * 20, targets)["loss"]
    wrong = criterion((1 - targets * 2) * 20, targets)["loss"]
    assert float(perfect) < 1e-3 < float(wrong)


@pytest.mark.parametrize(
    ("logits", "targets", "kwargs", "error", "match"),
    [
        (torch.zeros(2, 4), torch.zeros(2, 5), {}, ValueError, r"`targets` must have the same shape as `logits`"),
        (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), {}, TypeError, r"`logits` must be floating point"),
        (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long), {}, TypeError, r"`targets` must be a float"),
        (torch.zeros(0, 4, 4), torch.zeros(0, 4, 4), {}, ValueError, r"`logits` is empty"),
        (torch.zeros(4), torch.zeros(4), {}, ValueError, r"`logits` must have shape \(N, H, W\) or \(N, H\*W\)"),
        (torch.zeros(2, 4), torch.zeros(2, 4), {"num_masks": 0}, ValueError, r"`num_masks` must be a positive number"),
        (torch.zeros(2, 4), [[0.0] * 4] * 2, {}, TypeError, r"`logits` and `targets` must be tensors"),
    ],
)
@pytest.mark.parametrize("loss_function", [sigmoid_focal_mask_loss, dice_loss, bce_mask_loss])
def test_mask_losses_reject_bad_input(loss_function, logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        loss_function(logits, targets, **kwargs)


def test_mask_loss_needs_a_positive_weight():
    with pytest.raises(ValueError, match=r"`focal_weight`, `bce_weight` or `dice_weight`"):
        MaskLoss()
    with pytest.raises(ValueError, match=r"`dice_weight` must be a non-negative number"):
        MaskLoss(dice_weight=-1.0)


def test_matcher_survives_degenerate_boxes():
    # Zero-area prediction and target give an undefined GIoU; the matcher must still return an assignment.
    pred_boxes = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1]]])
    targets = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.0]])}]
    pred_indices, target_indices = HungarianMatcher()(torch.zeros(1, 2, 1), pred_boxes, targets)[0]
    assert target_indices.tolist() == [0] and len(pred_indices) == 1
