"""Freezing policies: staged unfreezing of layer groups, BatchNorm-statistics freezing, frozen-prefix forward.

A schedule is a list of stages (fastai's ``fine_tune`` / ULMFiT gradual unfreezing, Lightning's
``BackboneFinetuning``): each runs for some epochs with a set of trainable groups. Frozen parameters get
``requires_grad = False``; the optimizer holds every group from the start, so a stage change adds no optimizer group
and a resumed run needs nothing special (the stage follows from the epoch).

BatchNorm: ``bn = "frozen"`` keeps the running statistics of BN layers inside frozen groups fixed (eval mode),
``"all"`` keeps every BN layer's statistics fixed, ``"none"`` lets them all update. Calling ``model.train()`` would
silently undo this (the bug Lightning, fastai and mmpretrain all shipped), so the policy is re-applied by a forward
pre-hook before every training-mode forward, and :meth:`FreezePolicy.check_bn` compares the frozen statistics with a
snapshot after each epoch and stops the run if they moved. The pre-hook belongs to the policy; a copy of the model
is made from the architecture (the EMA's, through the assembly), never by copying the hooked module.

:class:`FreezeHook` plugs all of this into the training loop: it applies each epoch's stage, swaps in the frozen-prefix
forward (or, for head-only stages, the cached-feature loader, its inputs and the classifier alone), signals the change
to wrappers such as DDP (``loop.changes``), and checks and logs the BN statistics at the end of every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.groups import LayerGroup, forward_fns, group_modules, group_of_param
from finetune.hooks.feature_cache import FeatureCache
from finetune.train.loop import Hook, Loop

BN_POLICIES = ("frozen", "all", "none")


@dataclass(frozen=True)
class Stage:
    """Epochs ``[start, end)`` (0-based) with the groups that train in them."""

    start: int
    end: int
    train: tuple[str, ...]


class BNStatsDrift(RuntimeError):
    """Frozen BatchNorm running statistics changed: a bug, never a user error."""


class FreezePolicy:
    """Applies a stage schedule and a BN policy to a model.

    Args:
        model: A timm EfficientNet-family model.
        groups: Its layer groups (:func:`finetune.groups.layer_groups`).
        stages: The schedule; together they cover every epoch of the run.
        bn: ``frozen``, ``all`` or ``none``.
        train_bn: Keep the affine parameters of BN layers in frozen groups trainable (fastai's ``train_bn``).
    """

    def __init__(
        self,
        model: nn.Module,
        groups: list[LayerGroup],
        stages: list[Stage],
        bn: str = "frozen",
        train_bn: bool = False,
    ) -> None:
        if bn not in BN_POLICIES:
            raise ValueError(f"bn must be one of {BN_POLICIES}, not {bn!r}")
        self.model, self.groups, self.stages, self.bn, self.train_bn = model, groups, stages, bn, train_bn
        self.group_names = [g.name for g in groups]
        self._owner = group_of_param(groups)
        self._bn_by_group = {
            name: [(m_name, m) for m_name, m in mods if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for name, mods in group_modules(model, groups).items()
        }
        self._fns = forward_fns(model, groups)
        self.stage_index = -1
        self.frozen_bn: list[tuple[str, nn.Module]] = []
        self.prefix = 0  # leading groups with no trainable parameter: they run under torch.no_grad()
        self._snapshot: list[torch.Tensor] = []
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    def stage_at(self, epoch: int) -> int:
        """Index of the stage that epoch ``epoch`` (0-based) belongs to."""
        for i, stage in enumerate(self.stages):
            if stage.start <= epoch < stage.end:
                return i
        return len(self.stages) - 1

    def apply(self, epoch: int) -> Stage:
        """Set ``requires_grad`` and the BN modes for the stage of ``epoch``; snapshot the frozen BN statistics."""
        self.stage_index = self.stage_at(epoch)
        stage = self.stages[self.stage_index]
        trainable = set(stage.train)
        for name, param in self.model.named_parameters():
            group = self._owner[name]
            is_bn_affine = any(name.startswith(f"{m}.") for m, _ in self._bn_by_group[group])
            param.requires_grad_(group in trainable or (self.train_bn and is_bn_affine))
        if self.bn == "all":
            self.frozen_bn = [m for g in self.group_names for m in self._bn_by_group[g]]
        elif self.bn == "frozen":
            self.frozen_bn = [m for g in self.group_names if g not in trainable for m in self._bn_by_group[g]]
        else:
            self.frozen_bn = []
        self.prefix = self.prefix_of(stage)
        self._set_bn_modes()
        self._snapshot = self._bn_stats()
        return stage

    def prefix_of(self, stage: Stage) -> int:
        """Leading groups with no trainable parameter in ``stage`` (run without gradients); never the classifier."""
        trainable, prefix = set(stage.train), 0
        for g in self.groups:
            if g.name in trainable or (self.train_bn and self._bn_by_group[g.name]):
                break
            prefix += 1
        return min(prefix, len(self.groups) - 1)

    def _set_bn_modes(self) -> None:
        for _, module in self.frozen_bn:
            module.eval()

    def _pre_forward(self, module: nn.Module, args: tuple) -> None:
        # Re-apply after any model.train(): this is what keeps frozen running statistics frozen.
        if module.training and self.frozen_bn:
            self._set_bn_modes()

    def _bn_stats(self) -> list[torch.Tensor]:
        return [t.detach().clone() for _, m in self.frozen_bn for t in (m.running_mean, m.running_var)]

    def bn_checksum(self) -> float:
        """Sum of the frozen BN layers' running means and variances (float64): logged every epoch."""
        return float(sum(t.double().sum() for t in self._bn_stats()))

    def check_bn(self, epoch: int) -> None:
        """Raise :class:`BNStatsDrift` if a frozen BN layer's running statistics changed since :meth:`apply`."""
        now = self._bn_stats()
        names = [n for n, _ in self.frozen_bn for _ in range(2)]
        moved = sorted({names[i] for i, (a, b) in enumerate(zip(self._snapshot, now)) if not torch.equal(a, b)})
        if moved:
            raise BNStatsDrift(
                f"epoch {epoch + 1}: running statistics of {len(moved)} frozen BatchNorm layer(s) changed "
                f"({', '.join(moved[:3])}); the BN policy {self.bn!r} was not honoured"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x)``, with the frozen prefix of groups run under ``torch.no_grad()`` in training mode."""
        if not self.model.training or self.prefix == 0:
            return self.model(x)
        self._pre_forward(self.model, (x,))
        with torch.no_grad():
            for fn in self._fns[: self.prefix]:
                x = fn(x)
        for fn in self._fns[self.prefix :]:
            x = fn(x)
        return x

    def cacheable(self, epoch: int) -> bool:
        """True when only the classifier trains and nothing below it changes (BN frozen): features can be cached."""
        stage = self.stages[self.stage_at(epoch)]
        return set(stage.train) == {"classifier"} and self.bn != "none" and not self.train_bn

    def map_prefix(self, epoch: int) -> int:
        """Leading groups whose output (the feature maps at the stage boundary) can be cached for ``epoch``; 0: none.

        The frozen prefix must compute the same function every epoch: its BN statistics fixed (``bn`` is
        ``frozen`` or ``all``), no trainable BN affine (``train_bn``), and no dropout or stochastic depth inside it.
        A head-only stage counts too (its prefix is every group but the classifier).
        """
        stage = self.stages[self.stage_at(epoch)]
        prefix = self.prefix_of(stage)
        if self.bn == "none" or self.train_bn or prefix == 0:
            return 0
        mods = group_modules(self.model, self.groups)
        for g in self.group_names[:prefix]:
            for _, m in mods[g]:
                if isinstance(m, nn.Dropout) and m.p > 0 or getattr(m, "drop_prob", 0.0) > 0:
                    return 0
        return prefix

    def prefix_maps(self, x: torch.Tensor, prefix: int) -> torch.Tensor:
        """The output of the first ``prefix`` groups, as :meth:`forward` computes it in training.

        Run in eval mode: where :meth:`map_prefix` allows caching, the prefix has no dropout or stochastic depth and
        its BN statistics are frozen, so eval mode is the same computation, and no running statistic can move
        (as it would in training mode before a stage has frozen them: the probe extracts before the first epoch).
        """
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for fn in self._fns[:prefix]:
                x = fn(x)
        self.model.train(was_training)
        return x

    def pooled_from_maps(self, maps: torch.Tensor, prefix: int) -> torch.Tensor:
        """:meth:`pooled_features` of the images whose maps after the first ``prefix`` groups are ``maps``."""
        for fn in self._fns[prefix:-1]:
            maps = fn(maps)
        return self.model.global_pool(maps)

    def suffix_forward(self, maps: torch.Tensor) -> torch.Tensor:
        """The groups after the current stage's prefix on its cached boundary maps: the rest of :meth:`forward`."""
        self._pre_forward(self.model, (maps,))
        for fn in self._fns[self.prefix :]:
            maps = fn(maps)
        return maps

    def remove(self) -> None:
        """Detach the forward pre-hook."""
        self._hook.remove()

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-classifier features (eval-mode statistics for every frozen layer)."""
        for fn in self._fns[:-1]:
            x = fn(x)
        return self.model.global_pool(x)

    def head_forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """The classifier on cached pooled features: timm's ``forward_head`` after its pooling step."""
        m = self.model
        if m.drop_rate > 0.0:
            pooled = F.dropout(pooled, p=m.drop_rate, training=m.training)
        return m.classifier(pooled)


def span(train: tuple[str, ...], names: list[str]) -> str:
    """``stem, blocks.0-6, head, classifier`` rather than every block name."""
    if list(train) == names:
        return "all groups"
    blocks = [n for n in train if n.startswith("blocks.")]
    parts = [n for n in train if not n.startswith("blocks.")]
    idx = [int(b.split(".")[1]) for b in blocks]
    if len(blocks) > 2 and idx == list(range(idx[0], idx[-1] + 1)):
        parts.insert(1 if "stem" in train else 0, f"{blocks[0]}-{blocks[-1].split('.')[1]}")
    else:
        parts[1 if "stem" in train else 0 : 0] = blocks
    return ", ".join(parts)


class FreezeHook(Hook):
    """The freezing policy in the loop: stages, frozen-prefix forward, feature cache, BN check and checksum."""

    def __init__(self, policy: FreezePolicy, cache: FeatureCache | None = None) -> None:
        self.policy, self.cache = policy, cache
        self._shown = -1
        self._extra: dict[str, Any] = {}
        self._last: tuple[int, bool] | None = None  # (stage, cached) of the previous epoch

    def on_epoch_start(self, loop: Loop) -> None:  # noqa: D102
        p, epoch = self.policy, loop.epoch
        stage = p.apply(epoch)
        if p.stage_index != self._shown:
            self._shown = p.stage_index
            if len(p.stages) > 1 or p.frozen_bn or list(stage.train) != p.group_names:
                loop.console.print(
                    f"stage {p.stage_index + 1}/{len(p.stages)} (epochs {stage.start + 1}-{stage.end}): "
                    f"training {span(stage.train, p.group_names)}; running stats fixed in "
                    f"{len(p.frozen_bn)} BN layers; {p.prefix} leading groups run without gradients"
                )
        loop.forward = p.forward
        self._extra = {"stage": p.stage_index + 1, "cached_features": False}
        head_only = self.cache is not None and p.cacheable(epoch)
        prefix = p.map_prefix(epoch) if self.cache is not None and self.cache.maps and not head_only else 0
        if head_only or prefix:
            s, before = loop.settings, self.cache.extract_time_s
            loop.loader = self.cache.loader(
                epoch,
                device=s.device,
                precision=s.precision,
                channels_last=s.channels_last,
                console=loop.console,
                prefix=prefix,
            )
            loop.forward = p.suffix_forward if prefix else p.head_forward
            layout = torch.channels_last if prefix and s.channels_last else torch.preserve_format
            loop.inputs = lambda batch: batch["features"].to(s.device, non_blocking=True, memory_format=layout)
            self._extra.update(cached_features=True, cache_time_s=self.cache.extract_time_s - before)
            if prefix:
                self._extra["cached_prefix"] = p.group_names[prefix - 1]
        elif self.cache is not None:
            self.cache.release()  # a stage that reads images: the cached rows are not kept in memory beside it
        now = (p.stage_index, self._extra["cached_features"])
        if now != self._last:  # another trainable set or another forward: wrappers (DDP) rebuild
            self._last = now
            loop.changes += 1

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        self.policy.check_bn(loop.epoch)
        record.update(self._extra, bn_frozen_checksum=self.policy.bn_checksum())

    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        self.policy.remove()


def plan_stages(
    stages: list[tuple[int | None, list[str]]], total_epochs: int, key: str = "freeze.stages"
) -> list[tuple[int, int]]:
    """Epoch ranges for stages given as (epochs or None for 'the rest', groups).

    Raises:
        ValueError: With a message naming ``key`` when the epochs do not add up to ``total_epochs``.
    """
    ranges, start = [], 0
    for i, (epochs, _) in enumerate(stages):
        if epochs is None:
            if i != len(stages) - 1:
                raise ValueError(f"{key}[{i}].epochs: only the last stage may leave epochs out (= the rest)")
            epochs = total_epochs - start
            if epochs < 1:
                raise ValueError(f"{key}: the stages before the last take {start} of train.epochs = {total_epochs}")
        ranges.append((start, start + epochs))
        start += epochs
    if start != total_epochs:
        raise ValueError(
            f"{key}: the stages add up to {start} epochs but train.epochs = {total_epochs}; make them equal "
            "or leave out the last stage's epochs"
        )
    return ranges
