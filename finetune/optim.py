"""Optimizer (timm's factory: no weight decay on norm and bias parameters) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from timm.optim import create_optimizer_v2
from torch import nn


def create_optimizer(
    model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.05, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW or SGD (classic momentum) through ``timm.optim.create_optimizer_v2``.

    timm puts 1-d parameters (norm weights, biases) in a group without weight decay.
    """
    opt = "momentum" if name == "sgd" else name  # timm's "momentum" is SGD with classic momentum
    kwargs = {"momentum": momentum} if name == "sgd" else {}
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, warmup_factor: float, min_factor: float
) -> float:
    """LR multiplier at optimizer step ``step``: linear from ``warmup_factor`` to 1, then cosine to ``min_factor``.

    This is the seed paper's schedule (linear warmup from 0.01 x max LR, then cosine decay).
    """
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    warmup_factor: float = 0.01,
    min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule that scales every parameter group's LR by the same factor."""

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, total_steps, warmup_steps, warmup_factor, min_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
