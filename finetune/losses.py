"""Multi-label losses: BCE with logits (optional ``pos_weight``) and sigmoid focal loss.

The trainer calls these on fp32 logits outside autocast: ``log(sigmoid(x))`` in fp16 underflows to NaN.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
        """Mean focal loss of ``logits`` against multi-hot ``targets`` (same shape)."""
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce * (1 - p_t) ** self.gamma
        if self.alpha >= 0:
            loss = (self.alpha * targets + (1 - self.alpha) * (1 - targets)) * loss
        return loss.mean()

    def extra_repr(self) -> str:
        """Settings shown in ``repr``."""
        return f"alpha={self.alpha}, gamma={self.gamma}"


def auto_pos_weight(targets: np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """Per-class ``negatives / positives`` from training targets, clipped to ``[1, max_weight]``.

    A class with no positives gets 1 (there is nothing to up-weight). Clipping keeps very rare classes from
    dominating the gradient.
    """
    pos = targets.sum(0)
    neg = targets.shape[0] - pos
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(ratio, 1.0, max_weight), dtype=torch.float32)


def create_loss(
    name: str,
    num_classes: int,
    pos_weight: str | float | list[float] = "none",
    train_targets: np.ndarray | None = None,
    pos_weight_max: float = 100.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> nn.Module:
    """The loss module for a recipe's ``[loss]`` settings.

    Args:
        name: ``"bce"`` or ``"focal"``.
        num_classes: Number of outputs (checks a per-class ``pos_weight`` list).
        pos_weight: ``"none"``, ``"auto"`` (from ``train_targets``), one number, or one per class.
        train_targets: Training multi-hot targets, needed for ``"auto"``.
        pos_weight_max: Upper clip for ``"auto"``.
        alpha: Focal alpha.
        gamma: Focal gamma.

    Returns:
        A module called as ``loss(logits, targets)``.
    """
    from finetune.errors import UserError

    if name == "focal":
        return FocalLoss(alpha, gamma)
    if pos_weight == "none":
        return nn.BCEWithLogitsLoss()
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
    return nn.BCEWithLogitsLoss(pos_weight=weight)
