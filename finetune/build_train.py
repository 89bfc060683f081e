"""``build_*()`` for training: layer groups, freezing schedule and policy, feature cache, optimizer, hooks.

With :mod:`finetune.build`, the only place that reads a recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.build import build_dataset, build_loader
from finetune.config import Recipe, recipe_to_dict
from finetune.data.coco import CocoSplit
from finetune.distributed import DDPHook, Dist, ShardSampler, gather_features
from finetune.ema import EmaHook
from finetune.errors import UserError
from finetune.freezing import FeatureCache, FreezeHook, FreezePolicy, Stage, plan_stages
from finetune.groups import LayerGroup, check_groupable, layer_groups, resolve
from finetune.l2sp import L2SPHook
from finetune.loggers import make_loggers
from finetune.loop import EarlyStopping, Hook
from finetune.optim import (
    StagePlan,
    create_optimizer,
    create_scheduler,
    create_staged_scheduler,
    group_multipliers,
    param_groups,
    whole_model_groups,
)
from finetune.solver import SolverHook
from finetune.trainer import EpochSampler


def _trained_stages(recipe: Recipe) -> list[Any]:
    """The ``[[freeze.stages]]`` that train for epochs (a solver stage takes none)."""
    return [s for s in recipe.freeze.stages if not s.solver]


def build_solver(recipe: Recipe, policy: FreezePolicy | None, splits: dict[str, CocoSplit] | None) -> SolverHook | None:
    """The solver stage's hook, when the first stage is one."""
    f = recipe.freeze
    if not any(s.solver for s in f.stages):
        return None
    if policy is None or splits is None:
        raise UserError(f"freeze.stages[0].solver: {recipe.model.name} has no layer groups to freeze for a probe")
    if recipe.model.head != "linear":
        raise UserError('freeze.stages[0].solver: the solver fits a linear classifier; set model.head = "linear"')
    loaders = {
        role: build_loader(recipe.data, build_dataset(recipe.data, splits[role], False), False)
        for role in ("train", "val")
    }
    return SolverHook(
        policy, loaders["train"], loaders["val"], cs=f.solver_c, select=f.solver_select, seed=recipe.train.seed
    )


def build_hooks(
    recipe: Recipe,
    run_dir: Path,
    *,
    policy: FreezePolicy | None = None,
    cache: FeatureCache | None = None,
    splits: dict[str, CocoSplit] | None = None,
    extra: Sequence[Hook] = (),
    d: Dist | None = None,
) -> list[Hook]:
    """The loop's hooks in order: freezing, the solver stage, DDP, L2-SP, EMA, early stopping, ``extra``, the loggers.

    Under DDP (``d`` with more than one rank) only rank 0 logs.
    """
    t = recipe.train
    hooks: list[Hook] = [FreezeHook(policy, cache)] if policy is not None else []
    solver = build_solver(recipe, policy, splits)
    if solver is not None:
        hooks.append(solver)
    if d is not None and d.enabled:
        hooks.append(DDPHook(d))  # after the hooks that choose loop.forward: it wraps what they chose
    if recipe.optim.l2sp:
        hooks.append(L2SPHook(recipe.optim.l2sp))
    if t.ema:
        hooks.append(EmaHook(t.ema, t.ema_warmup))
    if t.patience:
        hooks.append(EarlyStopping(t.patience))
    name = recipe.output.name or run_dir.name
    if d is not None and not d.main:
        return [*hooks, *extra]
    return [*hooks, *extra, *make_loggers(recipe.log.to, run_dir, name, recipe_to_dict(recipe))]


@dataclass
class StepPlan:
    """How many optimizer steps a run takes."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(recipe: Recipe, n_train: int) -> StepPlan:
    """Batches and optimizer steps per epoch, total steps and warmup steps."""
    bs = recipe.data.batch_size
    batches = n_train // bs if n_train > bs else 1
    steps = math.ceil(batches / recipe.train.accum_steps)
    total = steps * recipe.train.epochs
    warmup = min(total, round(recipe.optim.warmup_epochs * steps))
    return StepPlan(steps, total, warmup)


def needs_groups(recipe: Recipe) -> bool:
    """Whether the recipe asks for layer groups (a freezing schedule or per-group learning rates)."""
    f, o = recipe.freeze, recipe.optim
    return bool(f.stages or f.until or f.bn == "all" or f.cache_features or o.layer_decay != 1.0 or o.lr_mult)


def build_groups(recipe: Recipe, model: nn.Module) -> list[LayerGroup] | None:
    """The model's layer groups; None for a model without them when the recipe does not need them."""
    try:
        check_groupable(model, recipe.model.name)
    except UserError:
        if needs_groups(recipe):
            raise
        return None
    return layer_groups(model, recipe.model.name)


def build_stages(recipe: Recipe, groups: list[LayerGroup]) -> list[Stage]:
    """The freezing schedule from ``[freeze]``: its stages, ``until``, or one stage training everything."""
    f, epochs = recipe.freeze, recipe.train.epochs
    names = [g.name for g in groups]
    trained = [(i, s) for i, s in enumerate(f.stages) if not s.solver]  # indexes kept for error messages
    if trained:
        try:
            ranges = plan_stages([(s.epochs, s.train) for _, s in trained], epochs)
        except ValueError as err:
            raise UserError(str(err)) from None
        return [
            Stage(a, b, tuple(resolve(s.train, groups, f"freeze.stages[{i}].train")))
            for (i, s), (a, b) in zip(trained, ranges)
        ]
    if f.until:
        last = max(names.index(n) for n in resolve([f.until], groups, "freeze.until"))
        if last == len(names) - 1:
            raise UserError(f"freeze.until: freezing up to {f.until!r} leaves nothing to train; name a lower group")
        return [Stage(0, epochs, tuple(names[last + 1 :]))]
    return [Stage(0, epochs, tuple(names))]


def build_policy(recipe: Recipe, model: nn.Module, groups: list[LayerGroup] | None) -> FreezePolicy | None:
    """The freeze policy (None for a model without layer groups)."""
    if groups is None:
        return None
    return FreezePolicy(model, groups, build_stages(recipe, groups), recipe.freeze.bn, recipe.freeze.train_bn)


def build_feature_cache(
    recipe: Recipe, policy: FreezePolicy | None, split: CocoSplit, d: Dist | None = None
) -> FeatureCache | None:
    """The feature cache for head-only stages when ``freeze.cache_features`` is on and some stage can use it.

    Under DDP each rank extracts its shard; the features are gathered, and each rank trains on its shard of them.
    """
    f = recipe.freeze
    if not f.cache_features or policy is None:
        return None
    if not any(policy.cacheable(s.start) for s in policy.stages):
        raise UserError(
            'freeze.cache_features: no stage trains only ["classifier"] with BN statistics frozen '
            '(freeze.bn = "frozen" or "all", train_bn = false); nothing can be cached'
        )
    augmented = f.cache_augment > 0
    source = build_loader(
        recipe.data,
        build_dataset(recipe.data, split, augmented, recipe.train.seed),
        train=False,
        seed=recipe.train.seed,
        d=d,
    )
    seed, bs = recipe.train.seed, recipe.data.batch_size
    if d is not None and d.enabled:
        return FeatureCache(
            policy,
            source,
            f.cache_augment,
            bs // d.world,
            drop_last=True,
            sampler_factory=lambda n: ShardSampler(n, seed, d.rank, d.world, batch=bs),
            global_batch=bs,
            gather=lambda feats, targets, index: gather_features(feats, targets, index, d),
        )
    return FeatureCache(
        policy, source, f.cache_augment, bs, drop_last=True, sampler_factory=lambda n: EpochSampler(n, seed)
    )


def build_stage_multipliers(recipe: Recipe, groups: list[LayerGroup], stage: int) -> dict[str, float]:
    """LR multiplier per group in trained stage ``stage`` (0-based, solver stages not counted): its own or optim's."""
    o = recipe.optim
    trained = _trained_stages(recipe)
    cfg = trained[stage] if stage < len(trained) else None
    if cfg is None or (cfg.layer_decay is None and cfg.lr_mult is None):
        return group_multipliers(groups, o.layer_decay, o.lr_mult)
    return group_multipliers(groups, cfg.layer_decay or 1.0, cfg.lr_mult)


def build_stage_lr(recipe: Recipe, stage: int) -> float:
    """The peak LR of trained stage ``stage``: its own or ``optim.lr``."""
    trained = _trained_stages(recipe)
    return (trained[stage].lr if stage < len(trained) else None) or recipe.optim.lr


def build_optimizer(
    recipe: Recipe, model: nn.Module, plan: StepPlan, groups: list[LayerGroup] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer over every layer group (frozen ones included) and the per-step warmup + cosine schedule."""
    o = recipe.optim
    if groups is None:
        pgroups = whole_model_groups(model, o.lr, o.weight_decay)
    else:
        pgroups = param_groups(model, groups, group_multipliers(groups, o.layer_decay, o.lr_mult), o.lr, o.weight_decay)
    optimizer = create_optimizer(pgroups, o.name, o.lr, o.momentum)
    trained, spe = _trained_stages(recipe), plan.steps_per_epoch
    if groups is not None and any(s.own_optim for s in trained):
        plans = [
            StagePlan(
                start=st.start * spe,
                steps=(st.end - st.start) * spe,
                lr=build_stage_lr(recipe, i),
                warmup_steps=round((o.warmup_epochs if cfg.warmup_epochs is None else cfg.warmup_epochs) * spe),
                schedule=cfg.schedule or o.schedule,
                multipliers=build_stage_multipliers(recipe, groups, i),
            )
            for i, (cfg, st) in enumerate(zip(trained, build_stages(recipe, groups)))
        ]
        return optimizer, create_staged_scheduler(optimizer, plans, o.warmup_factor, o.min_lr_factor)
    min_factor = 1.0 if o.schedule == "constant" else o.min_lr_factor
    return optimizer, create_scheduler(optimizer, plan.total_steps, plan.warmup_steps, o.warmup_factor, min_factor)


def build_trained_stage_index(recipe: Recipe, stage: int) -> int:
    """The 0-based index among trained stages of ``[[freeze.stages]]`` entry ``stage`` (1-based)."""
    stages = recipe.freeze.stages or [None]
    if not 1 <= stage <= len(stages):
        raise UserError(f"--stage {stage}: the recipe has {len(stages)} stage(s) in [[freeze.stages]]")
    if stages[stage - 1] is not None and stages[stage - 1].solver:
        raise UserError(f"--stage {stage}: a solver stage is solved, not trained; sweep a later stage")
    return sum(1 for s in stages[: stage - 1] if s is None or not s.solver)


def build_probe(
    recipe: Recipe,
    policy: FreezePolicy,
    splits: dict[str, CocoSplit],
    device: torch.device,
    precision: str,
    console: Any,
) -> None:
    """Fit the solver stage's probe into the model now (for tools that look at a later stage, like lr-find)."""
    solver = build_solver(recipe, policy, splits)
    if solver is not None:
        from finetune.build import build_eval_settings

        solver.fit(policy.model, build_eval_settings(recipe, device, precision), console)
