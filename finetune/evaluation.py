"""Evaluating and calibrating a run: predictions on its splits, per-class thresholds, report.json and report.md.

The calibration gain is quoted on data the thresholds were not fitted on: the test split when there is one,
otherwise k-fold cross-fitting on the calibration split. A run's task decides what its report holds; only a
multi-label task has thresholds to calibrate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from finetune import build, plots
from finetune.data.coco import ClassMap, check_images
from finetune.errors import UserError
from finetune.metrics import prf, summarize
from finetune.rundir import RunDir
from finetune.tasks import Task
from finetune.thresholds import Calibration, CalibrationSettings, choose_shrink, cross_fit, fit_thresholds
from finetune.trainer import predict, selected_weights


def resolve_shrink(cs: CalibrationSettings, out: dict[str, Any]) -> tuple[CalibrationSettings, dict | None]:
    """``shrink = "auto"`` replaced by the cross-fitted choice on the calibration split (and the scores behind it)."""
    if cs.shrink != "auto":
        return cs, None
    options = {**cs.options}
    options.pop("shrink")
    k, scores = choose_shrink(out["targets"], out["probs"], cs.fixed, cs.folds, cs.seed, **options)
    return replace(cs, shrink=k), {f"{c:g}": v for c, v in scores.items()}


def fit_calibration(cs: CalibrationSettings, out: dict[str, Any], classes: ClassMap, role: str) -> Calibration:
    """Per-class thresholds on one split's predictions."""
    try:
        cal = fit_thresholds(out["targets"], out["probs"], **cs.options)
    except ValueError as err:
        raise UserError(f"calibrate: {err}") from None
    cal.names, cal.split = list(classes.names), role
    return cal


def _honest(cs: CalibrationSettings, report: dict[str, Any], out: dict[str, Any], role: str) -> tuple[dict, Any, Any]:
    """The gain on data the thresholds were not fitted on: the test split, else cross-fitting on ``role``."""
    if "test" in report["splits"] and role != "test":
        test = report["splits"]["test"]
        honest = {"how": "test split", "fixed": test["summary"], "calibrated": test["calibrated"]["summary"]}
        return honest, [r["f1"] for r in test["per_class"]], [r["f1_cal"] for r in test["per_class"]]
    per_row, _ = cross_fit(out["targets"], out["probs"], cs.folds, cs.seed, **cs.options)
    honest = {
        "how": f"{min(cs.folds, len(per_row))}-fold cross-fitting on {role}",
        "fixed": summarize(out["targets"], out["probs"], cs.fixed),
        "calibrated": summarize(out["targets"], out["probs"], per_row),
    }
    return honest, prf(out["targets"], out["probs"], cs.fixed)["f1"], prf(out["targets"], out["probs"], per_row)["f1"]


def _add_calibration(
    run: RunDir, report: dict[str, Any], cs: CalibrationSettings, cal: Calibration, outs: dict, classes: ClassMap
) -> None:
    role = cal.split
    honest, f1_fixed, f1_cal = _honest(cs, report, outs[role], role)
    report["calibration"] = {
        "fitted_on": role,
        "metric": cal.metric,
        "beta": cal.beta,
        "min_positives": cs.min_positives,
        "shrink": cs.shrink,
        "global_threshold": cal.global_threshold,
        "honest": honest,
    }
    save_thresholds(run, cal)
    out = outs[role]
    plotted = plots.pr_curves(out["targets"], out["probs"], cal.thresholds, classes.names, run / "pr_curves.png", role)
    title = f"per-class F1, {honest['how']}: fixed {cs.fixed:g} vs calibrated"
    plots.f1_bars(np.asarray(f1_fixed), np.asarray(f1_cal), classes.names, run / "f1_per_class.png", title)
    report["calibration"]["plots"] = {"pr_curves.png": plotted, "f1_per_class.png": honest["how"]}


def write_report(
    run: RunDir,
    task: Task,
    classes: ClassMap,
    outs: dict[str, dict[str, Any]],
    *,
    cs: CalibrationSettings,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate (when the task has thresholds and ``cs.enabled``), then write report.json and the task's files."""
    calibration, shrink_scores = None, None
    if task.calibrates and cs.enabled:
        cs, shrink_scores = resolve_shrink(cs, outs[cs.split])
        calibration = fit_calibration(cs, outs[cs.split], classes, cs.split)
    thr = calibration.thresholds if calibration is not None else None
    report: dict[str, Any] = {"run": str(run), "task": task.name, **(extra or {}), "splits": {}}
    if task.calibrates:
        report.update(threshold=cs.fixed, calibration=None)
    for name, out in outs.items():
        if name != "train":
            report["splits"][name] = task.split_report(out["targets"], out["probs"], classes, cs.fixed, thr)
    if calibration is not None:
        _add_calibration(run, report, cs, calibration, outs, classes)
        if shrink_scores is not None:
            report["calibration"]["shrink_auto"] = shrink_scores
    task.write_extras(report, classes, run.path)
    run.write_json("report.json", report)
    return report


def save_thresholds(run: RunDir, calibration: Calibration) -> None:
    """Write ``thresholds.json``; an existing one is kept as ``thresholds.prev.json`` (nothing is lost).

    The training run also keeps its own as ``thresholds.run.json`` (see ``training``), which ``calibrate`` never
    touches: a second ``calibrate`` replaces ``thresholds.prev.json``, not those.
    """
    path = run / "thresholds.json"
    if path.exists():
        run.write_bytes("thresholds.prev.json", path.read_bytes())
    run.write_json("thresholds.json", calibration.to_json())


def load_thresholds(run: RunDir, threshold: float | None, fixed: float) -> tuple[np.ndarray | float, str]:
    """The thresholds to apply: ``threshold`` if given, else the run's thresholds.json, else ``fixed``."""
    if threshold is not None:
        return threshold, f"fixed {threshold:g}"
    if (run / "thresholds.json").is_file():
        cal = Calibration.from_json(run.read_json("thresholds.json"))
        return cal.thresholds, f"calibrated on {cal.split or 'val'} (thresholds.json)"
    return fixed, f"fixed {fixed:g}"


def load_run_model(run: RunDir, recipe: Any, checkpoint: dict[str, Any] | None = None) -> tuple[Any, ClassMap]:
    """The trained model of a run (its best checkpoint, or ``checkpoint`` if already loaded), eval mode, on CPU.

    Returns:
        The model and the run's classes.
    """
    classes = run.classes()
    model = build.build_bare_model(recipe, len(classes))
    model.load_state_dict(selected_weights(checkpoint or run.checkpoint("best")))
    return model.eval(), classes


def predict_splits(
    run_dir: str | Path, roles: list[str], recipe: Any = None, console: Console | None = None
) -> tuple[dict[str, dict[str, Any]], ClassMap]:
    """Probabilities and targets of a run's best checkpoint on each of ``roles`` (train/val/test), unaugmented.

    Returns:
        Role -> ``{"targets", "probs", "index"}`` arrays, and the run's classes.
    """
    run = RunDir.open(run_dir)
    recipe = recipe or run.recipe()
    device, precision = build.build_device(recipe.train)
    settings = build.build_eval_settings(recipe, device, precision)
    settings.channels_last = False
    model, classes = load_run_model(run, recipe)
    model.to(device)
    outs = {}
    for role in roles:
        split = build.build_split(recipe.data, build.split_name(recipe, role), classes)
        missing = check_images(split.image_paths)
        if missing:
            raise UserError(f"{missing[0]}; check data.root and data.images")
        loader = build.build_loader(recipe.data, build.build_dataset(recipe.data, split, False), False)
        outs[role] = predict(model, loader, settings, console=console)
    return outs, classes


def calibrate_run(
    run_dir: str | Path, role: str = "val", console: Console | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Re-fit a run's thresholds on ``role`` with its best checkpoint; rewrites thresholds.json and the report.

    ``overrides`` (``calibrate.shrink=20``...) apply to this calibration only; the run's recipe.toml is unchanged.
    """
    run = RunDir.open(run_dir)
    recipe = run.recipe(overrides)
    task = build.build_task(recipe)
    if not task.calibrates:
        raise UserError(f"{run_dir}: a single-label run predicts the highest-scoring class; it has no thresholds")
    roles = [r for r in dict.fromkeys([role, "val", "test"]) if r != "test" or recipe.data.test]
    outs, classes = predict_splits(run.path, roles, recipe, console)
    old = run.read_json("report.json") if (run / "report.json").is_file() else {}
    extra = {k: v for k, v in old.items() if k in ("best_epoch", "select", "bad_images", "stop_reason")}
    return write_report(run, task, classes, outs, cs=build.build_calibration(recipe, role), extra=extra)


def evaluate(
    run_dir: str | Path, role: str = "test", threshold: float | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Score a run's best checkpoint on one split; writes ``eval_<role>.json`` in the run and returns the report."""
    run = RunDir.open(run_dir)
    recipe = run.recipe()
    task = build.build_task(recipe)
    outs, classes = predict_splits(run.path, [role], recipe, console)
    targets, probs = outs[role]["targets"], outs[role]["probs"]
    report: dict[str, Any] = {"run": str(run), "task": task.name}
    if task.calibrates:
        thr, how = load_thresholds(run, threshold, recipe.train.threshold)
        fixed = thr if np.isscalar(thr) else recipe.train.threshold
        report.update(threshold=fixed, thresholds=how)
        split = task.split_report(targets, probs, classes, fixed, None if np.isscalar(thr) else thr)
    else:
        split = task.split_report(targets, probs, classes, recipe.train.threshold)
    report["splits"] = {role: split}
    run.write_json(f"eval_{role}.json", report)
    return report
