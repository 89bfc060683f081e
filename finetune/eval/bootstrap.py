"""Paired bootstrap intervals for "is recipe A better than recipe B, or is it noise?".

Both recipes are scored on the same images (the scoring half of each seed's draw), so the comparison is paired. A
resample is two-level: it draws the seeds with replacement, then, within each drawn seed, the scoring images with
replacement, and scores both recipes on that same resample. The statistic is the mean over seeds of
``metric(A) - metric(B)``; its 95% interval is the 2.5th and 97.5th percentiles over the resamples (percentile
bootstrap, Efron & Tibshirani 1993). Drawing the seeds is what lets the interval cover the seed-to-seed spread of
training (with one seed it covers the images only). An interval that covers 0 is "not distinguishable": the data do
not tell which recipe is better. The resample plan depends on the seed of the bootstrap alone, so every row is
scored once per resample and every pair reuses those scores.
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


Plan = list[list[tuple[int, np.ndarray]]]  # per resample: (seed slot, image rows) for each drawn seed


def resample_plan(sizes: list[int], resamples: int = 1000, seed: int = 0) -> Plan:
    """Per resample: the seeds drawn with replacement and, for each, its scoring images drawn with replacement."""
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(resamples):
        slots = rng.integers(0, len(sizes), len(sizes)) if len(sizes) > 1 else np.zeros(1, dtype=int)
        plan.append([(int(j), rng.integers(0, sizes[j], sizes[j])) for j in slots])
    return plan


def metric_draws(scored: list[Scored], plan: Plan, metric: Callable[[Scored, np.ndarray], float]) -> np.ndarray:
    """``[resamples]``: one recipe's metric, averaged over the drawn seeds of each resample."""
    return np.array([np.nanmean([metric(scored[j], rows) for j, rows in r]) for r in plan])


def interval(per_seed: list[float], a_draws: np.ndarray, b_draws: np.ndarray) -> dict[str, Any]:
    """The paired difference's summary from both recipes' scores on one plan."""
    diff = a_draws - b_draws
    ok = diff[np.isfinite(diff)]
    low, high = np.percentile(ok, [2.5, 97.5]) if len(ok) else (np.nan, np.nan)
    finite = np.isfinite([low, high]).all()
    return {
        "diff": float(np.nanmean(per_seed)),
        "low": float(low) if finite else None,
        "high": float(high) if finite else None,
        "distinguishable": bool(finite and (low > 0 or high < 0)),
        "per_seed": [float(d) for d in per_seed],
    }


def check_paired(a: list[Scored], b: list[Scored]) -> None:
    """Both recipes scored on the same seeds, each on the same images (ValueError otherwise)."""
    if len(a) != len(b) or not a:
        raise ValueError("both recipes need predictions on the same seeds")
    for sa, sb in zip(a, b):
        if sa.targets.shape != sb.targets.shape or not np.array_equal(sa.targets, sb.targets, equal_nan=True):
            raise ValueError("the two recipes were not scored on the same images")


def paired_bootstrap(
    a: list[Scored],
    b: list[Scored],
    metric: Callable[[Scored, np.ndarray], float],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over seeds of ``metric(a) - metric(b)`` and its 95% two-level percentile-bootstrap interval.

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
    check_paired(a, b)
    every = [np.arange(len(s.targets)) for s in a]
    per_seed = [metric(sa, r) - metric(sb, r) for sa, sb, r in zip(a, b, every)]
    plan = resample_plan([len(s.targets) for s in a], resamples, seed)
    return interval(per_seed, metric_draws(a, plan, metric), metric_draws(b, plan, metric))
