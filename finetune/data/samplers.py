"""Samplers: the seeded (seed, epoch) shuffle of one process, and each rank's share of it under DDP.

Both draw the same permutation (:func:`epoch_permutation`), so a DDP run's global batches are one process's batches,
and the order of epoch k is the same after a resume.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``range(n)`` for ``epoch``: a torch generator seeded by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles with :func:`epoch_permutation`: the order of epoch k is the same after a resume."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch`` (and start it at its first index again)."""
        self.epoch, self.skip = epoch, 0

    def set_skip(self, skip: int) -> None:
        """Leave out the epoch's first ``skip`` indices (a resume from a mid-epoch checkpoint)."""
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_permutation(self.n, self.seed, self.epoch)[self.skip :])

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
    """

    def __init__(
        self, n: int, seed: int, rank: int, world: int, shuffle: bool = True, pad: bool = True, batch: int = 0
    ) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle, self.pad = n, seed, rank, world, shuffle, pad
        self.batch = batch
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
        else:  # exactly the single-process EpochSampler's permutation
            order = epoch_permutation(self.n, self.seed, self.epoch)
        if self.pad and self.batch and self.n > self.batch:
            order = order[: self.n // self.batch * self.batch]
        elif self.pad and self.n % self.world:
            order = (order * self.world)[: self.n + self.world - self.n % self.world]
        return order[self.rank :: self.world][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())
