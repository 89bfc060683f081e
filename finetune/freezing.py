"""Freezing policies: staged unfreezing of layer groups, BatchNorm-statistics freezing, frozen-prefix forward.

A schedule is a list of stages (fastai's ``fine_tune`` / ULMFiT gradual unfreezing, Lightning's
``BackboneFinetuning``): each runs for some epochs with a set of trainable groups. Frozen parameters get
``requires_grad = False``; the optimizer holds every group from the start, so a stage change adds no optimizer group
and a resumed run needs nothing special (the stage follows from the epoch).

BatchNorm: ``bn = "frozen"`` keeps the running statistics of BN layers inside frozen groups fixed (eval mode),
``"all"`` keeps every BN layer's statistics fixed, ``"none"`` lets them all update. Calling ``model.train()`` would
silently undo this (the bug Lightning, fastai and mmpretrain all shipped), so the policy is re-applied by a forward
pre-hook before every training-mode forward, and :meth:`FreezePolicy.check_bn` compares the frozen statistics with a
snapshot after each epoch and stops the run if they moved.

:class:`FreezeHook` plugs all of this into the training loop: it applies each epoch's stage, swaps in the frozen-prefix
forward (or the cached-feature loader and the classifier alone for head-only stages) and checks and logs the BN
statistics at the end of every epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data.coco import batch_images
from finetune.groups import LayerGroup, forward_fns, group_modules, group_of_param
from finetune.loop import Hook, Loop
from finetune.precision import autocast

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
        self.prefix = 0
        for g in self.groups:
            if any(self.model.get_parameter(p).requires_grad for p in g.params):
                break
            self.prefix += 1
        self.prefix = min(self.prefix, len(self.groups) - 1)  # the classifier always runs with gradients
        self._set_bn_modes()
        self._snapshot = self._bn_stats()
        return stage

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

    def remove(self) -> None:
        """Detach the forward pre-hook."""
        self._hook.remove()


@torch.no_grad()  # not inference_mode: the classifier's backward saves these tensors
def extract_features(
    policy: FreezePolicy,
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    index: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-classifier features (eval mode) and targets of every readable image of ``loader``.

    ``index``, when given, receives the dataset indices of the rows, batch by batch.
    """
    model = policy.model
    was_training = model.training
    model.eval()
    feats, targets = [], []
    for batch in loader:
        if "image" not in batch:
            continue
        images = batch_images(batch, device, channels_last)
        with autocast(device, precision):
            feats.append(policy.pooled_features(images).float())
        targets.append(batch["target"].to(device))
        if index is not None:
            index.append(batch["index"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(targets)


class _Features(torch.utils.data.Dataset):
    def __init__(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        self.feats, self.targets = feats, targets

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.feats[i], self.targets[i], i


def _collate(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, Any]:
    feats, targets, index = zip(*items)
    return {"features": torch.stack(feats), "target": torch.stack(targets), "index": torch.tensor(index), "errors": []}


class FeatureCache:
    """Pooled features of the training split for head-only stages: computed once, or ``passes`` times augmented.

    Args:
        policy: The freeze policy whose frozen network computes the features.
        source: A loader over the training split in a fixed order (no shuffling, no dropped images); its dataset's
            ``set_epoch(k)`` selects augmentation pass ``k`` when ``passes > 0``.
        passes: 0 = one pass with ``source`` as it is (normally the eval transform); K = K augmented passes, epoch
            ``e`` training on pass ``e % K``.
        batch_size: Training batch size (the same steps per epoch as the uncached loader, so the LR schedule holds).
        drop_last: As for the uncached loader.
        sampler_factory: Makes the per-epoch shuffling sampler (the trainer's seeded ``EpochSampler``).
        gather: Under DDP, joins every rank's features ``(feats, targets, index)`` in dataset order: each rank
            extracts only its shard of ``source``.
        global_batch: Under DDP, the batch of all ranks together (``batch_size`` is one rank's).
    """

    def __init__(
        self,
        policy: FreezePolicy,
        source: torch.utils.data.DataLoader,
        passes: int,
        batch_size: int,
        drop_last: bool,
        sampler_factory: Any,
        gather: Any = None,
        global_batch: int = 0,
    ) -> None:
        self.policy, self.source, self.passes, self.gather = policy, source, passes, gather
        self.global_batch = global_batch or batch_size  # drop_last follows the one-process rule
        self.batch_size, self.drop_last, self.sampler_factory = batch_size, drop_last, sampler_factory
        self._store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.extract_time_s = 0.0

    def _extract(self, k: int, device: torch.device, precision: str, channels_last: bool) -> None:
        if self.passes and hasattr(self.source.dataset, "set_epoch"):
            self.source.dataset.set_epoch(k)
        start = time.perf_counter()
        index: list[torch.Tensor] = []
        feats, targets = extract_features(
            self.policy, self.source, device=device, precision=precision, channels_last=channels_last, index=index
        )
        self._store[k] = self.gather(feats, targets, torch.cat(index)) if self.gather else (feats, targets)
        self.extract_time_s += time.perf_counter() - start

    def loader(
        self,
        epoch: int,
        *,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = False,
        console: Any = None,
    ) -> torch.utils.data.DataLoader:
        """The loader of cached features for ``epoch`` (extracting its pass first if needed)."""
        k = epoch % self.passes if self.passes else 0
        if k not in self._store:
            self._extract(k, device, precision, channels_last)
            if console is not None:
                console.print(f"cached {len(self._store[k][0])} feature vectors (pass {k + 1}) for the head-only stage")
        feats, targets = self._store[k]
        sampler = self.sampler_factory(len(feats))
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            _Features(feats, targets),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=_collate,
            drop_last=self.drop_last and len(feats) > self.global_batch,
        )


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
        if self.cache is not None and p.cacheable(epoch):
            s, before = loop.settings, self.cache.extract_time_s
            loop.loader = self.cache.loader(
                epoch, device=s.device, precision=s.precision, channels_last=s.channels_last, console=loop.console
            )
            loop.forward = p.head_forward
            self._extra.update(cached_features=True, cache_time_s=self.cache.extract_time_s - before)

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
