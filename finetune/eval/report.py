"""A run's report from its predictions: per-class thresholds, report.json / report.md, thresholds.json and plots.

Arrays in, files out: the predictions come from the caller (the training run, or ``eval`` / ``calibrate``), and the
files go to the run directory given as a path.

The calibration gain is quoted on data the thresholds were not fitted on: the test split when there is one,
otherwise k-fold cross-fitting on the calibration split. A run's task decides what its report holds; only a
multi-label task has thresholds to calibrate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from finetune import runfiles
from finetune.config.objectives import CONSTRAINED, REJECT
from finetune.data.split import ClassMap
from finetune.errors import UserError
from finetune.eval import plots
from finetune.eval.metrics import prf, summarize
from finetune.eval.probabilities import Scaling, brier, ece, fit_scaling, top_label
from finetune.eval.reject import fit_reject, save_reject
from finetune.eval.run_report import RunReport
from finetune.eval.tasks import Task
from finetune.eval.thresholds import Calibration, CalibrationSettings, choose_shrink, cross_fit, fit_thresholds
from finetune.io import atomic_write_bytes, atomic_write_json, read_json
from finetune.predictions import Predictions


def resolve_shrink(cs: CalibrationSettings, out: Predictions) -> tuple[CalibrationSettings, dict | None]:
    """``shrink = "auto"`` replaced by the cross-fitted choice on the calibration split (and the scores behind it)."""
    if cs.shrink != "auto":
        return cs, None
    options = {**cs.options}
    options.pop("shrink")
    k, scores = choose_shrink(out.targets, out.probs, cs.fixed, cs.folds, cs.seed, **options)
    return replace(cs, shrink=k), {f"{c:g}": v for c, v in scores.items()}


def fit_calibration(cs: CalibrationSettings, out: Predictions, classes: ClassMap, role: str) -> Calibration:
    """Per-class thresholds on one split's predictions."""
    try:
        cal = fit_thresholds(out.targets, out.probs, **cs.options)
    except ValueError as err:
        raise UserError(f"calibrate: {err}") from None
    cal.names, cal.split = list(classes.names), role
    return cal


def _honest(
    cs: CalibrationSettings, report: dict[str, Any], out: Predictions, role: str
) -> tuple[dict, Any, dict[str, Any]]:
    """The gain on data the thresholds were not fitted on: the test split, else cross-fitting on ``role``.

    Returns:
        The summary, per-class F1 at the fixed threshold, and per-class precision/recall/F1/support calibrated.
    """
    if "test" in report["splits"] and role != "test":
        test = report["splits"]["test"]
        honest = {"how": "test split", "fixed": test["summary"], "calibrated": test["calibrated"]["summary"]}
        rows = test["per_class"]
        held = {k: np.array([r[f"{k}_cal"] for r in rows]) for k in ("precision", "recall", "f1")}
        held["support"] = np.array([r["support"] for r in rows])
        return honest, [r["f1"] for r in rows], held
    if len(out.targets) < 2:  # no held-out data and nothing to cross-fit on: no gain is claimed
        per_row, how = np.full(np.shape(out.probs), cs.fixed), f"none: {role} has 1 image, too few to cross-fit"
    else:
        per_row, _ = cross_fit(out.targets, out.probs, cs.folds, cs.seed, **cs.options)
        how = f"{min(cs.folds, len(per_row))}-fold cross-fitting on {role}"
    honest = {
        "how": how,
        "fixed": summarize(out.targets, out.probs, cs.fixed),
        "calibrated": summarize(out.targets, out.probs, per_row),
    }
    return honest, prf(out.targets, out.probs, cs.fixed)["f1"], prf(out.targets, out.probs, per_row)


def operating_points(cal: Calibration, out: Predictions, held: dict[str, Any], how: str) -> dict[str, Any] | None:
    """Per constrained class: its target, what it reached on the fitting split and on held-out data, and the counts.

    A class without a held-out positive has no held-out recall; it is listed, and left out of the held-out count.
    """
    fit = prf(out.targets, out.probs, cal.thresholds)
    rows = []
    for i, (obj, target) in enumerate(zip(cal.objective, cal.target)):
        if obj not in CONSTRAINED:
            continue
        key, other = ("recall", "precision") if obj == "recall_at_least" else ("precision", "recall")
        scored = held["support"][i] > 0
        rows.append(
            {
                "name": cal.names[i] if cal.names else str(i),
                "objective": obj,
                "target": target,
                "threshold": float(cal.thresholds[i]),
                "source": cal.source[i],
                "fitting": float(fit[key][i]),
                "fitting_other": float(fit[other][i]),
                "held_out": float(held[key][i]) if scored else None,
                "held_out_other": float(held[other][i]) if scored else None,
                "held_out_positives": int(held["support"][i]),
                "met_fitting": bool(fit[key][i] >= target - 1e-9),
                "met_held_out": bool(held[key][i] >= target - 1e-9) if scored else None,
            }
        )
    if not rows:
        return None
    scored = [r for r in rows if r["met_held_out"] is not None]
    return {
        "how": how,
        "classes": len(rows),
        "met_fitting": sum(r["met_fitting"] for r in rows),
        "scored_held_out": len(scored),
        "met_held_out": sum(bool(r["met_held_out"]) for r in scored),
        "rows": rows,
    }


def _add_calibration(
    run: Path,
    report: dict[str, Any],
    cs: CalibrationSettings,
    cal: Calibration,
    outs: dict[str, Predictions],
    classes: ClassMap,
) -> None:
    role = cal.split
    honest, f1_fixed, held = _honest(cs, report, outs[role], role)
    f1_cal = held["f1"]
    report["calibration"] = {
        "fitted_on": role,
        "metric": cal.metric,
        "beta": cal.beta,
        "min_positives": cs.min_positives,
        "shrink": cs.shrink,
        "global_threshold": cal.global_threshold,
        "margin": cs.margin,
        "honest": honest,
        "targets": operating_points(cal, outs[role], held, honest["how"]),
    }
    save_thresholds(run, cal)
    out = outs[role]
    plotted = plots.pr_curves(out.targets, out.probs, cal.thresholds, classes.names, run / runfiles.PR_CURVES, role)
    title = f"per-class F1, {honest['how']}: fixed {cs.fixed:g} vs calibrated"
    plots.f1_bars(np.asarray(f1_fixed), np.asarray(f1_cal), classes.names, run / runfiles.F1_BARS, title)
    report["calibration"]["plots"] = {runfiles.PR_CURVES: plotted, runfiles.F1_BARS: honest["how"]}


def _held_out_scaling(cs: CalibrationSettings, outs: dict[str, Predictions], scaling: Scaling) -> tuple:
    """Targets and probabilities before/after scaling on data it was not fitted on: test, else cross-fitting."""
    if "test" in outs and cs.split != "test":
        y, before = outs["test"].targets, outs["test"].probs
        return "test split", y, before, scaling.apply(before)
    y, before = outs[cs.split].targets, outs[cs.split].probs
    after = np.empty_like(before, dtype=np.float64)
    folds = KFold(min(cs.folds, len(before)), shuffle=True, random_state=cs.seed)
    for fit_idx, score_idx in folds.split(before):
        s = fit_scaling(y[fit_idx], before[fit_idx], cs.probabilities, cs.min_positives, softmax=scaling.softmax)
        after[score_idx] = s.apply(before[score_idx])
    return f"{folds.n_splits}-fold cross-fitting on {cs.split}", y, before, after


def save_scaling(run: Path, scaling: Scaling | None) -> None:
    """Write ``probabilities.json`` (which folds into the run's model from then on), or retire it with None.

    Called once the thresholds fitted on that scale are saved, so the model and ``thresholds.json`` never disagree.
    The file it replaces (and a reliability diagram without a scaling behind it) is kept as ``*.prev.*``.
    """
    path = run / runfiles.PROBABILITIES
    if path.is_file():
        atomic_write_bytes(run / runfiles.PROBABILITIES_PREV, path.read_bytes())
    if scaling is not None:
        atomic_write_json(path, scaling.to_json())
        return
    path.unlink(missing_ok=True)
    if (run / runfiles.RELIABILITY).is_file():
        (run / runfiles.RELIABILITY).replace(run / runfiles.RELIABILITY_PREV)


def scale_probabilities(
    run: Path, cs: CalibrationSettings, outs: dict[str, Predictions], classes: ClassMap, softmax: bool = False
) -> tuple[dict[str, Any] | None, Scaling | None]:
    """Fit ``calibrate.probabilities`` on the calibration split (``outs`` is left as it is; apply the scaling).

    Writes ``reliability.png``; returns ECE and Brier before/after on held-out data and the scaling (for
    :func:`save_scaling`). With ``"none"``: nothing to fit, ``(None, None)``. ``softmax``: a single-label run (one
    temperature; top-label ECE and the reliability of the top probability).
    """
    if cs.probabilities == "none":
        return None, None
    fit_on = outs[cs.split]
    scaling = fit_scaling(fit_on.targets, fit_on.probs, cs.probabilities, cs.min_positives, softmax=softmax)
    scaling.names, scaling.split = list(classes.names), cs.split
    how, y, before, after = _held_out_scaling(cs, outs, scaling)
    shown = (*top_label(y, before), top_label(y, after)[1]) if softmax else (y, before, after)
    plots.reliability_png(*shown, run / runfiles.RELIABILITY, f"{cs.probabilities} scaling, {how}")
    stats = {
        "method": cs.probabilities,
        "fitted_on": cs.split,
        "how": how,
        "before": {"ece": ece(y, before, softmax=softmax), "brier": brier(y, before, softmax=softmax)},
        "after": {"ece": ece(y, after, softmax=softmax), "brier": brier(y, after, softmax=softmax)},
    }
    return stats, scaling


def write_report(
    run: Path,
    task: Task,
    classes: ClassMap,
    outs: dict[str, Predictions],
    *,
    cs: CalibrationSettings,
    extra: dict[str, Any] | None = None,
) -> tuple[RunReport, dict[str, Predictions]]:
    """Calibrate (when the task has thresholds and ``cs.enabled``), then write report.json and the task's files.

    Returns:
        The report, and the predictions it scored: with ``calibrate.probabilities``, new ones holding the scaled
        probabilities (what the caller's galleries should show); otherwise ``outs`` itself, which is never changed.
    """
    calibration, shrink_scores, scaled, scaling = None, None, None, None
    if cs.enabled:
        scaled, scaling = scale_probabilities(run, cs, outs, classes, softmax=not task.calibrates)
    if scaling is not None:
        outs = {role: out.with_probs(scaling.apply(out.probs)) for role, out in outs.items()}
    if task.calibrates and cs.enabled:
        cs, shrink_scores = resolve_shrink(cs, outs[cs.split])
        calibration = fit_calibration(cs, outs[cs.split], classes, cs.split)
    thr = calibration.thresholds if calibration is not None else None
    report: dict[str, Any] = {"run": str(run), "task": task.name, **(extra or {}), "splits": {}}
    if task.calibrates:
        report.update(threshold=cs.fixed, calibration=None)
    if scaled is not None:
        report["probabilities"] = scaled
    for name, out in outs.items():
        if name != "train":
            report["splits"][name] = task.split_report(out.targets, out.probs, classes, cs.fixed, thr)
    if calibration is not None:
        _add_calibration(run, report, cs, calibration, outs, classes)
        if shrink_scores is not None:
            report["calibration"]["shrink_auto"] = shrink_scores
    if not task.calibrates:  # single-label: the reject option (on the scaled scores), or none (an old one retired)
        report["reject"] = fit_reject(cs, outs) if cs.enabled and cs.metric == REJECT else None
        save_reject(run, report["reject"])
    save_scaling(run, scaling)  # after the thresholds: a run without calibration (or "none") keeps no scaling
    written = RunReport(report)
    task.write_extras(written, classes, run)
    atomic_write_json(run / runfiles.REPORT, report)
    return written, outs


def save_thresholds(run: Path, calibration: Calibration) -> None:
    """Write ``thresholds.json``; an existing one is kept as ``thresholds.prev.json`` (nothing is lost).

    The training run also keeps its own as ``thresholds.run.json`` (see ``training``), which ``calibrate`` never
    touches: a second ``calibrate`` replaces ``thresholds.prev.json``, not those.
    """
    path = run / runfiles.THRESHOLDS
    if path.exists():
        atomic_write_bytes(run / runfiles.THRESHOLDS_PREV, path.read_bytes())
    atomic_write_json(path, calibration.to_json())


def load_thresholds(run: Path, threshold: float | None, fixed: float) -> tuple[np.ndarray | float, str]:
    """The thresholds to apply: ``threshold`` if given, else the run's thresholds.json, else ``fixed``."""
    if threshold is not None:
        return threshold, f"fixed {threshold:g}"
    if (run / runfiles.THRESHOLDS).is_file():
        fix = f"run `finetune calibrate {run}` to write it again"
        raw = read_json(run / runfiles.THRESHOLDS, dict, fix)
        try:
            cal = Calibration.from_json(raw)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{run / runfiles.THRESHOLDS}: corrupt ({type(err).__name__}: {err}); {fix}") from None
        n = len(read_json(run / runfiles.CLASSES, list, "restore it")) if (run / runfiles.CLASSES).is_file() else None
        t = np.asarray(cal.thresholds, dtype=np.float64)
        if t.ndim != 1 or (n is not None and len(t) != n) or not (np.isfinite(t) & (t >= 0) & (t <= 1)).all():
            raise UserError(f"{run / runfiles.THRESHOLDS}: corrupt (not one finite threshold per class); {fix}")
        return cal.thresholds, f"calibrated on {cal.split or 'val'} (thresholds.json)"
    return fixed, f"fixed {fixed:g}"


def one_split_report(
    run: str, task: str, role: str, split: dict[str, Any], thresholds: tuple[float, str] | None = None
) -> RunReport:
    """An ``eval_<split>.json``: one split scored, nothing fitted.

    ``thresholds``: multi-label, the fixed threshold and which thresholds scored the split (a file, or that one).
    """
    report: dict[str, Any] = {"run": run, "task": task}
    if thresholds is not None:
        report.update(threshold=thresholds[0], thresholds=thresholds[1])
    report["splits"] = {role: split}
    return RunReport(report)
