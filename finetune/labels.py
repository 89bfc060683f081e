"""From probabilities to labels: the one rule every prediction path shares (no torch needed)."""

from __future__ import annotations

import numpy as np


def label_indices(probs: np.ndarray, multi_label: bool, thresholds: np.ndarray | float) -> list[list[int]]:
    """Per row: classes at or above their threshold, most probable first (multi-label), or the arg-max."""
    probs = np.atleast_2d(probs)
    if not multi_label:
        return [[int(row.argmax())] for row in probs]
    per_class = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), probs.shape[1:])
    return [[int(i) for i in np.argsort(-row, kind="stable") if row[i] >= per_class[i]] for row in probs]
