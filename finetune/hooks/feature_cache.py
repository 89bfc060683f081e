"""What a frozen part of the network computes, extracted once (or once per augmented pass) instead of every epoch.

A head-only stage (only the classifier trains, BN statistics frozen) computes the same backbone features every epoch;
:class:`FeatureCache` computes them once and serves them in batches of the same size, so the LR schedule holds. The
probe (:mod:`finetune.hooks.probe`) extracts its features with :func:`extract_features` too.

A stage that trains the top blocks over a frozen prefix (``freeze.cache_maps``) caches the feature maps at the stage
boundary instead: the prefix runs once per pass, and each epoch costs what the top blocks cost. The maps are
computed exactly as the training forward computes them (:meth:`~finetune.hooks.freezing.FreezePolicy.prefix_maps`),
so training on them equals training through the prefix on the same inputs (``tests/test_freezing.py`` checks it).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from torch import nn

from finetune.console import LogTicker
from finetune.data.dataset import batch_images
from finetune.precision import autocast


class FeatureSource(Protocol):
    """What features come from: a model and its pooled pre-classifier features (a freeze policy is one)."""

    model: nn.Module

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-classifier features of a batch of images."""
        ...

    def prefix_maps(self, x: torch.Tensor, prefix: int) -> torch.Tensor:
        """The output of the first ``prefix`` layer groups, as the training forward computes it."""
        ...

    def pooled_from_maps(self, maps: torch.Tensor, prefix: int) -> torch.Tensor:
        """Pooled features (eval mode) of maps that the first ``prefix`` groups computed."""
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
    prefix: int = 0,
    console: Any = None,
    label: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-classifier features (eval mode) and targets of every readable image of ``loader``.

    Args:
        policy: Computes the features (a freeze policy).
        loader: The images, in the order the rows are wanted.
        device: Where the model runs.
        precision: fp32, bf16 or fp16 (resolved).
        channels_last: Images in channels-last memory format.
        index: When given, receives the dataset indices of the rows, batch by batch.
        prefix: 0 = pooled features; ``k`` = the feature maps after the first ``k`` layer groups, computed as the
            training forward computes them (frozen BN statistics, no gradients), kept in their memory format.
        console: Where a log (not a terminal) gets a progress line every minute.
        label: What the progress lines call this pass.
    """
    model = policy.model
    was_training = model.training
    model.eval()
    feats, targets, seen = [], [], 0
    ticker = LogTicker(console, label, len(loader)) if console is not None else None
    for i, batch in enumerate(loader):
        if "image" in batch:
            images = batch_images(batch, device, channels_last)
            with autocast(device, precision):
                out = policy.prefix_maps(images, prefix) if prefix else policy.pooled_features(images)
            feats.append(out.float())
            targets.append(batch["target"].to(device))
            seen += len(out)
            if index is not None:
                index.append(batch["index"])
        if ticker is not None:
            ticker.tick(i + 1, f"{seen} images")
    model.train(was_training)
    return torch.cat(feats), torch.cat(targets)


class _Features(torch.utils.data.Dataset):
    def __init__(self, feats: torch.Tensor, targets: torch.Tensor) -> None:
        self.feats, self.targets = feats, targets

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.feats[i], self.targets[i], i

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        # A whole batch by one indexing op (the DataLoader's fetcher calls this when it exists): per-row Python
        # overhead is what an epoch on cached maps would otherwise spend its time on.
        index = torch.tensor(indices)
        return {"features": self.feats[index], "target": self.targets[index], "index": index, "errors": []}


def _collate(items: dict[str, Any] | list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, Any]:
    if isinstance(items, dict):
        return items
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
        maps: Stages with a cacheable frozen prefix (not only head-only ones) train on the cached boundary maps.
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
        maps: bool = False,
    ) -> None:
        self.policy, self.source, self.passes, self.gather, self.maps = policy, source, passes, gather, maps
        self.global_batch = global_batch or batch_size  # drop_last follows the one-process rule
        self.batch_size, self.drop_last, self.sampler_factory = batch_size, drop_last, sampler_factory
        self._store: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (prefix, pass) -> rows
        self.extract_time_s = 0.0

    def _extract(self, key: tuple[int, int], device: torch.device, precision: str, channels_last: bool, console: Any):
        prefix, k = key
        for old in [o for o in self._store if o[0] != prefix]:  # another stage's rows: not needed again
            del self._store[old]
        if self.passes and hasattr(self.source.dataset, "set_epoch"):
            self.source.dataset.set_epoch(k)
        start = time.perf_counter()
        index: list[torch.Tensor] = []
        feats, targets = extract_features(
            self.policy,
            self.source,
            device=device,
            precision=precision,
            channels_last=channels_last,
            index=index,
            prefix=prefix,
            console=console,
            label=f"caching pass {k + 1}",
        )
        self._store[key] = self.gather(feats, targets, torch.cat(index)) if self.gather else (feats, targets)
        self.extract_time_s += time.perf_counter() - start

    def release(self) -> None:
        """Drop every cached row (a later stage that needs them extracts them again)."""
        self._store.clear()

    @torch.no_grad()
    def pooled(
        self, prefix: int, *, device: torch.device, precision: str = "fp32", channels_last: bool = False, console=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and targets of the unaugmented training split, from its cached maps at ``prefix``.

        What the probe fits on when the next stage caches maps: the prefix runs once for both (the maps are kept for
        that stage), and only the top groups run again. Needs ``passes = 0`` (maps of the eval transform).
        """
        key = (prefix, 0)
        if key not in self._store:
            self._extract(key, device, precision, channels_last, console)
        maps, targets = self._store[key]
        model = self.policy.model
        was_training = model.training
        model.eval()
        feats = []
        layout = torch.channels_last if channels_last else torch.preserve_format
        for i in range(0, len(maps), 256):
            with autocast(device, precision):
                chunk = maps[i : i + 256].to(device, memory_format=layout)
                feats.append(self.policy.pooled_from_maps(chunk, prefix).float())
        model.train(was_training)
        return torch.cat(feats), targets

    def loader(
        self,
        epoch: int,
        *,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool = False,
        console: Any = None,
        prefix: int = 0,
    ) -> torch.utils.data.DataLoader:
        """The loader of cached rows for ``epoch`` (extracting its pass first if needed).

        ``prefix`` 0: pooled features (a head-only stage); ``k``: the maps after the first ``k`` layer groups.
        """
        key = (prefix, epoch % self.passes if self.passes else 0)
        if key not in self._store:
            self._extract(key, device, precision, channels_last, console)
            if console is not None:
                feats = self._store[key][0]
                what = "feature vectors" if not prefix else f"feature maps {tuple(feats.shape[1:])}"
                size = feats.element_size() * feats.nelement() / 2**20
                console.print(f"cached {len(feats)} {what} (pass {key[1] + 1}, {size:.0f} MiB) for this stage")
        feats, targets = self._store[key]
        sampler = self.sampler_factory(len(feats))
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            _Features(feats, targets),
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=_collate,
            drop_last=self.drop_last and len(feats) > self.global_batch,
        )
