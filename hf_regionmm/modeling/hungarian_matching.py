"""Hungarian matching and the DETR set-prediction loss, in the Deformable-DETR form.

Groma's region proposer (section 3.1) is a class-agnostic two-stage Deformable DETR trained as an objectness detector:
queries are matched one-to-one to ground-truth boxes with the Hungarian algorithm on a cost of
``2 * focal class cost + 5 * L1 + 2 * (-GIoU)``, and the loss is a sigmoid focal loss over all queries plus L1 and
GIoU on the matched pairs, with the same coefficients, applied to the final decoder layer, to every auxiliary decoder
layer and to the encoder's two-stage proposals. ``num_classes = 1`` gives that binary objectness detector; larger
values give an ordinary multi-label Deformable-DETR head.

transformers 5.x no longer exposes its matcher in ``modeling_deformable_detr``; this module stands alone on
``scipy.optimize.linear_sum_assignment`` and ``torchvision.ops`` instead.
"""

from __future__ import annotations

import numbers

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "SetCriterion"]

_LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def _check_predictions(
    logits: torch.Tensor, pred_boxes: torch.Tensor, logits_name: str = "logits", boxes_name: str = "pred_boxes"
) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(pred_boxes, torch.Tensor):
        raise TypeError(
            f"`{logits_name}` and `{boxes_name}` must be tensors; got {type(logits).__name__} and "
            f"{type(pred_boxes).__name__}."
        )
    if not logits.is_floating_point() or not pred_boxes.is_floating_point():
        raise TypeError(
            f"`{logits_name}` and `{boxes_name}` must be floating point; got {logits.dtype} and {pred_boxes.dtype}."
        )
    if logits.ndim != 3:
        raise ValueError(f"`{logits_name}` must have shape (B, Q, K); got {tuple(logits.shape)}.")
    if pred_boxes.ndim != 3 or pred_boxes.shape[-1] != 4 or pred_boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"`{boxes_name}` must have shape (B, Q, 4) = {(*logits.shape[:2], 4)} to match `{logits_name}`; "
            f"got {tuple(pred_boxes.shape)}."
        )


def _check_targets(targets: list[dict[str, torch.Tensor]], batch_size: int, num_classes: int) -> None:
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"`targets` must be a list of dicts, one per image; got {type(targets).__name__}.")
    if len(targets) != batch_size:
        raise ValueError(f"`targets` has {len(targets)} entries but the predictions have batch size {batch_size}.")
    for index, target in enumerate(targets):
        if not isinstance(target, dict) or "class_labels" not in target or "boxes" not in target:
            raise ValueError(
                f"`targets[{index}]` must be a dict with 'class_labels' (n,) and 'boxes' (n, 4) normalized cxcywh; "
                f"got {type(target).__name__} with keys {sorted(target) if isinstance(target, dict) else None}."
            )
        labels, boxes = target["class_labels"], target["boxes"]
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(f"`targets[{index}]['class_labels']` must be an integer tensor of shape (n,).")
        if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
            raise TypeError(f"`targets[{index}]['boxes']` must be a floating point tensor of shape (n, 4).")
        if boxes.shape != (labels.shape[0], 4):
            raise ValueError(
                f"`targets[{index}]['boxes']` must have shape ({labels.shape[0]}, 4) to match 'class_labels'; "
                f"got {tuple(boxes.shape)}."
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"`targets[{index}]['class_labels']` must lie in [0, {num_classes}); got values in "
                f"[{int(labels.min())}, {int(labels.max())}]. Use label 0 for class-agnostic objectness."
            )
        if boxes.numel() and not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"`targets[{index}]['boxes']` contains NaN or inf.")
        if boxes.numel() and bool((boxes[:, 2:] < 0).any()):
            raise ValueError(
                f"`targets[{index}]['boxes']` must be normalized cxcywh with w, h >= 0; got a negative size. "
                f"Convert xyxy boxes with box_xyxy_to_cxcywh."
            )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predicted queries to target boxes (Deformable DETR's focal-cost matcher).

    Args:
        class_cost: weight of the focal classification cost (Groma: 2).
        bbox_cost: weight of the L1 distance between normalized cxcywh boxes (Groma: 5).
        giou_cost: weight of ``-GIoU`` between the boxes in xyxy (Groma: 2).
        focal_alpha, focal_gamma: focal-loss parameters of the class cost (0.25, 2.0).
    """

    def __init__(
        self,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        for name, value in (("class_cost", class_cost), ("bbox_cost", bbox_cost), ("giou_cost", giou_cost)):
            if not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number; got {value!r}.")
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("`class_cost`, `bbox_cost` and `giou_cost` are all 0; at least one must be positive.")
        self.class_cost = float(class_cost)
        self.bbox_cost = float(bbox_cost)
        self.giou_cost = float(giou_cost)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    @torch.no_grad()
    def forward(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
    ) -> list[tuple[torch.LongTensor, torch.LongTensor]]:
        """Match queries to targets image by image.

        Args:
            logits: ``(B, Q, K)`` float class logits (sigmoid, not softmax: there is no "no object" class).
            pred_boxes: ``(B, Q, 4)`` float predicted boxes, normalized cxcywh in ``[0, 1]``.
            targets: ``B`` dicts with ``class_labels`` int64 ``(n_b,)`` in ``[0, K)`` and ``boxes`` float
                ``(n_b, 4)`` normalized cxcywh. ``n_b`` may be 0.

        Returns:
            ``B`` pairs ``(pred_indices, target_indices)``, int64 CPU tensors of equal length ``min(Q, n_b)``;
            ``pred_indices`` are sorted ascending.
        """
        _check_predictions(logits, pred_boxes)
        batch_size, num_queries, num_classes = logits.shape
        _check_targets(targets, batch_size, num_classes)
        if not bool(torch.isfinite(logits).all()) or not bool(torch.isfinite(pred_boxes).all()):
            raise ValueError(
                "`logits` / `pred_boxes` contain NaN or inf; the matcher cannot assign them (check the learning rate "
                "or the inputs of the detection head)."
            )
        sizes = [len(target["boxes"]) for target in targets]
        empty = torch.empty(0, dtype=torch.long)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]

        probabilities = logits.flatten(0, 1).float().sigmoid()
        flat_boxes = pred_boxes.flatten(0, 1).float()
        target_labels = torch.cat([target["class_labels"] for target in targets]).to(logits.device)
        target_boxes = torch.cat([target["boxes"] for target in targets]).to(device=logits.device, dtype=torch.float32)

        # Focal-style class cost: the focal loss of calling the query positive minus that of calling it negative.
        eps = 1e-8
        negative_cost = (1 - self.focal_alpha) * probabilities**self.focal_gamma * (-(1 - probabilities + eps).log())
        positive_cost = self.focal_alpha * (1 - probabilities) ** self.focal_gamma * (-(probabilities + eps).log())
        class_cost = positive_cost[:, target_labels] - negative_cost[:, target_labels]
        bbox_cost = torch.cdist(flat_boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(
            box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(target_boxes), validate=False
        )
        cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
        # A zero-area target against a zero-area prediction has an undefined GIoU; linear_sum_assignment rejects NaN,
        # so such pairs get the largest cost and are matched only when nothing else is left.
        largest = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=largest, posinf=largest, neginf=-largest)
        cost = cost.view(batch_size, num_queries, -1).cpu()

        matches = []
        for image_index, image_cost in enumerate(cost.split(sizes, dim=-1)):
            if sizes[image_index] == 0:
                matches.append((empty, empty))
                continue
            pred_indices, target_indices = linear_sum_assignment(image_cost[image_index].numpy())
            matches.append(
                (torch.as_tensor(pred_indices, dtype=torch.long), torch.as_tensor(target_indices, dtype=torch.long))
            )
        return matches


class SetCriterion(nn.Module):
    """Deformable-DETR set loss: sigmoid focal classification + L1 + GIoU on Hungarian-matched pairs.

    Args:
        matcher: the :class:`HungarianMatcher` that assigns queries to targets.
        num_classes: ``K``, the width of the class logits (Groma's proposer: 1, class-agnostic objectness).
        weight_dict: weight per loss name used for ``"loss"``. Keys are base names (``loss_ce``, ``loss_bbox``,
            ``loss_giou``), which apply to every layer, or suffixed names (``loss_ce_0``, ``loss_giou_enc``) that
            override one layer. A base name left out gives weight 0 (the term is still reported). ``None`` uses
            ``{"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}`` (Groma / Deformable DETR).
        focal_alpha, focal_gamma: sigmoid focal loss parameters (0.25, 2.0).
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        num_classes: int = 1,
        weight_dict: dict[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(matcher, HungarianMatcher):
            raise TypeError(f"`matcher` must be a HungarianMatcher; got {type(matcher).__name__}.")
        if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"`num_classes` must be an integer >= 1 (1 = class-agnostic); got {num_classes!r}.")
        if weight_dict is None:
            weight_dict = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        for key, value in weight_dict.items():
            if not any(key == base or key.startswith(base + "_") for base in _LOSS_NAMES):
                raise ValueError(
                    f"`weight_dict` key {key!r} is not a loss name; use one of {_LOSS_NAMES}, optionally suffixed "
                    f"with _<layer index> or _enc."
                )
            if not isinstance(value, numbers.Real):
                raise ValueError(f"`weight_dict[{key!r}]` must be a number; got {value!r}.")
        self.matcher = matcher
        self.num_classes = int(num_classes)
        self.weight_dict = {key: float(value) for key, value in weight_dict.items()}
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def _weight(self, loss_name: str) -> float:
        if loss_name in self.weight_dict:
            return self.weight_dict[loss_name]
        base = next(base for base in _LOSS_NAMES if loss_name == base or loss_name.startswith(base + "_"))
        return self.weight_dict.get(base, 0.0)

    def _layer_losses(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        num_boxes: float,
    ) -> dict[str, torch.Tensor]:
        matches = self.matcher(logits, pred_boxes, targets)
        batch_index = torch.cat([torch.full_like(pred, image) for image, (pred, _) in enumerate(matches)])
        query_index = torch.cat([pred for pred, _ in matches])
        batch_index, query_index = batch_index.to(logits.device), query_index.to(logits.device)

        target_classes = torch.zeros_like(logits)
        matched_labels = torch.cat(
            [target["class_labels"][target_index] for target, (_, target_index) in zip(targets, matches)]
        ).to(logits.device)
        target_classes[batch_index, query_index, matched_labels] = 1.0
        loss_ce = (
            sigmoid_focal_loss(logits, target_classes, alpha=self.focal_alpha, gamma=self.focal_gamma).sum()
            / num_boxes
        )

        matched_pred_boxes = pred_boxes[batch_index, query_index]
        matched_target_boxes = torch.cat(
            [target["boxes"][target_index] for target, (_, target_index) in zip(targets, matches)]
        ).to(device=pred_boxes.device, dtype=pred_boxes.dtype)
        loss_bbox = (matched_pred_boxes - matched_target_boxes).abs().sum() / num_boxes
        if matched_pred_boxes.shape[0] == 0:
            loss_giou = pred_boxes.sum() * 0.0
        else:
            giou = generalized_box_iou(
                box_cxcywh_to_xyxy(matched_pred_boxes), box_cxcywh_to_xyxy(matched_target_boxes), validate=False
            )
            loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(
        self,
        outputs: dict,
        targets: list[dict[str, torch.Tensor]],
        num_boxes: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute every loss term.

        Args:
            outputs: dict with ``logits`` ``(B, Q, K)`` and ``pred_boxes`` ``(B, Q, 4)`` (normalized cxcywh) of the
                last decoder layer; optionally ``aux_outputs`` (or transformers' name ``auxiliary_outputs``), a list
                of such dicts for the earlier decoder layers, and ``enc_outputs``, such a dict for the encoder's
                two-stage proposals (matched class-agnostically: every target label becomes 0, as in Deformable DETR).
            targets: ``B`` dicts with ``class_labels`` int64 ``(n_b,)`` and ``boxes`` ``(n_b, 4)`` normalized cxcywh.
            num_boxes: normaliser of every term; defaults to the number of target boxes in the batch (at least 1).
                Pass the count averaged over processes when training data-parallel.

        Returns:
            Unweighted scalar terms ``loss_ce``, ``loss_bbox``, ``loss_giou``, the same suffixed ``_{i}`` for
            ``aux_outputs[i]`` and ``_enc`` for ``enc_outputs``, and ``loss``, the weighted sum.
        """
        if not isinstance(outputs, dict) or "logits" not in outputs or "pred_boxes" not in outputs:
            raise ValueError("`outputs` must be a dict with 'logits' (B, Q, K) and 'pred_boxes' (B, Q, 4).")
        layers = [("", outputs)]
        if outputs.get("aux_outputs") is not None and outputs.get("auxiliary_outputs") is not None:
            raise ValueError("`outputs` has both 'aux_outputs' and 'auxiliary_outputs'; pass the decoder layers once.")
        aux_key = "aux_outputs" if outputs.get("aux_outputs") is not None else "auxiliary_outputs"
        for layer, aux in enumerate(outputs.get(aux_key) or []):
            layers.append((f"_{layer}", aux))
        if outputs.get("enc_outputs") is not None:
            layers.append(("_enc", outputs["enc_outputs"]))
        for suffix, layer_outputs in layers:
            where = {"": "outputs", "_enc": "outputs['enc_outputs']"}.get(
                suffix, f"outputs['{aux_key}'][{suffix[1:]}]"
            )
            if (
                not isinstance(layer_outputs, dict)
                or "logits" not in layer_outputs
                or "pred_boxes" not in layer_outputs
            ):
                raise ValueError(f"`{where}` must be a dict with 'logits' (B, Q, K) and 'pred_boxes' (B, Q, 4).")
            logits, pred_boxes = layer_outputs["logits"], layer_outputs["pred_boxes"]
            _check_predictions(logits, pred_boxes, f"{where}['logits']", f"{where}['pred_boxes']")
            if suffix != "_enc" and logits.shape[-1] != self.num_classes:
                raise ValueError(
                    f"`{where}['logits']` has {logits.shape[-1]} classes but the criterion was built with "
                    f"num_classes={self.num_classes}."
                )
        _check_targets(targets, outputs["logits"].shape[0], self.num_classes)
        if num_boxes is None:
            num_boxes = float(sum(len(target["class_labels"]) for target in targets))
        elif not isinstance(num_boxes, numbers.Real) or num_boxes < 0:
            raise ValueError(f"`num_boxes` must be a non-negative number; got {num_boxes!r}.")
        num_boxes = max(float(num_boxes), 1.0)

        # The encoder's two-stage proposals are scored class-agnostically: every target becomes class 0.
        binary_targets = [
            {"class_labels": torch.zeros_like(target["class_labels"]), "boxes": target["boxes"]} for target in targets
        ]
        losses: dict[str, torch.Tensor] = {}
        for suffix, layer_outputs in layers:
            layer_targets = binary_targets if suffix == "_enc" else targets
            layer_losses = self._layer_losses(
                layer_outputs["logits"], layer_outputs["pred_boxes"], layer_targets, num_boxes
            )
            losses.update({f"{name}{suffix}": value for name, value in layer_losses.items()})

        losses["loss"] = sum(self._weight(name) * value for name, value in losses.items())
        return losses
