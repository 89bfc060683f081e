"""The single-label reject option: below a threshold on the top probability the answer is "none of the above".

``[calibrate] objective = "accuracy_at_least"``, ``target = 0.95``: on the calibration split, the threshold ``t`` on
the top probability (answer when ``max p >= t``) that answers the most images while the answered ones are right at
least ``target`` of the time (aiming at ``target + margin``). It is the precision-at-least search of
:func:`~finetune.eval.thresholds.constrained_thresholds` on one column: "correct" as the label, the top probability
as the score, except that among the thresholds that meet the target it takes the lowest (the most answered). When
no threshold reaches the target, the stated fallback is the most accurate point there is.

What a user needs to know is what happens on new images, so the report gives the coverage (share answered) and the
accuracy of the answered images on data the threshold was not fitted on (the test split, else cross-fitting on the
calibration split), with the whole held-out coverage/accuracy curve (``coverage_accuracy.png``). ``reject.json``
holds the threshold; the run's ``predict`` and every export (through ``model.json``'s ``reject_below``) apply it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from finetune import runfiles
from finetune.eval.probabilities import top_label
from finetune.eval.thresholds import CalibrationSettings
from finetune.io import atomic_write_bytes, atomic_write_json
from finetune.predictions import Predictions

_EPS = 1e-9  # accuracy compared as acc >= target - eps: 9 of 10 meets a 0.9 target whatever the rounding
CURVE_POINTS = 101


def _top(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top probability per row, and whether the top class is the label (:func:`top_label`, flattened)."""
    hit, top = top_label(targets, probs)
    return top[:, 0], hit[:, 0] > 0


def reject_threshold(targets: np.ndarray, probs: np.ndarray, target: float) -> tuple[float, float, bool]:
    """The lowest top-probability threshold whose answered rows are right at least ``target`` of the time.

    Every distinct top probability is a candidate (answer when ``max p >= t``); the lowest one that meets the target
    answers the most rows. When none does, the stated fallback is the most accurate point (then the one answering
    the most). When no row is right at all, the threshold is just above the highest top probability: answer none.

    Returns:
        The threshold, the accuracy of the answered rows there, and whether the target was met.
    """
    top, correct = _top(targets, probs)
    order = np.argsort(-top, kind="stable")
    s = top[order]
    answered = np.arange(1, len(s) + 1)
    accuracy = np.cumsum(correct[order]) / answered
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # a tie group is one threshold: its last row counts
    ok = ends[accuracy[ends] >= target - _EPS]
    if len(ok):
        return float(s[ok[-1]]), float(accuracy[ok[-1]]), True
    if not correct.any():
        return float(np.nextafter(s[0], np.inf)), 0.0, False
    best = ends[np.flatnonzero(accuracy[ends] >= accuracy[ends].max() - 1e-12)[-1]]
    return float(s[best]), float(accuracy[best]), False


def coverage_accuracy(targets: np.ndarray, probs: np.ndarray, threshold: float | np.ndarray) -> tuple[float, float]:
    """Share of rows answered (top probability >= ``threshold``, one or one per row) and their accuracy."""
    top, correct = _top(targets, probs)
    answered = top >= threshold
    return float(answered.mean()), float(correct[answered].mean()) if answered.any() else float("nan")


def _finite(x: float) -> float | None:
    """A number for JSON: NaN (nothing answered) becomes null."""
    return None if not np.isfinite(x) else float(x)


def curve(targets: np.ndarray, probs: np.ndarray, points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """The coverage/accuracy curve: one point per distinct top probability, thinned to about ``points``."""
    top, correct = _top(targets, probs)
    order = np.argsort(-top, kind="stable")
    s, hits = top[order], np.cumsum(correct[order])
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each tie group
    keep = ends[np.unique(np.linspace(0, len(ends) - 1, min(points, len(ends))).round().astype(int))]
    n = len(s)
    return {
        "threshold": s[keep].tolist(),
        "coverage": ((keep + 1) / n).tolist(),
        "accuracy": (hits[keep] / (keep + 1)).tolist(),
    }


def _held_out(cs: CalibrationSettings, outs: dict[str, Predictions], aim: float) -> tuple[str, np.ndarray, Any]:
    """Targets, probabilities and per-row thresholds on data the threshold was not fitted on."""
    if "test" in outs and cs.split != "test":
        test = outs["test"]
        thr, _, _ = reject_threshold(outs[cs.split].targets, outs[cs.split].probs, aim)
        return "test split", test, np.full(len(test.probs), thr)
    out = outs[cs.split]
    per_row = np.empty(len(out.probs))
    folds = KFold(min(cs.folds, len(per_row)), shuffle=True, random_state=cs.seed)
    for fit_idx, score_idx in folds.split(per_row):
        per_row[score_idx], _, _ = reject_threshold(out.targets[fit_idx], out.probs[fit_idx], aim)
    return f"{folds.n_splits}-fold cross-fitting on {cs.split}", out, per_row


def fit_reject(cs: CalibrationSettings, outs: dict[str, Predictions]) -> dict[str, Any]:
    """Fit the reject threshold on ``cs.split`` and measure it on held-out data (what ``reject.json`` holds)."""
    assert cs.target is not None  # the recipe check asks for one
    aim = min(1.0, cs.target + cs.margin)
    fit_on = outs[cs.split]
    thr, reached, met = reject_threshold(fit_on.targets, fit_on.probs, aim)
    how, held, per_row = _held_out(cs, outs, aim)
    coverage, accuracy = coverage_accuracy(held.targets, held.probs, per_row)
    all_coverage, all_accuracy = coverage_accuracy(held.targets, held.probs, 0.0)
    return {
        "objective": "accuracy_at_least",
        "target": cs.target,
        "margin": cs.margin,
        "threshold": thr,
        "fitted_on": cs.split,
        "source": "fitted" if met else "unmet",
        "fitting": dict(
            zip(("coverage", "accuracy"), map(_finite, coverage_accuracy(fit_on.targets, fit_on.probs, thr)))
        ),
        "held_out": {
            "how": how,
            "coverage": coverage,
            "accuracy": _finite(accuracy),
            "met": bool(accuracy >= cs.target),
        },
        "answer_all": {"coverage": all_coverage, "accuracy": all_accuracy},
        "curve": curve(held.targets, held.probs),
    }


def reject_line(r: dict[str, Any]) -> str:
    """One line: the threshold, and coverage / accuracy on held-out data against answering every image."""
    h, a = r["held_out"], r["answer_all"]
    shown = "-" if h["accuracy"] is None else f"{100 * h['accuracy']:.1f}%"
    unmet = "" if r["source"] == "fitted" else f" (the target is out of reach on {r['fitted_on']}: the most accurate)"
    return (
        f"reject option: answer when the top probability >= {r['threshold']:.3f}{unmet} (accuracy >= "
        f"{r['target']:g}, fitted on {r['fitted_on']}); on data it was not fitted on ({h['how']}) it answers "
        f"{100 * h['coverage']:.1f}% of images at accuracy {shown} (answering all: "
        f"{100 * a['accuracy']:.1f}%)"
    )


def save_reject(run: Path, reject: dict[str, Any] | None) -> None:
    """Write ``reject.json`` (the old one kept as ``reject.prev.json``), or retire it with None."""
    path = run / runfiles.REJECT
    if path.is_file():
        atomic_write_bytes(run / runfiles.REJECT_PREV, path.read_bytes())
    if reject is not None:
        atomic_write_json(path, {k: v for k, v in reject.items() if k != "curve"})
        return
    path.unlink(missing_ok=True)
    if (run / runfiles.COVERAGE).is_file():  # no plot without a threshold behind it (the page embeds it)
        (run / runfiles.COVERAGE).replace(run / runfiles.COVERAGE_PREV)


def load_reject(run: Path) -> float | None:
    """The run's reject threshold (``reject.json``), or None when it answers every image."""
    path = run / runfiles.REJECT
    return float(json.loads(path.read_text())["threshold"]) if path.is_file() else None
