"""Training a run: build everything from the recipe, open or resume the run directory, fit, then report.

``run(recipe)`` is what ``finetune run`` calls; extra :class:`~finetune.loop.Hook` objects may be passed from Python.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from finetune import build, build_train
from finetune.config import Recipe
from finetune.distributed import Dist, barrier, convert_sync_bn, gather, gather_list
from finetune.errors import UserError
from finetune.evaluation import write_report
from finetune.loop import Hook, Loop
from finetune.rundir import RunDir
from finetune.trainer import fit, predict, restore, selected_weights


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _build_loop(
    recipe: Recipe, splits: dict[str, Any], run: RunDir, resume: bool, console: Console, d: Dist
) -> tuple[Loop, dict[str, Any]]:
    """Data loaders, model, loss, optimizer and schedule, from the recipe (weights from last.pt when resuming).

    Returns:
        The loop and the loaders of every split.
    """
    device, precision = build.build_device(recipe.train)
    datasets = {
        role: build.build_dataset(recipe.data, s, role == "train", recipe.train.seed) for role, s in splits.items()
    }
    loaders = {
        role: build.build_loader(recipe.data, ds, role == "train", recipe.train.seed, d if role != "test" else None)
        for role, ds in datasets.items()
    }
    n_classes = len(splits["train"].classes)
    if resume:  # the weights come from last.pt: never touch the hub or the original checkpoint again
        model = build.build_bare_model(recipe, n_classes)
    else:
        model, load_report = build.build_model(recipe, n_classes)
        if load_report:
            console.print(escape(load_report.summary()))
    if recipe.train.sync_bn and d.enabled:
        convert_sync_bn(model, device.type)
    model.to(device)
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.train.compile:  # in place: the state_dict keys, the hooks and the freezing policy stay as they are
        model.compile()
    plan = build_train.plan_steps(recipe, len(datasets["train"]))
    optimizer, scheduler = build_train.build_optimizer(recipe, model, plan, build_train.build_groups(recipe, model))
    loop = Loop(
        model=model,
        loss_fn=build.build_loss(recipe, splits["train"]).to(device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        train_loader=loaders["train"],
        val_loader=loaders["val"],
        settings=build.build_fit_settings(recipe, device, precision),
        run_dir=run.path,
        console=console,
        gather=(lambda out: gather(out, d)) if d.enabled else None,
        is_main=d.main,
    )
    console.print(
        f"{run}: {recipe.model.name}, {n_classes} classes, {len(datasets['train'])} train / {len(datasets['val'])} "
        f"val images, {plan.total_steps} steps, {device.type} {precision}"
        + (
            f"; DDP: {d.world} processes, {recipe.data.batch_size // d.world} images per process and step"
            if d.enabled
            else ""
        )
    )
    return loop, loaders


def _report(recipe: Recipe, splits: dict[str, Any], loop: Loop, run: RunDir, loaders: dict) -> dict[str, Any]:
    """Predict val/test (and train, to calibrate on it) with the best checkpoint; write and print the report."""
    loop.model.load_state_dict(selected_weights(run.checkpoint("best")))
    task, cs = loop.settings.task, build.build_calibration(recipe)
    loaders = {role: loaders[role] for role in ("val", "test") if role in loaders}
    if loop.gather is not None:  # DDP: rank 0 reports alone, on whole splits
        loaders["val"] = build.build_loader(recipe.data, build.build_dataset(recipe.data, splits["val"], False), False)
    if task.calibrates and cs.enabled and cs.split == "train":  # unaugmented, in order, nothing dropped
        loaders["train"] = build.build_loader(
            recipe.data, build.build_dataset(recipe.data, splits["train"], False), False
        )
    outs = {
        role: predict(loop.model, loader, loop.settings, state=loop.state, console=loop.console)
        for role, loader in loaders.items()
    }
    s = loop.state
    extra = {"best_epoch": s.best_epoch, "select": loop.settings.select, "bad_images": s.bad_images}
    if s.stop_reason:
        extra["stop_reason"] = s.stop_reason
    report = write_report(run, task, splits["train"].classes, outs, cs=cs, extra=extra)
    if (run / "thresholds.json").is_file():  # the training run's own thresholds, which calibrate never replaces
        run.write_bytes("thresholds.run.json", (run / "thresholds.json").read_bytes())
    task.print_report(report, Console())
    return report


def _check_data(recipe: Recipe, splits: dict[str, Any], run_dir: RunDir | None, console: Console) -> None:
    if recipe.train.select != "loss" and not splits["val"].targets.any():
        console.print(
            f"[yellow]note[/] no image of the val split has a label: val {recipe.train.select} is undefined, "
            "so the last epoch's weights are kept as best.pt"
        )
    if run_dir is not None and run_dir.classes() != splits["train"].classes:
        raise UserError(f"{run_dir}: the data's classes differ from the run's classes.json")


def _start(recipe: Recipe, splits: dict, run_dir: RunDir, resume: bool, loop: Loop, hooks: list, d: Dist) -> None:
    """Restore ``last.pt`` (all ranks) or create the run directory (rank 0); rank 0 saves the recipe."""
    if resume:
        state = restore(run_dir / "last.pt", loop, hooks)
        if recipe.train.epochs < state.epoch:
            raise UserError(
                f"train.epochs = {recipe.train.epochs}: {run_dir} has already trained {state.epoch} epochs; "
                "give at least that many"
            )
        if d.main:
            run_dir.trim_metrics(state.epoch)
        loop.console.print(f"resuming {escape(str(run_dir))} after epoch {state.epoch} (step {state.step})")
    elif d.main:
        RunDir.create(run_dir.path).save_classes(splits["train"].classes)
    if d.main:
        run_dir.save_recipe(recipe)
    barrier(d)


def run(
    recipe: Recipe, resume: str | Path | None = None, console: Console | None = None, hooks: Sequence[Hook] = ()
) -> Path:
    """Train a recipe end to end (or continue a run), then write and print the final report.

    Under ``torchrun`` every process calls this; rank 0 alone writes the run directory, prints and reports.

    Args:
        recipe: The validated recipe (for a resume: the run's own, with any overrides).
        resume: A run directory to continue from its ``last.pt``.
        console: Where progress goes.
        hooks: Extra hooks, called after the recipe's own (freezing, early stopping) and before the loggers.

    Returns:
        The run directory.
    """
    d = build.build_dist(recipe, build.build_device(recipe.train)[0])
    console = (console or Console(stderr=True)) if d.main else Console(quiet=True)
    run_dir = (RunDir.for_resume(resume) if d.main else RunDir.open(resume)) if resume else None
    if run_dir is not None and not (run_dir / "last.pt").is_file():
        console.print(f"{escape(str(run_dir))}: stopped before its first checkpoint; starting it again from epoch 1")
        resume = None
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    splits = build.build_splits(recipe)
    recipe, note = build.build_resolved_recipe(recipe, splits["train"])
    if note:
        console.print(note)
    _check_data(recipe, splits, run_dir, console)
    if run_dir is None:  # refused here, on every rank, before anything is built
        run_dir = RunDir.check_new(Path(recipe.output.dir) / recipe.output.name)
    loop, loaders = _build_loop(recipe, splits, run_dir, resume is not None, console, d)
    policy = build_train.build_policy(recipe, loop.model, build_train.build_groups(recipe, loop.model))
    cache = build_train.build_feature_cache(recipe, policy, splits["train"], d)
    all_hooks = build_train.build_hooks(
        recipe, run_dir.path, policy=policy, cache=cache, splits=splits, extra=hooks, d=d
    )
    _start(recipe, splits, run_dir, resume is not None, loop, all_hooks, d)
    try:
        fit(loop, all_hooks)
    except KeyboardInterrupt:
        raise UserError(f"interrupted; continue with `finetune run --resume {run_dir}`") from None
    finally:
        if loop.state.bad_images and d.main:
            run_dir.write_json("bad_images.json", loop.state.bad_images)
    loop.state.bad_images = gather_list(loop.state.bad_images, d)
    if loop.state.bad_images and d.main:
        run_dir.write_json("bad_images.json", loop.state.bad_images)
    barrier(d)
    if d.main:
        _report(recipe, splits, loop, run_dir, loaders)
    return run_dir.path
