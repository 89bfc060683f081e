"""Paired bootstrap intervals for "is recipe A better than recipe B, or is it noise?".

Both recipes are scored on the same images (the scoring half of each seed's draw), so the comparison is paired: a
resample draws images with replacement once per seed and scores both recipes on that same resample. The statistic
is the mean over seeds of ``metric(A) - metric(B)``; its 95% interval is the 2.5th and 97.5th percentiles over the
resamples (percentile bootstrap, Efron & Tibshirani 1993). The interval covers the image-level noise of each
scoring half and the spread between seeds (every resample keeps every seed). An interval that covers 0 is "not
distinguishable": the data do not tell which recipe is better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from finetune.eval.metrics import average_precision, prf


@dataclass
class Scored:
    """One recipe's predictions on one seed's scoring half: targets, probabilities, its calibrated thresholds."""

    targets: np.ndarray
    probs: np.ndarray
    thresholds: np.ndarray | float


def mean_ap(s: Scored, rows: np.ndarray) -> float:
    """The mean AP over the classes with a positive among ``rows``."""
    ap = average_precision(s.targets[rows], s.probs[rows])
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def _f1(key: str) -> Callable[[Scored, np.ndarray], float]:
    def score(s: Scored, rows: np.ndarray) -> float:
        return float(prf(s.targets[rows], s.probs[rows], s.thresholds)[key])

    return score


def top1(s: Scored, rows: np.ndarray) -> float:
    """Single-label: top-1 accuracy among ``rows``."""
    return float((s.probs[rows].argmax(1) == s.targets[rows].argmax(1)).mean())


METRICS: dict[str, Callable[[Scored, np.ndarray], float]] = {
    "map": mean_ap,
    "macro_f1_cal": _f1("macro_f1"),
    "micro_f1_cal": _f1("micro_f1"),
    "top1": top1,
}


def paired_bootstrap(
    a: list[Scored],
    b: list[Scored],
    metric: Callable[[Scored, np.ndarray], float],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over seeds of ``metric(a) - metric(b)`` and its 95% percentile-bootstrap interval.

    Args:
        a: Per seed, recipe A's predictions on that seed's scoring half.
        b: Per seed, recipe B's predictions on the same images in the same order.
        metric: ``metric(scored, rows) -> float``.
        resamples: Bootstrap resamples.
        seed: The resampling seed.

    Returns:
        ``diff`` (the mean difference on the data), ``low`` / ``high`` (the interval), ``distinguishable`` (the
        interval excludes 0) and ``per_seed`` differences.
    """
    if len(a) != len(b) or not a:
        raise ValueError("both recipes need predictions on the same seeds")
    for sa, sb in zip(a, b):
        if sa.targets.shape != sb.targets.shape or not np.array_equal(sa.targets, sb.targets, equal_nan=True):
            raise ValueError("the two recipes were not scored on the same images")
    per_seed = [metric(sa, np.arange(len(sa.targets))) - metric(sb, np.arange(len(sb.targets))) for sa, sb in zip(a, b)]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for r in range(resamples):
        diffs = []
        for sa, sb in zip(a, b):
            rows = rng.integers(0, len(sa.targets), len(sa.targets))
            diffs.append(metric(sa, rows) - metric(sb, rows))
        draws[r] = np.nanmean(diffs)
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return {
        "diff": float(np.mean(per_seed)),
        "low": float(low),
        "high": float(high),
        "distinguishable": bool(low > 0 or high < 0),
        "per_seed": [float(d) for d in per_seed],
    }
