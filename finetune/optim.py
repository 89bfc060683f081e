"""Parameter groups (discriminative LRs, no decay on norm and bias), the optimizer, and the warmup + cosine schedule.

Every layer group is in the optimizer from the start, frozen or not: torch's optimizers skip a parameter whose
``.grad`` is None, so a frozen group is untouched (no step, no weight decay) and unfreezing it later needs no new
optimizer group. timm's ``param_groups_layer_decay`` is not used because it drops ``requires_grad=False`` parameters
and decays per block rather than per layer group; the rule here is the same geometric one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from finetune.groups import LayerGroup, resolve


def group_multipliers(
    groups: list[LayerGroup], layer_decay: float = 1.0, lr_mult: dict[str, float] | None = None
) -> dict[str, float]:
    """LR multiplier per group: ``layer_decay ** (distance from the classifier)``, or explicit ``lr_mult`` entries.

    Args:
        groups: Layer groups in forward order (the classifier last).
        layer_decay: Geometric decay per group going down from the classifier (1.0 = off).
        lr_mult: Selector -> multiplier (``{"stem": 0.01, "blocks.0:4": 0.1}``); later entries win; groups not
            named get 1.0.

    Returns:
        Group name -> multiplier.
    """
    last = len(groups) - 1
    mult = {g.name: layer_decay ** (last - g.index) for g in groups}
    for sel, value in (lr_mult or {}).items():
        for name in resolve([sel], groups, f"optim.lr_mult.{sel}"):
            mult[name] = value
    return mult


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter takes weight decay: weights do; norms and biases (1-d tensors, ``.bias``) do not."""
    return param.ndim > 1 and not name.endswith(".bias")


def param_groups(
    model: nn.Module, groups: list[LayerGroup], multipliers: dict[str, float], lr: float, weight_decay: float
) -> list[dict]:
    """Optimizer groups: per layer group, one with weight decay and one without (1-d tensors: norms and biases)."""
    out = []
    for g in groups:
        decay, no_decay = [], []
        for name in g.params:
            p = model.get_parameter(name)
            (decay if is_decayed(name, p) else no_decay).append(p)
        for params, wd, suffix in ((decay, weight_decay, ""), (no_decay, 0.0, ".no_decay")):
            if params:
                out.append(
                    {
                        "params": params,
                        "lr": lr * multipliers[g.name],
                        "weight_decay": wd,
                        "lr_scale": multipliers[g.name],
                        "group_name": g.name + suffix,
                    }
                )
    return out


def whole_model_groups(model: nn.Module, lr: float, weight_decay: float, head: Sequence[str] = ()) -> list[dict]:
    """For a model without layer groups: decay / no-decay split only (``all``, ``all.no_decay``).

    ``head`` (parameter names) gets groups of its own (``classifier``, ``classifier.no_decay``), for a hook that
    treats the head differently (L2-SP).
    """
    in_head = set(head)
    parts: dict[str, list[torch.Tensor]] = {"all": [], "all.no_decay": [], "classifier": [], "classifier.no_decay": []}
    for n, p in model.named_parameters():
        parts[("classifier" if n in in_head else "all") + ("" if is_decayed(n, p) else ".no_decay")].append(p)
    return [
        {
            "params": params,
            "lr": lr,
            "weight_decay": 0.0 if name.endswith(".no_decay") else weight_decay,
            "lr_scale": 1.0,
            "group_name": name,
        }
        for name, params in parts.items()
        if params or (not in_head and name.startswith("all"))  # without a head split: always the two, as before
    ]


def create_optimizer(
    groups: list[dict], name: str = "adamw", lr: float = 1e-3, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW, or SGD with classic (non-Nesterov) momentum, over prepared parameter groups."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR per layer group (the decayed half of each group; both halves share it)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault(g.get("group_name", "all").removesuffix(".no_decay"), g["lr"])
    return out


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
    """Per-step schedule that scales every parameter group's LR by the same factor (so multipliers are kept)."""

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, total_steps, warmup_steps, warmup_factor, min_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class StagePlan:
    """One stage's optimization: its steps ``[start, start + steps)``, peak LR, warmup, schedule, group multipliers."""

    start: int
    steps: int
    lr: float
    warmup_steps: int
    schedule: str  # cosine | constant
    multipliers: dict[str, float]


def staged_lr(plans: list[StagePlan], group: str, step: int, warmup_factor: float, min_factor: float) -> float:
    """The LR of layer group ``group`` at optimizer step ``step``: each stage warms up and decays on its own."""
    plan = next((p for p in plans if p.start <= step < p.start + p.steps), plans[-1])
    k = step - plan.start
    if plan.schedule == "constant" and k >= plan.warmup_steps:
        factor = 1.0
    else:
        factor = warmup_cosine_factor(k, plan.steps, plan.warmup_steps, warmup_factor, min_factor)
    return plan.lr * plan.multipliers[group] * factor


def create_staged_scheduler(
    optimizer: torch.optim.Optimizer, plans: list[StagePlan], warmup_factor: float = 0.01, min_factor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-group schedule restarting at every stage (its own LR, warmup, schedule and multipliers).

    Every group's base LR is set to 1 so that each lambda returns the LR itself; a lambda depends only on the step,
    so a resumed run (the scheduler's step is in the checkpoint) continues exactly.
    """
    names = []
    for g in optimizer.param_groups:
        g["lr"] = 1.0
        names.append(g["group_name"].removesuffix(".no_decay"))
    lambdas = [partial(staged_lr, plans, name, warmup_factor=warmup_factor, min_factor=min_factor) for name in names]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step, f=f: f(step) for f in lambdas])
