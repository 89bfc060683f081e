"""The assembly's training parts from ``[model]``, ``[loss]``, ``[optim]`` and ``[freeze]``.

Model, loss, layer groups, the freezing schedule and policy, the feature cache, the optimizer and its schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.config import Recipe
from finetune.data.samplers import EpochSampler, ShardSampler, repeat_factors
from finetune.data.split import Split
from finetune.distributed import Dist, gather_features
from finetune.errors import UserError
from finetune.groups import LayerGroup, check_groupable, layer_groups, resolve
from finetune.hooks.feature_cache import FeatureCache
from finetune.hooks.freezing import FreezePolicy, Stage, plan_stages
from finetune.losses import create_loss
from finetune.models import LoadReport, create_model
from finetune.optim import (
    StagePlan,
    create_optimizer,
    create_scheduler,
    create_staged_scheduler,
    group_multipliers,
    is_decayed,
    param_groups,
    whole_model_groups,
)


def _trained_stages(recipe: Recipe) -> list[Any]:
    """The ``[[freeze.stages]]`` that train for epochs (a solver stage takes none)."""
    return [s for s in recipe.freeze.stages if not s.solver]


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
    recipe: Recipe,
    policy: FreezePolicy | None,
    source: Callable[[bool], torch.utils.data.DataLoader],
    d: Dist | None = None,
) -> FeatureCache | None:
    """The feature cache for head-only stages when ``freeze.cache_features`` is on and some stage can use it.

    ``source(augmented)`` gives the training split's loader in dataset order (this rank's shard under DDP). Under DDP
    each rank extracts its shard; the features are gathered, and each rank trains on its shard of them.
    """
    f = recipe.freeze
    if not (f.cache_features or f.cache_maps) or policy is None:
        return None
    if f.cache_maps and not any(policy.map_prefix(s.start) for s in policy.stages):
        raise UserError(
            "freeze.cache_maps: no stage has a frozen prefix whose output can be cached (a stage that trains only "
            'the top groups, freeze.bn = "frozen" or "all", train_bn = false, model.drop_path_rate = 0)'
        )
    if not f.cache_maps and not any(policy.cacheable(s.start) for s in policy.stages):
        raise UserError(
            'freeze.cache_features: no stage trains only ["classifier"] with BN statistics frozen '
            '(freeze.bn = "frozen" or "all", train_bn = false); nothing can be cached'
        )
    loader = source(f.cache_augment > 0)
    seed, bs = recipe.train.seed, recipe.data.batch_size
    factors = None  # a balanced epoch of cached rows: the same repeat factors, the rows indexed by image (untagged)
    if recipe.data.sampler == "balanced":
        factors = repeat_factors(loader.dataset.targets, recipe.data.repeat_threshold)
    if d is not None and d.enabled:
        return FeatureCache(
            policy,
            loader,
            f.cache_augment,
            bs // d.world,
            drop_last=True,
            sampler_factory=lambda n: ShardSampler(n, seed, d.rank, d.world, batch=bs, factors=factors, tag=False),
            global_batch=bs,
            gather=lambda feats, targets, index: gather_features(feats, targets, index, d),
            maps=f.cache_maps,
        )
    return FeatureCache(
        policy,
        loader,
        f.cache_augment,
        bs,
        drop_last=True,
        sampler_factory=lambda n: EpochSampler(n, seed, factors, False),
        maps=f.cache_maps,
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


def head_params(model: nn.Module, groups: list[LayerGroup] | None) -> list[str]:
    """The new head's parameter names: the ``classifier`` group's, or timm's ``get_classifier()`` without groups."""
    if groups is not None:
        return [p for g in groups if g.name == "classifier" for p in g.params]
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return [n for n, p in model.named_parameters() if id(p) in ids]


def l2sp_params(model: nn.Module, head: list[str]) -> list[str]:
    """What L2-SP pulls toward its starting value: every decayed weight (not norms, not biases) outside the head."""
    skip = set(head)
    return [n for n, p in model.named_parameters() if n not in skip and is_decayed(n, p)]


def build_optimizer(
    recipe: Recipe,
    model: nn.Module,
    plan: StepPlan,
    groups: list[LayerGroup] | None = None,
    stages: list[Stage] | None = None,
    head: list[str] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer over every layer group (frozen ones included) and the per-step warmup + cosine schedule.

    Without layer groups and with L2-SP on, the head (``head``) gets optimizer groups of its own, so that switching
    the backbone's weight decay off for L2-SP leaves the head's on.
    """
    o = recipe.optim
    if groups is None:
        pgroups = whole_model_groups(model, o.lr, o.weight_decay, head if o.l2sp else ())
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
            for i, (cfg, st) in enumerate(zip(trained, stages or build_stages(recipe, groups)))
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


def build_model(recipe: Recipe, num_classes: int) -> tuple[nn.Module, LoadReport | None]:
    """The timm backbone with a ``num_classes`` head, from ``[model]``."""
    m = recipe.model
    head = {"head": m.head, "head_hidden": m.head_hidden, "init": m.init, "arch": m.arch.model_dump()}
    head["drop_path_rate"] = m.drop_path_rate
    return create_model(m.name, num_classes, m.pretrained, m.checkpoint, m.drop_rate, **head)


def build_loss(recipe: Recipe, train_split: Split) -> nn.Module:
    """The loss from ``[loss]``; ``pos_weight = "auto"`` reads the training label frequencies."""
    c = recipe.loss
    n = len(train_split.classes)
    if c.name == "ce":  # one-hot float targets: torch's CE takes class probabilities, with label smoothing
        return nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
    asl = {"gamma_neg": c.gamma_neg, "gamma_pos": c.gamma_pos, "clip": c.clip}
    return create_loss(c.name, n, c.pos_weight, train_split.targets, c.pos_weight_max, c.alpha, c.gamma, **asl)


def build_bare_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's architecture without loading any weights (they come from a run's checkpoint)."""
    m = recipe.model.model_copy(update={"pretrained": False, "checkpoint": ""})
    model, _ = build_model(recipe.model_copy(update={"model": m}), num_classes)
    return model


@dataclass
class StageView:
    """One ``[[freeze.stages]]`` entry as ``groups`` shows it: its title and, per layer group, its peak LR."""

    number: int  # 1-based, solver stages counted (as lr-find --stage counts)
    title: str
    lrs: dict[str, float | None]  # group -> peak LR when it trains, None when frozen
    solved: tuple[str, ...] = ()  # groups the solver stage sets (the classifier)


def stage_views(recipe: Recipe, groups: list[LayerGroup], stages: list[Stage]) -> list[StageView]:
    """Every stage, the solver stage included, with the LR each group really gets at the schedule's peak.

    A trained stage's LR is its own ``lr`` (or ``optim.lr``) times its multipliers (its own ``layer_decay`` /
    ``lr_mult``, or optim's); frozen groups have none.
    """
    views, trained = [], 0
    for number, cfg in enumerate(recipe.freeze.stages or [None], start=1):
        if cfg is not None and cfg.solver:
            solved = tuple(resolve(cfg.train, groups, f"freeze.stages[{number - 1}].train"))
            frozen = dict.fromkeys(g.name for g in groups)
            views.append(StageView(number, f"stage {number}\nprobe ({cfg.solver})", frozen, solved))
            continue
        st = stages[trained]
        mult, lr = build_stage_multipliers(recipe, groups, trained), build_stage_lr(recipe, trained)
        lrs = {g.name: lr * mult[g.name] if g.name in st.train else None for g in groups}
        views.append(StageView(number, f"stage {number}\nepochs {st.start + 1}-{st.end}", lrs))
        trained += 1
    return views


def fold_probabilities(model: nn.Module, doc: dict) -> None:
    """Fold a run's ``probabilities.json`` (per-class ``sigmoid(a z + b)``) into the model's last linear layer."""
    from finetune.eval.probabilities import Scaling, fold_into

    head = model.get_classifier() if hasattr(model, "get_classifier") else model
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("probabilities.json: the model has no linear classifier to fold the scaling into")
    fold_into(linears[-1], Scaling.from_json(doc))
