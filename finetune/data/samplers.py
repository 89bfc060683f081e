"""Samplers: the seeded (seed, epoch) shuffle of one process, and each rank's share of it under DDP.

Both draw the same order (:func:`epoch_order`: a permutation, or with repeat factors a class-balanced draw), so a
DDP run's global batches are one process's batches, and the order of epoch k is the same after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``range(n)`` for ``epoch``: a torch generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def repeat_factors(targets: np.ndarray, threshold: float) -> np.ndarray:
    """Per image, the repeat factor of LVIS's repeat-factor sampling (Gupta et al., CVPR 2019, section 2).

    A class ``c`` in a fraction ``f(c)`` of the images gets ``r(c) = max(1, sqrt(t / f(c)))``; an image gets the
    largest ``r(c)`` of its positive classes (1 with none). Unknown labels (NaN) are not positives.
    """
    positive = np.nan_to_num(np.asarray(targets, dtype=np.float64), nan=0.0) >= 0.5
    freq = positive.mean(axis=0) if len(positive) else np.zeros(positive.shape[1])
    per_class = np.maximum(1.0, np.sqrt(threshold / np.maximum(freq, 1e-12)))
    return np.where(positive, per_class[None, :], 1.0).max(axis=1, initial=1.0)


def balanced_length(factors: np.ndarray) -> int:
    """The fixed epoch length of a balanced draw: ``ceil(sum of the repeat factors)``."""
    return math.ceil(float(np.sum(factors)) - 1e-9)


def balanced_order(factors: np.ndarray, seed: int, epoch: int) -> list[int]:
    """One epoch of repeat-factor sampling, of fixed length ``L`` (:func:`balanced_length`).

    Each image is drawn ``floor`` or ``ceil`` of ``r_i * L / sum(r)`` times, so in expectation exactly that, and at
    least once: systematic sampling (one uniform offset, unit steps) over the repeat factors laid end to end in a
    (seed, epoch) permutation, then shuffled. detectron2's ``RepeatFactorTrainingSampler`` rounds each image on its
    own instead, which makes every epoch a different length; a fixed length keeps the LR schedule's steps per epoch
    exact and a DDP run's global batches one process's.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n, length = len(factors), balanced_length(factors)
    perm = torch.randperm(n, generator=g).numpy()
    scaled = np.asarray(factors, dtype=np.float64)[perm] * (length / float(np.sum(factors)))
    ends = np.cumsum(scaled)
    points = float(torch.rand(1, generator=g, dtype=torch.float64)) + np.arange(length)
    picked = perm[np.minimum(np.searchsorted(ends, points, side="right"), n - 1)]
    return picked[torch.randperm(length, generator=g).numpy()].tolist()


def sampler_line(sampler: dict[str, int | str]) -> str:
    """What a balanced (repeat-factor) sampler made of an epoch, from report.json's ``sampler`` entry."""
    n, size = int(sampler["train_images"]), int(sampler["epoch_size"])
    return f"sampler: balanced (repeat factors); each epoch draws {size} from {n} train images ({size / n:.2f}x)"


def tag_repeats(order: list[int], n: int) -> list[int]:
    """The k-th draw of image i in an epoch as ``i + k * n`` (k = 0 for the first).

    The dataset seeds each repeat's augmentation apart (:class:`~finetune.data.dataset.ImageDataset` reads
    ``divmod(index, n)``).
    """
    seen = [0] * n
    tagged = []
    for i in order:
        tagged.append(i + seen[i] * n)
        seen[i] += 1
    return tagged


def epoch_order(n: int, seed: int, epoch: int, factors: np.ndarray | None = None, tag: bool = True) -> list[int]:
    """Epoch ``epoch``'s order: :func:`epoch_permutation`, or with repeat factors :func:`balanced_order`.

    The balanced order's repeats are tagged by :func:`tag_repeats` unless ``tag`` is false (the feature cache indexes
    its rows by image).
    """
    if factors is None:
        return epoch_permutation(n, seed, epoch)
    order = balanced_order(factors, seed, epoch)
    return tag_repeats(order, len(factors)) if tag else order


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles with :func:`epoch_order`: the order of epoch k is the same after a resume.

    With ``factors`` (:func:`repeat_factors`) an epoch is a class-balanced draw of :func:`balanced_length` indices.
    """

    def __init__(self, n: int, seed: int = 0, factors: np.ndarray | None = None, tag: bool = True) -> None:
        self.seed, self.epoch, self.skip, self.factors, self.tag = seed, 0, 0, factors, tag
        self.n = n if factors is None else balanced_length(factors)

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch`` (and start it at its first index again)."""
        self.epoch, self.skip = epoch, 0

    def set_skip(self, skip: int) -> None:
        """Leave out the epoch's first ``skip`` indices (a resume from a mid-epoch checkpoint)."""
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch, self.factors, self.tag)[self.skip :])

    def __len__(self) -> int:
        return max(self.n - self.skip, 0)


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank ``rank``'s share of a dataset: every ``world``-th index of the (seed, epoch) permutation, or of 0..n-1.

    Args:
        n: Dataset size.
        seed: Seed of the permutation (the same on every rank).
        rank: This rank.
        world: Number of ranks.
        shuffle: Permute per epoch (training) or keep dataset order (evaluation, feature extraction).
        pad: Equal counts on every rank (training): with ``batch`` (the global batch) and more than one batch of
            images, the permutation is cut to whole global batches, as one process's ``drop_last`` cuts it, so every
            rank takes exactly one process's number of steps; otherwise leading indices are repeated.
        batch: The global batch size (training).
        factors: Repeat factors (training): each epoch is the single-process balanced draw, shared out as above.
        tag: Repeats as ``i + k * n`` (:func:`tag_repeats`), as the single-process sampler yields them.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        rank: int,
        world: int,
        shuffle: bool = True,
        pad: bool = True,
        batch: int = 0,
        factors: np.ndarray | None = None,
        tag: bool = True,
    ) -> None:
        self.seed, self.rank, self.world, self.shuffle, self.pad = seed, rank, world, shuffle, pad
        self.batch, self.factors, self.tag = batch, factors if shuffle else None, tag
        self.n = n if self.factors is None else balanced_length(self.factors)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch`` (and start it at its first index again)."""
        self.epoch, self.skip = epoch, 0

    def set_skip(self, skip: int) -> None:
        """Leave out this rank's first ``skip`` indices of the epoch (a resume from a mid-epoch checkpoint)."""
        self.skip = skip

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.n))
        else:  # exactly the single-process EpochSampler's order
            order = epoch_order(self.n, self.seed, self.epoch, self.factors, self.tag)
        if self.pad and self.batch and self.n > self.batch:
            order = order[: self.n // self.batch * self.batch]
        elif self.pad and self.n % self.world:
            order = (order * self.world)[: self.n + self.world - self.n % self.world]
        return order[self.rank :: self.world][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())
