"""Multi-label losses: BCE with logits (optional ``pos_weight``), sigmoid focal loss and asymmetric loss (ASL).

The trainer calls these on fp32 logits outside autocast: ``log(sigmoid(x))`` in fp16 underflows to NaN.

Unknown labels ("not checked" for this image and class) are NaN targets: every loss here leaves them out and
averages over the known entries only, so a batch without unknowns gets the plain mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.labels import negatives_of, positives_of


def masked_mean(loss: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of elementwise ``loss`` over the ``known`` entries (0 when none is)."""
    return (loss * known).sum() / known.sum().clamp(min=1)


def _split_known(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets with unknown (NaN) entries set to 0, and the float mask of known entries."""
    known = ~torch.isnan(targets)
    return torch.where(known, targets, torch.zeros_like(targets)), known.to(targets.dtype)


class BCELoss(nn.Module):
    """Binary cross-entropy with logits (optional per-class ``pos_weight``), averaged over the known entries.

    Without unknown labels it equals ``torch.nn.BCEWithLogitsLoss`` (the tests check both cases).
    """

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean BCE of ``logits`` against multi-hot ``targets`` (same shape; NaN = unknown)."""
        t, known = _split_known(targets)
        loss = F.binary_cross_entropy_with_logits(logits, t, pos_weight=self.pos_weight, reduction="none")
        return masked_mean(loss, known)


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al., 2017), averaged over all elements like torchvision's ``reduction="mean"``.

    Written out rather than calling ``torchvision.ops.sigmoid_focal_loss`` so it is a module with its settings in
    ``repr`` and so the test against torchvision is an independent check.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean focal loss of ``logits`` against multi-hot ``targets`` (same shape; NaN = unknown)."""
        targets, known = _split_known(targets)
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * (1 - p_t) ** self.gamma
        if self.alpha >= 0:
            loss = (self.alpha * targets + (1 - self.alpha) * (1 - targets)) * loss
        return masked_mean(loss, known)

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return f"alpha={self.alpha}, gamma={self.gamma}"


def auto_pos_weight(targets: np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """Per-class ``negatives / positives`` from training targets, clipped to ``[1, max_weight]``.

    A class with no positives gets 1 (there is nothing to up-weight). Clipping keeps very rare classes from
    dominating the gradient. Unknown (NaN) entries are neither.
    """
    pos, neg = positives_of(targets).sum(0), negatives_of(targets).sum(0)
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(ratio, 1.0, max_weight), dtype=torch.float32)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss for multi-label classification (Ridnik et al., ICCV 2021), averaged over all elements.

    ``L = -[y (1-p)^gamma_pos log(p) + (1-y) p_m^gamma_neg log(1-p_m)]`` with the shifted negative probability
    ``p_m = max(p - clip, 0)``: easy negatives are down-weighted and the easiest are discarded. The formula is timm's
    ``AsymmetricLossMultiLabel`` (which the test compares against); timm defaults to sum / batch size, this is the
    mean over all elements, so its scale matches BCE's and does not grow with the class count.
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean ASL of ``logits`` against multi-hot ``targets`` (same shape; NaN = unknown)."""
        targets, known = _split_known(targets)
        p = torch.sigmoid(logits)
        p_neg = 1 - p
        if self.clip > 0:
            p_neg = (p_neg + self.clip).clamp(max=1)  # = 1 - max(p - clip, 0)
        loss = targets * torch.log(p.clamp(min=self.eps)) + (1 - targets) * torch.log(p_neg.clamp(min=self.eps))
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            p_t = p * targets + p_neg * (1 - targets)
            gamma = self.gamma_pos * targets + self.gamma_neg * (1 - targets)
            loss = loss * torch.pow(1 - p_t, gamma)
        return -masked_mean(loss, known)

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}"


def create_loss(
    name: str,
    num_classes: int,
    pos_weight: str | float | list[float] = "none",
    train_targets: np.ndarray | None = None,
    pos_weight_max: float = 100.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
) -> nn.Module:
    """The loss module for a recipe's ``[loss]`` settings.

    Args:
        name: ``"bce"``, ``"focal"`` or ``"asl"``.
        num_classes: Number of outputs (checks a per-class ``pos_weight`` list).
        pos_weight: ``"none"``, ``"auto"`` (from ``train_targets``), one number, or one per class.
        train_targets: Training multi-hot targets, needed for ``"auto"``.
        pos_weight_max: Upper clip for ``"auto"``.
        alpha: Focal alpha.
        gamma: Focal gamma.
        gamma_neg: ASL focusing for negatives.
        gamma_pos: ASL focusing for positives.
        clip: ASL probability margin for negatives.

    Returns:
        A module called as ``loss(logits, targets)``.
    """
    from finetune.errors import UserError

    if name == "focal":
        return FocalLoss(alpha, gamma)
    if name == "asl":
        return AsymmetricLoss(gamma_neg, gamma_pos, clip)
    if pos_weight == "none":
        return BCELoss()
    if pos_weight == "auto":
        if train_targets is None:
            raise ValueError("pos_weight='auto' needs train_targets")
        weight = auto_pos_weight(train_targets, pos_weight_max)
    elif isinstance(pos_weight, list):
        if len(pos_weight) != num_classes:
            raise UserError(f"loss.pos_weight: {len(pos_weight)} values for {num_classes} classes")
        weight = torch.tensor(pos_weight, dtype=torch.float32)
    else:
        weight = torch.full((num_classes,), float(pos_weight))
    return BCELoss(pos_weight=weight)
