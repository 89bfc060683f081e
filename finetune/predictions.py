"""What a model said about a split: the one type every evaluation, calibration and report step passes along.

A :class:`Predictions` is immutable: a step that changes the probabilities (probability scaling, a backend's own
outputs) returns a new one with :meth:`Predictions.with_probs`, so nothing writes into its caller's data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Predictions:
    """Probabilities and targets of one split, one row per readable image, in dataset order.

    Attributes:
        probs: ``[n, classes]``: the task's activation (sigmoid or softmax) of the logits.
        targets: ``[n, classes]``: multi-hot (NaN where a label is unknown), or one-hot for single-label data.
        index: ``[n]``: each row's index in the split's dataset (what a path or an image id is looked up by);
            empty when the rows are not tied to a dataset.
        loss: The mean loss over the rows, when it was asked for.
    """

    probs: np.ndarray
    targets: np.ndarray
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    loss: float | None = None

    def __len__(self) -> int:
        return len(self.probs)

    def __getitem__(self, key: str) -> Any:
        """``out["probs"]``, as the dicts this type replaced were read (0.7 and before): deprecated, use attributes."""
        if key not in ("probs", "targets", "index", "loss"):
            raise KeyError(key)
        warnings.warn(f"Predictions[{key!r}] is deprecated; use .{key}", DeprecationWarning, stacklevel=2)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        """``"probs" in out``, as the dicts were asked (0.7 and before)."""
        return key in ("probs", "targets", "index") or (key == "loss" and self.loss is not None)

    @property
    def unknown(self) -> np.ndarray:
        """Where a label is unknown (NaN in a multi-label target): the metrics leave those pairs out."""
        return np.isnan(self.targets)

    def with_probs(self, probs: np.ndarray) -> Predictions:
        """The same rows with other probabilities (scaled, or another backend's)."""
        return replace(self, probs=probs)

    def take(self, rows: np.ndarray) -> Predictions:
        """The given rows (an index array or a boolean mask); the loss, which was over all rows, is dropped."""
        index = self.index[rows] if len(self.index) else self.index
        return Predictions(probs=self.probs[rows], targets=self.targets[rows], index=index)

    def paths(self, names: list[str]) -> list[str]:
        """Each row's image, given the split's image names in dataset order."""
        return [names[int(i)] for i in self.index]

    @staticmethod
    def join(parts: list[Predictions]) -> Predictions:
        """Rows of several parts (DDP ranks' shards) in one, sorted by ``index``, each image once; losses weighted."""
        kept = [p for p in parts if len(p)]  # an empty shard (fewer images than ranks) adds none
        if not kept:
            return parts[0]
        index = np.concatenate([p.index for p in kept])
        order = np.argsort(index, kind="stable")
        keep = order[np.r_[True, np.diff(index[order]) != 0]]  # one row per image, whatever a sampler padded
        loss = None
        if all(p.loss is not None for p in kept):
            sizes = [len(p) for p in kept]
            loss = float(sum(p.loss * s for p, s in zip(kept, sizes)) / max(sum(sizes), 1))  # type: ignore[operator]
        return Predictions(
            probs=np.concatenate([p.probs for p in kept])[keep],
            targets=np.concatenate([p.targets for p in kept])[keep],
            index=index[keep],
            loss=loss,
        )
