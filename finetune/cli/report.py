"""``finetune report`` and ``finetune inspect``: a run's ``report.html``, and its suspected label errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.options import SetOption, err
from finetune.errors import UserError

RunArg = Annotated[Path, typer.Argument(help="A run directory.")]
ClassOption = Annotated[
    list[str] | None, typer.Option("--class", help="A class that gets a gallery whatever its AP (repeatable).")
]
WorstOption = Annotated[int, typer.Option(help="Classes with a gallery, lowest AP first.")]
PerClassOption = Annotated[int, typer.Option(help="False positives and false negatives shown per class.")]
CamsOption = Annotated[bool, typer.Option(help="Class-activation maps beside the thumbnails (finetune\\[inspect]).")]


def _options(classes: list[str] | None, worst: int, per_class: int, cams: bool):  # noqa: ANN202
    from finetune.runs.report_page import HtmlOptions

    if worst < 0 or per_class < 1:
        raise UserError(f"--worst {worst} / --per-class {per_class}: give --worst >= 0 and --per-class >= 1")
    return HtmlOptions(worst, per_class, list(classes or []), cams)


def report_command(
    run_dir: RunArg,
    classes: ClassOption = None,
    worst: WorstOption = 8,
    per_class: PerClassOption = 6,
    cams: CamsOption = True,
    overrides: SetOption = None,
) -> None:
    """Rewrite a run's report.html: summary, per-class table, curves, galleries of mistakes with CAMs."""
    from finetune.runs.report_page import report_run

    report_run(run_dir, _options(classes, worst, per_class, cams), err, overrides=overrides)


def inspect_command(
    run_dir: RunArg,
    classes: ClassOption = None,
    worst: WorstOption = 8,
    per_class: PerClassOption = 6,
    cams: CamsOption = True,
    overrides: SetOption = None,
) -> None:
    """Rank suspected label errors (label_issues.csv: cleanlab on k-fold probe probabilities); rewrite report.html."""
    from finetune.runs.report_page import inspect_run

    inspect_run(run_dir, _options(classes, worst, per_class, cams), err, overrides)
