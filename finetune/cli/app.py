"""The ``finetune`` command line: each command parses, takes its parts from the assembly, and prints.

``run`` / ``validate`` / ``eval`` / ``calibrate`` are here; ``groups`` / ``summary`` / ``lr-find`` in
:mod:`finetune.cli.model`, ``predict`` / ``export`` in :mod:`finetune.cli.deploy`, ``data`` in
:mod:`finetune.cli.data`. Heavy imports (torch) wait until a command needs them, so a recipe error is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.cli import model as model_commands
from finetune.cli.compare import compare_command, sweep_command
from finetune.cli.data import data_app
from finetune.cli.deploy import benchmark_command, card_command, export_command, predict_command, qat_command
from finetune.cli.options import SetOption, check_threshold, err, out
from finetune.cli.report import inspect_command, report_command
from finetune.errors import UserError, os_error_line

app = typer.Typer(help="Transfer learning for small image classifiers.", no_args_is_help=True, add_completion=False)
app.add_typer(data_app, name="data")
app.command("predict")(predict_command)
app.command("export")(export_command)
app.command("card")(card_command)
app.command("benchmark")(benchmark_command)
app.command("qat")(qat_command)
app.command("report")(report_command)
app.command("inspect")(inspect_command)
app.command("compare")(compare_command)
app.command("sweep")(sweep_command)
app.command("groups")(model_commands.groups)
app.command("summary")(model_commands.summary)
app.command("lr-find")(model_commands.lr_find)


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe TOML file.")] = None,
    overrides: SetOption = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its last.pt.")] = None,
) -> None:
    """Train a recipe end to end: data, model, training, evaluation, report."""
    from finetune.config import load_recipe

    if resume is not None:
        from finetune.rundir.directory import RunDir

        if recipe is not None:
            raise UserError("give either RECIPE or --resume RUN_DIR (a resumed run uses its own recipe.toml)")
        cfg = RunDir.open(resume).resume_recipe(overrides)
    elif recipe is None:
        raise UserError("missing RECIPE; e.g. finetune run recipes/quickstart.toml")
    else:
        cfg = load_recipe(recipe, overrides)
    from finetune.distributed import teardown
    from finetune.runs.run import run_recipe  # after the recipe: a recipe error should not wait for torch

    try:
        run_recipe(cfg, resume, err)
    finally:
        teardown()  # under torchrun: leave the process group


def _similar(parts: Any, min_cosine: float) -> list:
    """Pairs of images whose pooled features (the recipe's pretrained backbone) have a cosine >= ``min_cosine``."""
    import numpy as np
    import torch

    from finetune.data.leaks import similar_pairs
    from finetune.hooks.feature_cache import extract_features
    from finetune.runs.report_page import Pooled

    m = parts.recipe.model
    if not (m.pretrained or m.checkpoint):
        raise UserError("--features: a scratch model's features say nothing; set model.pretrained or model.checkpoint")
    model, feats, where = parts.place(), [], []
    for role, split in parts.splits.items():
        index: list[torch.Tensor] = []
        f, _ = extract_features(Pooled(model), parts.loader(role), device=parts.device, index=index)
        feats.append(f.cpu().numpy())
        in_memory = isinstance(split.image_paths, np.ndarray)
        where += [(role, f"#{i}" if in_memory else str(split.image_paths[i])) for i in torch.cat(index).tolist()]
    return similar_pairs(np.concatenate(feats), where, min_cosine)


def _check_images(parts: Any, features: bool = False, min_cosine: float = 0.85) -> None:
    """Decode every image once: an unreadable one errs; duplicates are listed, and a leak errs with data.on_leak."""
    from finetune.data.leaks import merge, scan_images

    problems, found = scan_images(parts.splits)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    if features:
        found = merge(found, _similar(parts, min_cosine))
    leaks = [d for d in found if d.leak]
    if leaks and parts.recipe.data.on_leak == "error":
        more = f" (and {len(leaks) - 1} more)" if len(leaks) > 1 else ""
        raise UserError(f'{leaks[0].line()}{more}; remove one of each pair, or set data.on_leak = "warn"')
    for d in found[:20]:
        err.print(f"[yellow]{'leak' if d.leak else 'duplicate'}[/] {escape(d.line())}")
    if len(found) > 20:
        err.print(f"... and {len(found) - 20} more")
    err.print(f"duplicates: {len(found) - len(leaks)} within splits, {len(leaks)} across splits")


def _memory_row(parts: Any, cfg: Any) -> str:
    """The training memory estimate, and a warning when it is more than the device has."""
    import torch

    from finetune.summary import training_memory

    d = cfg.data
    need = training_memory(parts.model, d.image_size, d.batch_size, cfg.optim.name)
    if parts.device.type == "cuda":
        have = torch.cuda.get_device_properties(parts.device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    line = f"about {need / 2**30:.1f} GiB to train (summary's count, fp32), of {have / 2**30:.0f} GiB"
    if need > have:
        err.print(
            f"[yellow]warning[/] data.batch_size = {d.batch_size} at image_size {d.image_size} needs about "
            f"{need / 2**30:.0f} GiB and this {parts.device.type} has {have / 2**30:.0f} GiB: it will run out of "
            "memory; lower data.batch_size or data.image_size"
        )
    return line


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: SetOption = None,
    check_images: Annotated[bool, typer.Option(help="Decode every image (slow on big datasets).")] = False,
    features: Annotated[
        bool, typer.Option(help="With --check-images: also pairs alike in the pretrained backbone's features.")
    ] = False,
    min_cosine: Annotated[float, typer.Option(help="With --features: the cosine from which a pair is listed.")] = 0.85,
) -> None:
    """Check a recipe: build everything a run builds before its first step, without training; print the plan."""
    from finetune.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    from finetune.assembly import build_run
    from finetune.rundir.directory import RunDir

    parts = build_run(cfg)
    run_dir = Path(parts.recipe.output.dir) / parts.recipe.output.name
    for where, path in (("output.dir", run_dir.parent), ("output.name", run_dir)):  # what `run` would refuse
        if path.exists() and not path.is_dir():
            raise UserError(f"{where}: {path} is not a folder; choose another {where}")
    if features and not check_images:
        raise UserError("--features goes with --check-images")
    if not -1 <= min_cosine <= 1:
        raise UserError(f"--min-cosine {min_cosine}: a cosine is between -1 and 1")
    if check_images:
        _check_images(parts, features, min_cosine)
    parts.training(run_dir)  # what `run` builds before its first step: validate refuses what run refuses
    parts.calibration  # noqa: B018 - and what it would refuse after training (calibrate.classes names)
    classes, steps, load_report = parts.classes, parts.plan, parts.model_and_report[1]
    n_params = sum(p.numel() for p in parts.model.parameters())
    table = Table(title=escape(f"{recipe}: valid"), show_header=False)
    table.add_row("model", f"{cfg.model.name} ({n_params:,} parameters), head for {len(classes)} classes")
    if load_report:
        table.add_row("weights", escape(load_report.summary()))
    names = ", ".join(classes.names[:8]) + (", ..." if len(classes) > 8 else "")
    table.add_row("classes", escape(f"{len(classes)}: {names}"))
    from finetune.labels import unknown_counts

    for role, s in parts.splits.items():
        unknown = int(unknown_counts(s.targets).sum())
        labels = f"{int((s.targets > 0.5).sum())} labels" + (f", {unknown} unknown" if unknown else "")
        table.add_row(role, escape(f"{len(s.image_paths)} images, {labels}, {s.annotation_file}"))
    table.add_row(
        "steps",
        f"{steps.steps_per_epoch}/epoch x {cfg.train.epochs} epochs = {steps.total_steps} "
        f"(warmup {steps.warmup_steps})",
    )
    table.add_row("device", f"{parts.device.type}, {parts.precision}")
    table.add_row("memory", escape(_memory_row(parts, cfg)))
    try:
        RunDir.check_new(run_dir)
        table.add_row("run dir", escape(str(run_dir)))
    except UserError as taken:
        table.add_row("run dir", escape(f"{run_dir}: {taken}"))
    if parts.note:
        table.add_row("resolved", escape(parts.note))
    out.print(table)


@app.command(name="eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    threshold: Annotated[
        float | None, typer.Option(help="One decision threshold for every class (default: the run's thresholds.json).")
    ] = None,
) -> None:
    """Score a run's best checkpoint on a split; prints the tables and writes eval_<split>.json."""
    check_threshold(threshold)
    from finetune.eval.tasks import TASKS
    from finetune.runs.evaluate import evaluate_run

    report = evaluate_run(run_dir, split, threshold, err)
    TASKS[report.task].print_report(report, out)


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    split: Annotated[str, typer.Option(help="The split to fit thresholds on: val or train.")] = "val",
    overrides: SetOption = None,
) -> None:
    """Re-fit per-class thresholds; rewrites thresholds.json (the old kept as thresholds.prev.json) and the reports."""
    from finetune.eval.tasks import TASKS
    from finetune.runs.evaluate import calibrate_run

    report = calibrate_run(run_dir, split, err, overrides)
    TASKS[report.task].print_report(report, out)


def _version(value: bool) -> None:
    if value:
        from finetune import __version__

        print(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Transfer learning for small image classifiers."""


def main() -> None:
    """Console entry point: a UserError (or a full disk, a folder one cannot write) is one line and exit code 2."""
    try:
        app()
    except (UserError, OSError, RuntimeError) as e:
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "run")
        if isinstance(e, RuntimeError):  # of these, only a killed DataLoader worker is the machine's, not a bug
            from finetune.runs.run import worker_killed

            if not worker_killed(e):
                raise
            first = str(e).strip().splitlines()[0].rstrip(". ")
            e = UserError(f"{first}: most often the out-of-memory killer; lower the workers or the batch size")
        line = str(e) if isinstance(e, UserError) else os_error_line(e, command)
        if line is None:
            raise
        # escape: messages name keys like [freeze] or stages[0], which rich would otherwise eat as markup
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: the line is said once
            Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
