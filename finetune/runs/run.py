"""Training a run: take the parts from the assembly, open or resume the run directory, fit, then report.

``run_recipe(recipe)`` is what ``finetune run`` calls; extra :class:`~finetune.train.loop.Hook` objects may be passed
from Python.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from finetune import runfiles
from finetune.allocator import reuse_freed_memory
from finetune.assembly import RunParts, build_run
from finetune.assembly.data import sampler_facts
from finetune.config import Recipe
from finetune.config.objectives import REJECT
from finetune.console import LogConsole
from finetune.data.samplers import sampler_line
from finetune.distributed import barrier, gather_list
from finetune.errors import UserError
from finetune.eval.predict import predict_loader
from finetune.eval.report import write_report
from finetune.eval.run_report import RunReport
from finetune.rundir.directory import RunDir
from finetune.rundir.lock import run_lock
from finetune.train.fit import fit, restore, selected_weights
from finetune.train.loop import Hook, Loop


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, Kubernetes, SLURM preemption, ``timeout``), handled as Ctrl-C is."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While training, SIGTERM raises :class:`Terminated` in the main thread: the run stops as on Ctrl-C.

    The step in progress is abandoned; ``last.pt`` is the previous epoch's (written atomically), so the resume is
    exact. The previous handler comes back afterwards. Off the main thread (where Python cannot catch signals) it
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopped(err: KeyboardInterrupt, run_dir: RunDir | Path) -> UserError:
    """The one line for a run stopped by Ctrl-C or SIGTERM (before its run directory was made: run it again)."""
    how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
    if not (Path(run_dir) / runfiles.RECIPE).is_file():
        return UserError(f"{how} before the run started; nothing was written: run the recipe again")
    return UserError(f"{how}; continue with `finetune run --resume {run_dir}`")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _report(parts: RunParts, loop: Loop, run: RunDir, out: Console) -> RunReport:
    """Predict val/test (and train, to calibrate on it) with the best checkpoint; write and print the report."""
    loop.model.load_state_dict(selected_weights(run.checkpoint("best")))
    task, cs = parts.task, parts.calibration
    roles = [r for r in ("val", "test") if r in parts.splits]
    fits = task.calibrates or cs.metric == REJECT or cs.probabilities != "none"
    if fits and cs.enabled and cs.split == "train":  # unaugmented, in order, nothing dropped
        roles.append("train")
    outs = {  # rank 0 reports alone, on whole splits (the unsharded loaders)
        role: predict_loader(
            loop.model, parts.loader(role), loop.settings, bad_images=loop.state.bad_images, console=loop.console
        )
        for role in roles
    }
    s = loop.state
    extra = {"best_epoch": s.best_epoch, "select": loop.settings.select, "bad_images": s.bad_images}
    if s.stop_reason:
        extra["stop_reason"] = s.stop_reason
    extra |= task.report_extras(outs) | _sampler(parts)
    report, outs = write_report(run.path, task, parts.classes, outs, cs=cs, extra=extra)
    if (run / runfiles.THRESHOLDS).is_file():  # the training run's own thresholds, which calibrate never replaces
        run.write_bytes(runfiles.THRESHOLDS_RUN, (run / runfiles.THRESHOLDS).read_bytes())
    task.print_report(report, out)
    if report.sampler:
        out.print(sampler_line(report.sampler))
    from finetune.runs.report_page import HtmlOptions, write_html  # explain builds on this layer's parts

    if not parts.recipe.output.html:
        return report
    try:
        write_html(run.path, parts, loop.model, report, outs, HtmlOptions())
    except Exception as err:  # noqa: BLE001 - the run is trained and reported; the page is not worth a traceback
        loop.console.print(
            f"[yellow]note[/] report.html not written ({type(err).__name__}: {escape(str(err))}); "
            f"try finetune report {escape(str(run.path))}"
        )
    return report


def _check_data(parts: RunParts, run_dir: RunDir | None, console: Console) -> None:
    recipe, splits = parts.recipe, parts.splits
    if recipe.train.select != "loss" and not (splits["val"].targets > 0.5).any():
        console.print(
            f"[yellow]note[/] no image of the val split has a label: val {recipe.train.select} is undefined, "
            "so the last epoch's weights are kept as best.pt"
        )
    if run_dir is not None and run_dir.classes() != parts.classes:
        raise UserError(f"{run_dir}: the data's classes differ from the run's classes.json")
    parts.calibration  # noqa: B018 - calibrate.classes names real classes: refused now, not after training


def replan_schedule(loop: Loop, epochs: int) -> str:
    """After a restore: every group at the LR this run's schedule plans for the current step.

    On an exact resume that is the checkpoint's own LR, bitwise (the same base times the same factor), and nothing
    changes. With a larger ``train.epochs`` the schedule (warmup, cosine, stages) is planned over the new length, so
    the LR at the resume point jumps from the old plan's value to the new plan's: that is said, not hidden. Every rank
    computes the same values from the checkpoint, so DDP ranks agree.

    Returns:
        The line that says what moved ("" when nothing did).
    """
    step, sched = loop.state.step, loop.scheduler
    old = [g["lr"] for g in loop.optimizer.param_groups]
    for group, base, factor in zip(loop.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * factor(step)
    new = [g["lr"] for g in loop.optimizer.param_groups]
    if new == old:
        return ""
    return (
        f"train.epochs = {epochs}: the LR schedule is re-planned over {epochs} epochs, not continued; at step {step} "
        f"the top group's LR goes from {old[-1]:.3g} to {new[-1]:.3g}"
    )


def _start(parts: RunParts, run_dir: RunDir, point: Path | None, loop: Loop, hooks: list) -> None:
    """Restore ``point``, the checkpoint to resume (all ranks), or, with None, create the run directory (rank 0).

    Rank 0 saves the recipe either way.
    """
    recipe, d = parts.recipe, parts.dist
    if point is not None:
        state = restore(point, loop, hooks)
        if recipe.train.epochs < state.epoch:
            raise UserError(
                f"train.epochs = {recipe.train.epochs}: {run_dir} has already trained {state.epoch} epochs; "
                "give at least that many"
            )
        if d.main:
            run_dir.trim_metrics(state.epoch)
        within = f", batch {state.batch} of epoch {state.epoch + 1}" if state.batch else ""
        loop.console.print(f"resuming {escape(str(run_dir))} after epoch {state.epoch} (step {state.step}{within})")
        moved = replan_schedule(loop, recipe.train.epochs)
        if moved:
            loop.console.print(moved)
    elif d.main:
        RunDir.create(run_dir.path).save_classes(parts.classes)
        if os.environ.get("TORCHELASTIC_RUN_ID") and d.enabled:  # what an elastic restart checks it resumes
            run_dir.write_text(runfiles.TORCHRUN_ID, os.environ["TORCHELASTIC_RUN_ID"] + "\n")
    if d.main:
        run_dir.save_recipe(recipe)
    barrier(d)


def elastic_resume(recipe: Recipe, resume: str | Path | None) -> Path | None:
    """The run directory a torchrun elastic restart continues (``TORCHELASTIC_RESTART_COUNT > 0``), else None.

    torchrun restarts every worker with the same command after a fault; that command names the recipe, not the run,
    so without this each restarted worker would find "already holds a run". A restart resumes from the newest
    checkpoint instead, the elastic contract; before the first one the run starts again, as a rerun would. Only a
    directory this torchrun job made (its ``TORCHELASTIC_RUN_ID`` in ``RUN/torchrun_id``) is resumed: an older run of
    the same name, which attempt 0 refused, is refused again.
    """
    if resume is not None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) <= 0:
        return None
    path = Path(recipe.output.dir) / recipe.output.name
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    mine = (path / runfiles.TORCHRUN_ID).is_file() and (path / runfiles.TORCHRUN_ID).read_text().strip() == job
    return path if mine and RunDir(path).resume_point() is not None else None


def worker_killed(err: BaseException) -> bool:
    """Whether ``err`` is the DataLoader's report of a worker that died (the OOM killer's SIGKILL, most often)."""
    return isinstance(err, RuntimeError) and "DataLoader worker" in str(err)


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocator's refusal (CUDA or CPU), not a bug."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _worker_line(err: BaseException, run_dir: RunDir | Path) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else "a DataLoader worker died"
    return UserError(
        f"{first.rstrip('. ')}: most often the out-of-memory killer; lower data.num_workers, data.batch_size or "
        f"data.prefetch, then continue with `finetune run --resume {run_dir}`"
    )


def run_recipe(
    recipe: Recipe,
    resume: str | Path | None = None,
    console: Console | None = None,
    hooks: Sequence[Hook] = (),
    report_console: Console | None = None,
) -> Path:
    """Train a recipe end to end (or continue a run), then write and print the final report.

    Under ``torchrun`` every process calls this; rank 0 alone writes the run directory, prints and reports. The run
    directory is locked for the whole run (:mod:`finetune.rundir.lock`); an elastic restart resumes it.

    Args:
        recipe: The validated recipe (for a resume: the run's own, with any overrides).
        resume: A run directory to continue from its ``last.pt``.
        console: Where progress goes.
        hooks: Extra hooks, called after the recipe's own (freezing, early stopping) and before the loggers.
        report_console: Where the final report's tables go (default: stdout).

    Returns:
        The run directory.
    """
    reuse_freed_memory()  # before any DataLoader worker is forked: they inherit it
    restarted = elastic_resume(recipe, resume)
    if restarted is not None and resume is None:
        recipe, resume = RunDir.open(restarted).recipe(), restarted
    if resume is not None and not Path(resume).is_dir():
        raise UserError(f"{resume}: not a run directory (no such folder)")
    # A resume takes its weights from last.pt (never the hub or the original checkpoint again); a run stopped before
    # its first checkpoint starts over from the recipe's weights.
    weights = "none" if resume is not None and RunDir(resume).resume_point() is not None else "recipe"
    parts = build_run(
        recipe, weights=weights, distributed=True, extra_hooks=hooks, console=console or Console(stderr=True)
    )
    d, console = parts.dist, parts.console
    if restarted is not None:
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        point = RunDir(restarted).resume_point()
        name = point.relative_to(restarted) if point is not None else "its start"
        console.print(f"elastic restart {restarts}: resuming {escape(str(restarted))} from {name}")
    target = Path(resume) if resume else Path(parts.recipe.output.dir) / parts.recipe.output.name
    with sigterm_as_interrupt(), run_lock(target, "finetune run", d, console):
        try:
            return _locked_run(parts, resume, console, report_console or LogConsole())
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM at any moment: setting up, training, reporting
            raise _stopped(err, target) from None
        except RuntimeError as err:  # training, validation or the report's predictions
            if worker_killed(err):
                raise _worker_line(err, target) from None
            if out_of_memory(err):
                raise UserError(
                    f"out of memory ({str(err).strip().splitlines()[0][:100]}): lower data.batch_size or "
                    f"data.image_size (finetune summary RECIPE estimates the memory), then run it again"
                ) from None
            raise


def _locked_run(parts: RunParts, resume: str | Path | None, console: Console, out: Console) -> Path:
    """:func:`run_recipe` once the run directory's lock is held."""
    d, recipe = parts.dist, parts.recipe
    run_dir = (RunDir.for_resume(resume) if d.main else RunDir.open(resume)) if resume else None
    point = run_dir.resume_point() if run_dir is not None else None
    if run_dir is not None and point is None:
        console.print(f"{escape(str(run_dir))}: stopped before its first checkpoint; starting it again from epoch 1")
        resume = None
    if (parts.weights == "none") != (point is not None):  # another command wrote the run between the two looks
        raise UserError(f"{run_dir}: changed while this run was starting; run the command again")
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    recipe = parts.recipe
    if parts.note:
        console.print(parts.note)
    _check_data(parts, run_dir, console)
    if run_dir is None:  # refused here, on every rank, before anything is built
        run_dir = RunDir.check_new(Path(recipe.output.dir) / recipe.output.name)
    loop, all_hooks = parts.training(run_dir.path)
    console.print(_start_line(parts, run_dir))
    _start(parts, run_dir, point, loop, all_hooks)
    try:
        fit(loop, all_hooks)
    finally:
        if loop.state.bad_images and d.main:
            run_dir.write_json(runfiles.BAD_IMAGES, loop.state.bad_images)
    loop.state.bad_images = gather_list(loop.state.bad_images, d)
    if loop.state.bad_images and d.main:
        run_dir.write_json(runfiles.BAD_IMAGES, loop.state.bad_images)
    barrier(d)
    if d.main:
        _report(parts, loop, run_dir, out)
    return run_dir.path


def _sampler(parts: RunParts) -> dict[str, Any]:
    return sampler_facts(parts.recipe.data, len(parts.splits["train"].targets), parts.epoch_size)


def _start_line(parts: RunParts, run_dir: RunDir) -> str:
    recipe, d = parts.recipe, parts.dist
    return (
        f"{run_dir}: {recipe.model.name}, {len(parts.classes)} classes, {len(parts.splits['train'].image_paths)} "
        f"train / {len(parts.splits['val'].image_paths)} val images, {parts.plan.total_steps} steps, "
        + (f"balanced epochs of {parts.epoch_size} draws, " if _sampler(parts) else "")
        + f"{parts.device.type} {parts.precision}"
        + (
            f"; DDP: {d.world} processes, {recipe.data.batch_size // d.world} images per process and step"
            if d.enabled
            else ""
        )
    )
