"""Per-class decision thresholds that maximise F1 (or F-beta), as pure functions of arrays.

A fixed 0.5 threshold is why the seed blog's MobileNetV2 on COCO had precision 87 but recall 46: a sigmoid trained
on rare positives rarely passes 0.5. Per class, the threshold here is the candidate (a predicted probability; a
sample is positive when ``p >= t``) with the highest F-beta on the calibration data, the same search as taking the
arg-max of F over scikit-learn's ``precision_recall_curve`` but for every class in one vectorised pass. Among
equal scores the highest threshold wins. The tests check it against a brute-force search and against scikit-learn.

Rules, in order:
- a class with fewer than ``min_positives`` positives (no positives at all included: F is 0 at every threshold)
  takes the global threshold, the one that maximises micro-F-beta over all classes pooled;
- with ``shrink = k > 0``, a fitted threshold moves toward the global one by ``k / (positives + k)``, so rare
  classes move most;
- NaN or inf probabilities are an error;
- an unknown label (NaN in the targets) counts as neither a positive nor a negative of its class.

Cross-fitting (:func:`cross_fit`) scores every sample with thresholds fitted on the other folds only, so the gain it
reports is not measured on the data the thresholds were fitted on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from finetune.config.objectives import CONSTRAINED
from finetune.labels import known_of, positives_of


def _check(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    targets, probs = np.asarray(targets), np.asarray(probs, dtype=np.float64)
    if targets.ndim != 2 or targets.shape != probs.shape:
        raise ValueError(f"expected two [samples, classes] arrays of one shape, got {targets.shape} and {probs.shape}")
    if not np.isfinite(probs).all():
        bad = np.argwhere(~np.isfinite(probs))[0]
        raise ValueError(f"probabilities contain NaN or inf (first at sample {bad[0]}, class {bad[1]})")
    if len(probs) == 0:
        raise ValueError("no samples to calibrate on")
    return np.where(known_of(targets), positives_of(targets), np.nan), probs


def _ranked(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class, scores high to low, and the cumulative TP and FP (known positives / negatives) down that order."""
    # Any sort order works: within a tie group only the group's last row is scored, and its counts do not depend on
    # the order inside the group; numpy's default introsort is ~4x faster here than a stable sort.
    order = np.argsort(-p, axis=0)
    s = np.take_along_axis(p, order, axis=0)
    t = np.take_along_axis(y, order, axis=0)
    tp = np.cumsum(t == 1, axis=0, dtype=np.float64)
    fp = np.cumsum(t == 0, axis=0, dtype=np.float64)
    last_of_tie = np.ones_like(s, dtype=bool)  # tied probabilities are one threshold: only a group's last row counts
    last_of_tie[:-1] = s[:-1] != s[1:]
    return s, tp, fp, last_of_tie


def best_thresholds(targets: np.ndarray, probs: np.ndarray, beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the threshold with the highest F-beta and that F-beta.

    Args:
        targets: ``[n, c]`` multi-hot ground truth.
        probs: ``[n, c]`` probabilities (any finite scores work).
        beta: F-beta's beta (1 = F1; > 1 favours recall).

    Returns:
        ``[c]`` thresholds (predict ``p >= t``) and ``[c]`` F-beta values reached; a class without positives gets
        threshold ``inf`` (predict nothing) and score 0.
    """
    y, p = _check(targets, probs)
    c = p.shape[1]
    s, tp, fp, last_of_tie = _ranked(y, p)
    fn = tp[-1:] - tp
    b2 = beta * beta
    den = (1 + b2) * tp + b2 * fn + fp
    f = np.divide((1 + b2) * tp, den, out=np.zeros_like(tp), where=den > 0)
    f[~last_of_tie] = -1.0
    best = np.argmax(f, axis=0)  # first maximum = the highest threshold among equal F
    cols = np.arange(c)
    thr, score = s[best, cols], np.maximum(f[best, cols], 0.0)
    no_pos = tp[-1] == 0
    thr[no_pos], score[no_pos] = np.inf, 0.0
    return thr, score


OBJECTIVES = ("f1", "fbeta", *CONSTRAINED)
_EPS = 1e-9  # counts are compared as tp >= target * n - eps: 9 of 10 meets a 0.9 target whatever the rounding


def constrained_thresholds(
    targets: np.ndarray, probs: np.ndarray, objective: str, target: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, the operating point that meets a precision or recall target at the best value of the other.

    Every distinct score is a candidate threshold (predict ``p >= t``):

    - ``recall_at_least``: among thresholds with recall >= ``target``, the one with the highest precision;
    - ``precision_at_least``: among thresholds with precision >= ``target``, the one with the highest recall (then
      the highest precision). When no threshold reaches the target, the stated fallback is the threshold with the
      highest precision there is (then the highest recall): the point closest to the target.

    Among equal points the highest threshold wins. A class without positives gets ``inf`` (predict nothing).

    Returns:
        ``[c]`` thresholds, ``[c]`` the constrained quantity reached there (recall or precision), ``[c]`` whether
        the target was met.
    """
    if objective not in CONSTRAINED:
        raise ValueError(f"objective must be one of {', '.join(CONSTRAINED)}, not {objective!r}")
    y, p = _check(targets, probs)
    c = p.shape[1]
    s, tp, fp, valid = _ranked(y, p)
    k = tp + fp  # known entries predicted positive
    positives = tp[-1:]
    precision = np.divide(tp, k, out=np.zeros_like(tp), where=k > 0)
    recall = np.divide(tp, positives, out=np.zeros_like(tp), where=positives > 0)
    if objective == "recall_at_least":
        ok = valid & (tp >= target * positives - _EPS)
        key = np.where(ok, precision, -1.0)
        reached_all = recall
    else:
        ok = valid & (tp > 0) & (tp >= target * k - _EPS)
        key = np.where(ok, 2.0 * tp + precision, -1.0)  # the most positives found, then the best precision
        reached_all = precision
    met = ok.any(axis=0)
    best = np.argmax(key, axis=0)  # first maximum = the highest threshold among equal points
    if not met.all():  # precision target out of reach: the highest precision, then the most positives
        top = np.where(valid & (tp > 0), precision, -1.0)
        closest = np.where(np.abs(top - top.max(0, keepdims=True)) < 1e-12, tp, -1.0)
        best = np.where(met, best, np.argmax(closest, axis=0))
    cols = np.arange(c)
    thr, reached = s[best, cols], reached_all[best, cols]
    no_pos = positives[0] == 0
    thr[no_pos], reached[no_pos], met[no_pos] = np.inf, 0.0, False
    return thr, reached, met


def global_threshold(targets: np.ndarray, probs: np.ndarray, beta: float = 1.0) -> tuple[float, float]:
    """The single threshold with the highest micro-F-beta over all classes pooled, and that score."""
    y, p = _check(targets, probs)
    thr, score = best_thresholds(y.reshape(-1, 1), p.reshape(-1, 1), beta)
    return (0.5 if np.isinf(thr[0]) else float(thr[0])), float(score[0])


@dataclass
class Calibration:
    """Fitted thresholds and how each was chosen."""

    thresholds: np.ndarray
    global_threshold: float
    support: np.ndarray
    score: np.ndarray  # per class on the calibration data: its F-beta, or the constrained precision/recall reached
    source: list[str]  # "fitted", "global" (too few positives) or "unmet" (a precision target out of reach)
    metric: str = "f1"
    beta: float = 1.0
    names: list[str] = field(default_factory=list)
    split: str = ""
    objective: list[str] = field(default_factory=list)  # per class (empty: every class has ``metric``)
    target: list[float | None] = field(default_factory=list)  # per class, for the constrained objectives

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for ``thresholds.json``."""
        return {
            "metric": self.metric,
            "beta": self.beta,
            "split": self.split,
            "global_threshold": self.global_threshold,
            "classes": [
                {
                    "name": self.names[i] if self.names else str(i),
                    "threshold": float(self.thresholds[i]),
                    "support": int(self.support[i]),
                    "score": float(self.score[i]),
                    "source": self.source[i],
                    "objective": self.objective[i] if self.objective else self.metric,
                    "target": self.target[i] if self.target else None,
                }
                for i in range(len(self.thresholds))
            ],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Calibration:
        """Read what :meth:`to_json` wrote."""
        rows = doc["classes"]
        return cls(
            thresholds=np.array([r["threshold"] for r in rows]),
            global_threshold=doc["global_threshold"],
            support=np.array([r["support"] for r in rows]),
            score=np.array([r["score"] for r in rows]),
            source=[r["source"] for r in rows],
            metric=doc["metric"],
            beta=doc["beta"],
            names=[r["name"] for r in rows],
            split=doc.get("split", ""),
            objective=[r.get("objective", doc["metric"]) for r in rows],
            target=[r.get("target") for r in rows],
        )


@dataclass(kw_only=True)
class CalibrationSettings:
    """``[calibrate]`` as plain values, with the fixed threshold it is compared against."""

    enabled: bool = True
    split: str = "val"
    metric: str = "f1"
    beta: float = 1.0
    min_positives: int = 5
    shrink: float | str = 0.0  # or "auto"
    folds: int = 5
    seed: int = 0
    fixed: float = 0.5
    target: float | None = None  # for precision_at_least / recall_at_least
    margin: float = 0.0  # constrained objectives aim at target + margin on the fitting split
    probabilities: str = "none"  # per-class scaling fitted before the thresholds: none | temperature | platt
    overrides: dict[int, tuple[str, float | None]] = field(default_factory=dict)  # class index -> (objective, target)

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~finetune.thresholds.fit_thresholds`."""
        return {
            "metric": self.metric,
            "beta": self.beta,
            "min_positives": self.min_positives,
            "shrink": self.shrink,
            "target": self.target,
            "margin": self.margin,
            "overrides": self.overrides,
        }

    def for_split(self, split: str) -> CalibrationSettings:
        """These settings fitted on ``split`` and switched on (a re-calibration asked for it)."""
        return replace(self, enabled=True, split=split)


def _objectives(c: int, metric: str, target: float | None, overrides: dict | None) -> list[tuple[str, float | None]]:
    """Each class's (objective, target): the section's, or its override."""
    if metric not in OBJECTIVES:
        raise ValueError(f"metric must be one of {', '.join(OBJECTIVES)}, not {metric!r}")
    out = [(metric, target)] * c
    for i, (obj, t) in (overrides or {}).items():
        out[i] = (obj, t)
    for obj, t in set(out):
        if obj in CONSTRAINED and (t is None or not 0 < t <= 1):
            raise ValueError(f"{obj} needs a target in (0, 1], not {t}")
    return out


def _fit_each(
    y: np.ndarray, p: np.ndarray, objectives: list[tuple[str, float | None]], beta: float, margin: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class, for its objective: the fitted threshold, its score, the objective's pooled threshold, target met."""
    c = p.shape[1]
    thr, score, glob, met = np.zeros(c), np.zeros(c), np.zeros(c), np.ones(c, dtype=bool)
    for obj, t in set(objectives):
        cols = np.array([i for i, o in enumerate(objectives) if o == (obj, t)])
        if obj in CONSTRAINED:
            aim = min(1.0, t + margin)
            thr[cols], score[cols], met[cols] = constrained_thresholds(y[:, cols], p[:, cols], obj, aim)
            g, _, _ = constrained_thresholds(y[:, cols].reshape(-1, 1), p[:, cols].reshape(-1, 1), obj, aim)
            glob[cols] = 0.5 if np.isinf(g[0]) else g[0]
        else:
            fb = 1.0 if obj == "f1" else beta
            thr[cols], score[cols] = best_thresholds(y[:, cols], p[:, cols], fb)
            glob[cols], _ = global_threshold(y, p, fb)
    return thr, score, glob, met


def fit_thresholds(
    targets: np.ndarray,
    probs: np.ndarray,
    metric: str = "f1",
    beta: float = 1.0,
    min_positives: int = 1,
    shrink: float = 0.0,
    target: float | None = None,
    margin: float = 0.0,
    overrides: dict[int, tuple[str, float | None]] | None = None,
) -> Calibration:
    """Per-class thresholds for each class's objective, with the min-positives fallback and shrinkage.

    Args:
        targets: ``[n, c]`` multi-hot ground truth of the calibration split.
        probs: ``[n, c]`` predicted probabilities.
        metric: The objective: ``f1``, ``fbeta``, ``precision_at_least`` or ``recall_at_least``.
        beta: Used when ``metric = "fbeta"``.
        min_positives: Classes with fewer positives take the global threshold of their objective (at least 1).
        shrink: Pseudo-count pulling F-type thresholds toward the global one (0 = off); a constrained threshold is
            not moved (it would no longer meet its target).
        target: The precision or recall a constrained objective must reach.
        margin: A constrained objective aims at ``min(1, target + margin)`` here, so that it still meets ``target``
            on new data more often.
        overrides: Class index -> (objective, target), in place of ``metric`` / ``target`` for that class.

    Returns:
        The calibration.
    """
    y, p = _check(targets, probs)
    objectives = _objectives(p.shape[1], metric, target, overrides)
    support = (y == 1).sum(0)
    fitted = support >= max(1, min_positives)
    thr, score, glob, met = _fit_each(y, p, objectives, beta, margin)
    source = ["global" if not f else "fitted" if m else "unmet" for f, m in zip(fitted, met)]
    b = 1.0 if metric == "f1" else beta
    out = np.where(fitted, thr, glob)
    is_f = np.array([o[0] not in CONSTRAINED for o in objectives])
    if shrink > 0:
        out = np.where(fitted & is_f, (support * out + shrink * glob) / (support + shrink), out)
    g_main = float(glob[is_f][0]) if is_f.any() else float(glob[0])
    return Calibration(
        thresholds=out,
        global_threshold=g_main,
        support=support,
        score=score,
        source=source,
        metric=metric,
        beta=b,
        objective=[o[0] for o in objectives],
        target=[o[1] if o[0] in CONSTRAINED else None for o in objectives],
    )


def cross_fit(
    targets: np.ndarray,
    probs: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    fit: Callable[..., Calibration] = fit_thresholds,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold thresholds: row ``i`` gets thresholds fitted on the folds that do not contain it.

    Args:
        targets: ``[n, c]`` ground truth.
        probs: ``[n, c]`` probabilities.
        folds: Number of folds (at most ``n``).
        seed: Shuffling seed for the fold split.
        fit: The fitting function (``fit_thresholds``; tests pass a spy).
        **options: Passed to ``fit``.

    Returns:
        ``[n, c]`` per-row thresholds and ``[n]`` fold index of each row.
    """
    y, p = _check(targets, probs)
    n = len(p)
    if n < 2:
        raise ValueError("cross-fitting needs at least 2 samples")
    k = min(folds, n)
    per_row = np.empty_like(p)
    fold_of = np.empty(n, dtype=int)
    for f, (fit_idx, score_idx) in enumerate(KFold(k, shuffle=True, random_state=seed).split(p)):
        per_row[score_idx] = fit(y[fit_idx], p[fit_idx], **options).thresholds
        fold_of[score_idx] = f
    return per_row, fold_of


SHRINK_CANDIDATES = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 1e6)  # 1e6: every class at the global threshold


def choose_shrink(
    targets: np.ndarray,
    probs: np.ndarray,
    fixed: float,
    folds: int = 5,
    seed: int = 0,
    candidates: tuple[float, ...] = SHRINK_CANDIDATES,
    **options: Any,
) -> tuple[float, dict[float, dict[str, float]]]:
    """The shrinkage to use, by cross-fitting on the calibration split itself (no other data is looked at).

    Among the candidates whose out-of-fold micro-F1 is at least the fixed threshold's (less 0.005), the one with the
    best out-of-fold macro-F1 (ties: the stronger shrinkage); when none keeps micro-F1, the best micro-F1.

    Returns:
        The chosen shrinkage and, per candidate, its out-of-fold ``macro_f1`` and ``micro_f1``.
    """
    from finetune.eval.metrics import summarize

    y, p = _check(targets, probs)
    if len(y) < 2:  # nothing to cross-fit on (a 1-image val split): the strongest shrinkage, towards ``fixed``
        return max(candidates), {}
    floor = summarize(y, p, fixed)["micro_f1"] - 0.005
    scores = {}
    for k in candidates:
        per_row, _ = cross_fit(y, p, folds, seed, **{**options, "shrink": k})
        s = summarize(y, p, per_row)
        scores[k] = {"macro_f1": s["macro_f1"], "micro_f1": s["micro_f1"]}
    keeping = [k for k in candidates if scores[k]["micro_f1"] >= floor]
    if keeping:
        return max(keeping, key=lambda k: (scores[k]["macro_f1"], k)), scores
    return max(candidates, key=lambda k: (scores[k]["micro_f1"], k)), scores
