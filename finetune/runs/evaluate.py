"""Scoring and re-calibrating a finished run: its best weights on its splits, from the assembly.

``evaluate_run`` writes ``eval_<split>.json``; ``calibrate_run`` re-fits ``thresholds.json`` and the report. The
numbers and files come from :mod:`finetune.eval.report`; the parts (recipe, classes, weights, loaders) from
:func:`finetune.assembly.build_from_run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from finetune import runfiles
from finetune.assembly import RunParts, build_from_run
from finetune.config.overrides import parse_override
from finetune.errors import UserError
from finetune.eval.report import load_thresholds, one_split_report, write_report
from finetune.eval.run_report import RunReport
from finetune.rundir.directory import REPORT_KEYS, RunDir
from finetune.rundir.lock import locking
from finetune.runs.predict import predict_run, predictions  # noqa: F401 - importable from here as in 0.7


@locking("finetune calibrate")
def _calibrate(
    run_dir: str | Path, role: str = "val", console: Console | None = None, overrides: list[str] | None = None
) -> RunReport:
    """:func:`calibrate_run` up to the page, holding the run's lock."""
    run = RunDir.open(run_dir)
    for item in overrides or []:  # anything else would be silently ignored: the weights are trained
        key = ".".join(parse_override(item)[0])
        if not (key.startswith("calibrate.") or key in ("data.root", "data.num_workers")):
            raise UserError(f"--set {key}: calibrate changes only calibrate.* (and data.root, data.num_workers)")
    recipe = run.recipe(overrides)
    nothing = not recipe.calibrate.reject and recipe.calibrate.probabilities == "none"
    if not RunParts(recipe).task.calibrates and nothing:
        raise UserError(
            f"{run_dir}: a single-label run predicts the highest-scoring class; it re-fits its reject option "
            "(--set calibrate.objective=accuracy_at_least --set calibrate.target=0.95) or its temperature "
            '(--set calibrate.probabilities="temperature")'
        )
    roles = [r for r in dict.fromkeys([role, "val", "test"]) if r != "test" or recipe.data.has_test]
    parts = build_from_run(run, roles, overrides, console, scaled=False)  # the scaling is re-fitted on raw scores
    outs = predictions(parts, roles)
    extra = RunReport.load(run / runfiles.REPORT).carried if (run / runfiles.REPORT).is_file() else {}
    cs = parts.calibration.for_split(role)
    return write_report(run.path, parts.task, parts.classes, outs, cs=cs, extra=extra)[0]


def calibrate_run(
    run_dir: str | Path, role: str = "val", console: Console | None = None, overrides: list[str] | None = None
) -> RunReport:
    """Re-fit a run's thresholds on ``role`` with its best checkpoint; rewrites thresholds.json and the reports.

    ``overrides`` (``calibrate.shrink=20``...) apply to this calibration only; the run's recipe.toml is unchanged.
    A single-label run has one threshold to fit, its reject option (``calibrate.objective = "accuracy_at_least"``),
    and its temperature (``calibrate.probabilities = "temperature"``): either or both. A run that keeps a
    ``report.html`` gets it rewritten too, since the page shows the thresholds.
    """
    if role not in ("val", "train"):
        raise UserError(f"--split {role!r}: thresholds are fitted on val or train (test stays unseen)")
    report = _calibrate(run_dir, role, console, overrides)
    if (Path(run_dir) / runfiles.REPORT_HTML).is_file():
        from finetune.runs.report_page import report_run

        kept = [o for o in overrides or [] if ".".join(parse_override(o)[0]) in REPORT_KEYS]  # calibrate.* is done
        try:
            report_run(run_dir, console=console, overrides=kept)
        except Exception as err:  # noqa: BLE001 - the thresholds are saved; the page is not worth a traceback
            (console or Console(stderr=True)).print(
                f"[yellow]note[/] report.html not rewritten ({type(err).__name__}: {escape(str(err))}); "
                f"try finetune report {escape(str(run_dir))}"
            )
    return report


@locking("finetune eval")
def evaluate_run(
    run_dir: str | Path, role: str = "test", threshold: float | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Score a run's best checkpoint on one split; writes ``eval_<role>.json`` in the run and returns the report."""
    run = RunDir.open(run_dir)
    parts = build_from_run(run, [role], console=console)
    task, recipe, classes = parts.task, parts.recipe, parts.classes
    if threshold is not None and not task.calibrates:
        raise UserError(
            "--threshold: a single-label run predicts its top class; its one threshold is the reject option "
            "(finetune calibrate RUN --set calibrate.objective=accuracy_at_least)"
        )
    out = predictions(parts, [role])[role]
    targets, probs = out.targets, out.probs
    if task.calibrates:
        thr, how = load_thresholds(run.path, threshold, recipe.train.threshold)
        fixed = thr if np.isscalar(thr) else recipe.train.threshold
        split = task.split_report(targets, probs, classes, fixed, None if np.isscalar(thr) else thr)
        report = one_split_report(str(run), task.name, role, split, (fixed, how))
    else:
        split = task.split_report(targets, probs, classes, recipe.train.threshold)
        report = one_split_report(str(run), task.name, role, split)
    run.write_json(runfiles.eval_report(role), report.to_json())
    return report
