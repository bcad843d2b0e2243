"""Per-mask segmentation losses: sigmoid focal, binary cross-entropy and dice.

u-LLaVA (section 3.2, eq. 2) trains its SAM mask decoder from the [SEG] state with ``BCE + dice`` (LISA-style), and TAP-v2
(section 3.1) supervises its promptable mask decoder with ``focal + dice`` (SAM-style, 20:1). Both average each term
per mask and then over the masks of the batch; this module provides exactly those terms and a weighted combination.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sigmoid_focal_mask_loss", "dice_loss", "bce_mask_loss", "MaskLoss"]


def _flatten_masks(
    logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Check inputs and return ``(N, P)`` float logits, ``(N, P)`` float targets and the normaliser."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"`logits` and `targets` must be tensors; got {type(logits).__name__} and {type(targets).__name__}."
        )
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be floating point mask logits; got {logits.dtype}. Use `logits.float()`.")
    if targets.dtype == torch.bool:
        targets = targets.to(logits.dtype)
    if not targets.is_floating_point():
        raise TypeError(
            f"`targets` must be a float (or bool) mask with values in {{0, 1}}; got {targets.dtype}. "
            f"Use `targets.float()`."
        )
    if logits.ndim not in (2, 3):
        raise ValueError(f"`logits` must have shape (N, H, W) or (N, H*W); got {tuple(logits.shape)}.")
    if targets.shape != logits.shape:
        raise ValueError(
            f"`targets` must have the same shape as `logits` {tuple(logits.shape)}; got {tuple(targets.shape)}. "
            f"Resize the ground-truth masks to the predicted mask resolution first."
        )
    if logits.shape[0] == 0 or logits[0].numel() == 0:
        raise ValueError(
            f"`logits` is empty (shape {tuple(logits.shape)}); skip the mask loss for a batch without masks."
        )
    if num_masks is None:
        num_masks = float(logits.shape[0])
    elif not isinstance(num_masks, numbers.Real) or isinstance(num_masks, bool) or not num_masks > 0:
        raise ValueError(f"`num_masks` must be a positive number; got {num_masks!r}.")
    targets = targets.to(logits.dtype)
    return logits.flatten(1), targets.flatten(1), float(num_masks)


def sigmoid_focal_mask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss, averaged over the pixels of each mask, summed over masks, divided by ``num_masks``.

    Args:
        logits: ``(N, H, W)`` or ``(N, H * W)`` float mask logits.
        targets: same shape, float (or bool) ground truth in ``{0, 1}``.
        num_masks: normaliser (e.g. the masks across all processes); ``None`` means ``N``.
        alpha: weight of the positive pixels (``< 0`` disables the weighting); gamma: focusing exponent.

    Returns:
        Scalar loss in the dtype of ``logits``.
    """
    logits, targets, num_masks = _flatten_masks(logits, targets, num_masks)
    probabilities = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    probability_of_truth = probabilities * targets + (1 - probabilities) * (1 - targets)
    loss = cross_entropy * (1 - probability_of_truth) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(dim=1).sum() / num_masks


def dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_masks: float | None = None,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft dice loss ``1 - (2 |p * t| + smooth) / (|p| + |t| + smooth)`` per mask, summed, divided by ``num_masks``.

    Args:
        logits: ``(N, H, W)`` or ``(N, H * W)`` float mask logits (``p = sigmoid(logits)``).
        targets: same shape, float (or bool) ground truth in ``{0, 1}``.
        num_masks: normaliser; ``None`` means ``N``.
        smooth: added to numerator and denominator so empty masks give a finite loss (DETR / SAM use 1).

    Returns:
        Scalar loss in ``[0, 1]`` per mask on average; 0 when the predicted probabilities equal the targets.
    """
    logits, targets, num_masks = _flatten_masks(logits, targets, num_masks)
    probabilities = logits.sigmoid()
    intersection = (probabilities * targets).sum(dim=1)
    total = probabilities.sum(dim=1) + targets.sum(dim=1)
    loss = 1 - (2 * intersection + smooth) / (total + smooth)
    return loss.sum() / num_masks


def bce_mask_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the pixels of each mask, summed, divided by ``num_masks``.

    Args:
        logits: ``(N, H, W)`` or ``(N, H * W)`` float mask logits.
        targets: same shape, float (or bool) ground truth in ``{0, 1}``.
        num_masks: normaliser; ``None`` means ``N``.
    """
    logits, targets, num_masks = _flatten_masks(logits, targets, num_masks)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(dim=1).sum() / num_masks


class MaskLoss(nn.Module):
    """Weighted sum of the mask losses, every enabled term reported by name.

    Args:
        focal_weight: weight of :func:`sigmoid_focal_mask_loss` (TAP / SAM: 20).
        bce_weight: weight of :func:`bce_mask_loss` (u-LLaVA / LISA: 2).
        dice_weight: weight of :func:`dice_loss` (TAP / SAM: 1, u-LLaVA / LISA: 0.5).
        focal_alpha, focal_gamma, dice_smooth: passed to the functions.

    Terms with weight 0 are not computed. At least one weight must be positive.
    """

    def __init__(
        self,
        focal_weight: float = 0.0,
        bce_weight: float = 0.0,
        dice_weight: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        dice_smooth: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (("focal_weight", focal_weight), ("bce_weight", bce_weight), ("dice_weight", dice_weight)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number; got {value!r}.")
        if focal_weight == 0 and bce_weight == 0 and dice_weight == 0:
            raise ValueError(
                "MaskLoss needs at least one positive weight: set `focal_weight`, `bce_weight` or `dice_weight`."
            )
        self.focal_weight = float(focal_weight)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.dice_smooth = float(dice_smooth)

    def extra_repr(self) -> str:
        return f"focal_weight={self.focal_weight}, bce_weight={self.bce_weight}, dice_weight={self.dice_weight}"

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, num_masks: float | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute the enabled terms.

        Args:
            logits: ``(N, H, W)`` or ``(N, H * W)`` float mask logits; targets: same shape in ``{0, 1}``.
            num_masks: normaliser; ``None`` means ``N``.

        Returns:
            Unweighted scalars ``loss_mask_focal`` / ``loss_mask_bce`` / ``loss_mask_dice`` (the enabled ones) and
            ``loss``, their weighted sum.
        """
        losses: dict[str, torch.Tensor] = {}
        total = 0.0
        if self.focal_weight > 0:
            losses["loss_mask_focal"] = sigmoid_focal_mask_loss(
                logits, targets, num_masks, alpha=self.focal_alpha, gamma=self.focal_gamma
            )
            total = total + self.focal_weight * losses["loss_mask_focal"]
        if self.bce_weight > 0:
            losses["loss_mask_bce"] = bce_mask_loss(logits, targets, num_masks)
            total = total + self.bce_weight * losses["loss_mask_bce"]
        if self.dice_weight > 0:
            losses["loss_mask_dice"] = dice_loss(logits, targets, num_masks, smooth=self.dice_smooth)
            total = total + self.dice_weight * losses["loss_mask_dice"]
        losses["loss"] = total
        return losses
