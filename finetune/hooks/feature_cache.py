"""Pooled features of a frozen backbone: extracted once (or once per augmented pass) for head-only stages.

A head-only stage (only the classifier trains, BN statistics frozen) computes the same backbone features every epoch;
:class:`FeatureCache` computes them once and serves them in batches of the same size, so the LR schedule holds. The
probe (:mod:`finetune.hooks.probe`) extracts its features with :func:`extract_features` too.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from torch import nn

from finetune.data.dataset import batch_images
from finetune.precision import autocast


class FeatureSource(Protocol):
    """What features come from: a model and its pooled pre-classifier features (a freeze policy is one)."""

    model: nn.Module

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-classifier features of a batch of images."""
        ...


@torch.no_grad()  # not inference_mode: the classifier's backward saves these tensors
def extract_features(
    policy: FeatureSource,
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
        policy: FeatureSource,
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
