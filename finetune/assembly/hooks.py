"""The run's hooks from the recipe, in an order the assembly states and checks.

The order rules are data (:data:`ORDER`), checked by :func:`finetune.train.loop.check_order` on every hook list a run
trains with, extra hooks from Python included: a list in the wrong order is an error, not a silent misbehaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.config import Recipe, recipe_to_dict
from finetune.distributed import Dist
from finetune.errors import UserError
from finetune.hooks.ddp import DDPHook
from finetune.hooks.early_stopping import EarlyStopping
from finetune.hooks.ema import EmaHook
from finetune.hooks.feature_cache import FeatureCache
from finetune.hooks.freezing import FreezeHook, FreezePolicy
from finetune.hooks.l2sp import L2SPHook
from finetune.hooks.loggers import LOGGERS, make_loggers
from finetune.hooks.probe import ProbeHook
from finetune.hooks.qat import QatHook
from finetune.train.loop import Hook, check_order

# (earlier, later, why): a hook of the first type must come before every hook of the second.
ORDER: list[tuple[type, type, str]] = [
    (FreezeHook, ProbeHook, "the probe solves the classifier on the features of the policy's frozen network"),
    (FreezeHook, QatHook, "the simulation folds BatchNorm with the statistics the policy keeps fixed"),
    (QatHook, ProbeHook, "the probe solves the classifier on the features the INT8 network computes"),
    (QatHook, DDPHook, "DDP wraps the network with its rounding in place"),
    (QatHook, EmaHook, "the EMA's copy, made at the start, rounds with the simulation's activation ranges"),
    (FreezeHook, DDPHook, "DDP wraps the forward that freezing chose for the epoch"),
    (ProbeHook, DDPHook, "DDP is built after the probe has set the classifier"),
    (ProbeHook, EmaHook, "the EMA starts from the solved classifier, not the random one"),
    (ProbeHook, L2SPHook, "L2-SP anchors the weights training starts from"),
]


def check_hooks(hooks: Sequence[Hook]) -> None:
    """Check :data:`ORDER` on ``hooks``, and that the loggers come after every other hook.

    Raises:
        ValueError: Naming the rule that is broken and why it exists.
    """
    hooks = list(hooks)
    plain = [i for i, h in enumerate(hooks) if not isinstance(h, LOGGERS)]
    loggers = [i for i, h in enumerate(hooks) if isinstance(h, LOGGERS)]
    if plain and loggers and max(plain) > min(loggers):
        raise ValueError("hook order: loggers go last (they see the keys every other hook adds to the record)")
    check_order(hooks, ORDER)


def build_probe(
    recipe: Recipe, policy: FreezePolicy | None, loaders: Callable[[str], object], cache: FeatureCache | None = None
) -> ProbeHook | None:
    """The solver stage's hook, when the first stage is one; ``loaders(role)`` gives an unaugmented loader.

    When the first trained stage trains on cached maps of the unaugmented images (``freeze.cache_maps``,
    ``cache_augment = 0``), the probe's training features come from those maps: the frozen prefix runs once for both.
    """
    f = recipe.freeze
    if not any(s.solver for s in f.stages):
        return None
    if policy is None:
        raise UserError(f"freeze.stages[0].solver: {recipe.model.name} has no layer groups to freeze for a probe")
    if recipe.model.head != "linear":
        raise UserError('freeze.stages[0].solver: the solver fits a linear classifier; set model.head = "linear"')
    features = None
    if cache is not None and cache.maps and not cache.passes and f.stages[1:]:
        prefix = policy.map_prefix(policy.stages[0].start)  # the first trained stage's boundary
        if prefix and not policy.cacheable(policy.stages[0].start):

            def features(settings: Any, console: Any) -> tuple[torch.Tensor, torch.Tensor]:
                opts = {"precision": settings.precision, "channels_last": settings.channels_last, "console": console}
                return cache.pooled(prefix, device=settings.device, **opts)

    return ProbeHook(
        policy,
        loaders("train"),
        loaders("val"),
        cs=f.solver_c,
        select=f.solver_select,
        seed=recipe.train.seed,
        train_features=features,
        max_iter=f.solver_max_iter,
    )


def build_hooks(
    recipe: Recipe,
    run_dir: Path,
    *,
    policy: FreezePolicy | None,
    cache: FeatureCache | None,
    probe: ProbeHook | None,
    l2sp_params: list[str],
    make_model: Callable[[], nn.Module] | None = None,
    qat: QatHook | None = None,
    extra: Sequence[Hook] = (),
    d: Dist | None = None,
) -> list[Hook]:
    """The loop's hooks in order: freezing, QAT, the probe, DDP, L2-SP, EMA, early stopping, ``extra``, the loggers.

    Under DDP (``d`` with more than one rank) only rank 0 logs. ``l2sp_params`` names the parameters L2-SP pulls
    toward their starting values (the assembly's choice: the backbone's weights, never the classifier's);
    ``make_model`` builds an empty model of the run's architecture for the EMA's copy.
    """
    t = recipe.train
    hooks: list[Hook] = [FreezeHook(policy, cache)] if policy is not None else []
    if qat is not None:
        hooks.append(qat)
    if probe is not None:
        hooks.append(probe)
    if d is not None and d.enabled:
        hooks.append(DDPHook(d))
    if recipe.optim.l2sp:
        hooks.append(L2SPHook(recipe.optim.l2sp, l2sp_params))
    if t.ema:
        hooks.append(EmaHook(t.ema, t.ema_warmup, make_model))
    if t.patience:
        hooks.append(EarlyStopping(t.patience))
    hooks.extend(extra)
    if d is None or d.main:
        hooks.extend(make_loggers(recipe.log.to, run_dir, recipe.output.name or run_dir.name, recipe_to_dict(recipe)))
    try:
        check_hooks(hooks)
    except ValueError as err:  # only an extra hook from Python can break the order
        raise UserError(f"{err}; pass such hooks in another order") from None
    return hooks
