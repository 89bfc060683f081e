"""From probabilities to labels: the one rule every prediction path shares (no torch needed)."""

from __future__ import annotations

import numpy as np


def label_indices(probs: np.ndarray, multi_label: bool, thresholds: np.ndarray | float) -> list[list[int]]:
    """Per row: classes at or above their threshold, most probable first (multi-label), or the arg-max.

    Single-label: ``thresholds`` is the reject threshold on the top probability (0: always answer); below it the
    answer is no class ("none of the above").
    """
    probs = np.atleast_2d(probs)
    if not multi_label:
        reject = float(np.max(thresholds)) if np.size(thresholds) else 0.0
        return [[int(row.argmax())] if row.max() >= reject else [] for row in probs]
    per_class = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), probs.shape[1:])
    return [[int(i) for i in np.argsort(-row, kind="stable") if row[i] >= per_class[i]] for row in probs]


# Unknown labels ("not checked" for this image and class) are NaN in a target matrix; 1 is positive, 0 negative.
UNKNOWN = float("nan")


def known_of(targets: np.ndarray) -> np.ndarray:
    """Which entries of a target matrix are checked (positive or negative): ``False`` where the label is unknown."""
    return ~np.isnan(np.asarray(targets, dtype=np.float64))


def positives_of(targets: np.ndarray) -> np.ndarray:
    """Which entries are positive (``> 0.5``; an unknown entry is not)."""
    return np.nan_to_num(np.asarray(targets, dtype=np.float64), nan=0.0) > 0.5


def negatives_of(targets: np.ndarray) -> np.ndarray:
    """Which entries are known negatives (``<= 0.5``; an unknown entry is not)."""
    return np.nan_to_num(np.asarray(targets, dtype=np.float64), nan=1.0) <= 0.5


def unknown_counts(targets: np.ndarray) -> np.ndarray:
    """Per class, how many entries are unknown."""
    return (~known_of(targets)).sum(0)
