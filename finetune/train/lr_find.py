"""The LR range test (Smith 2017; fastai's ``lr_find``, Lightning's ``Tuner.lr_find``) on one stage's groups.

The learning rate grows exponentially from ``start`` to ``end`` over at most ``steps`` training batches, each group
at its stage multiplier; the loss is smoothed (exponential moving average, bias-corrected) and the sweep stops
once it passes 4x its minimum. The suggestion is the LR at the steepest descent of the smoothed loss (fastai's
``steep``), and ``min / 10`` is printed beside it. Every weight and buffer (BatchNorm statistics included) is put
back afterwards: the test changes nothing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.data.dataset import batch_images
from finetune.precision import autocast


@dataclass
class LrFindResult:
    """The sweep: LRs, raw and smoothed losses, and the suggestions."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    steep: float = float("nan")
    min_div_10: float = float("nan")


def lr_range_test(
    model: nn.Module,
    loader: Any,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    multipliers: dict[str, float],
    forward: Any = None,
    device: torch.device,
    precision: str = "fp32",
    start: float = 1e-7,
    end: float = 1.0,
    steps: int = 100,
) -> LrFindResult:
    """Run the sweep, each optimizer group at ``lr x multipliers[its layer group]``; restores every weight."""
    saved = copy.deepcopy(model.state_dict())
    forward = forward or model
    result, avg, best = LrFindResult(), 0.0, math.inf
    model.train()
    try:
        batches = _cycle(loader)
        for i in range(steps):
            lr = start * (end / start) ** (i / max(steps - 1, 1))
            for g in optimizer.param_groups:
                g["lr"] = lr * multipliers.get(g.get("group_name", "all").removesuffix(".no_decay"), 1.0)
            batch = next(batches)
            with autocast(device, precision):
                logits = forward(batch_images(batch, device))
            loss = loss_fn(logits.float(), batch["target"].to(device).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                break
            avg = 0.98 * avg + 0.02 * value
            smooth = avg / (1 - 0.98 ** (i + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smooth)
            best = min(best, smooth)
            if smooth > 4 * best and i > 10:
                break
    finally:
        model.load_state_dict(saved)
        optimizer.zero_grad(set_to_none=True)
    _suggest(result)
    return result


def _cycle(loader: Any) -> Any:
    while True:
        yielded = False
        for batch in loader:
            if "image" in batch:
                yielded = True
                yield batch
        if not yielded:
            raise ValueError("no readable image in the training split")


def _suggest(result: LrFindResult) -> None:
    if len(result.lrs) < 3:
        return
    lrs, smooth = np.log10(result.lrs), np.asarray(result.smoothed)
    cut = max(3, int(np.argmin(smooth)) + 1)
    slope = np.gradient(smooth[:cut], lrs[:cut])
    result.steep = float(result.lrs[int(np.argmin(slope))])
    result.min_div_10 = float(result.lrs[int(np.argmin(smooth))] / 10)
