"""Runs: start or resume a training run in ``runs/<name>/``, evaluate a run on a split, predict images.

A run directory holds ``recipe.toml`` (resolved), ``classes.json``, ``metrics.jsonl``, ``last.pt``, ``best.pt``,
``report.json`` and, if any image could not be read, ``bad_images.json``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
from rich.console import Console

from finetune import build
from finetune import checkpoint as ckpt
from finetune.config import Recipe, load_recipe, recipe_to_dict
from finetune.data.coco import ClassMap, check_images, read_rgb
from finetune.errors import UserError
from finetune.report import print_report, split_report
from finetune.trainer import TrainState, fit, predict, restore

ROLES = ("train", "val", "test")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def split_name(recipe: Recipe, role: str) -> str:
    """The split name the recipe gives to ``role`` (train/val/test)."""
    if role not in ROLES:
        raise UserError(f"--split {role!r}: expected one of {', '.join(ROLES)}")
    name = getattr(recipe.data, role)
    if not name:
        raise UserError(f"data.{role} is empty in this recipe: it has no {role} split")
    return name


def read_splits(recipe: Recipe, roles: tuple[str, ...] = ROLES, check: bool = True) -> dict[str, Any]:
    """Read the annotation files of ``roles`` (skipping an empty test split) and check that every image exists."""
    splits: dict[str, Any] = {}
    classes = None
    for role in roles:
        if role == "test" and not recipe.data.test:
            continue
        splits[role] = build.build_split(recipe.data, split_name(recipe, role), classes)
        classes = splits[role].classes
        if check:
            missing = check_images(splits[role].image_paths)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"{missing[0]}{more}; check data.root and data.images")
    return splits


def open_run(recipe: Recipe) -> Path:
    """Create ``<output.dir>/<output.name>``; refuse to reuse one that holds a run (nothing a user made is lost)."""
    run_dir = Path(recipe.output.dir) / recipe.output.name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"{run_dir} already holds a run; continue it with `finetune run --resume {run_dir}` "
            "or start another with --set output.name=NEW_NAME"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_run_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The resolved recipe saved in a run directory, with optional overrides."""
    path = Path(run_dir) / "recipe.toml"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no recipe.toml)")
    return load_recipe(path, overrides)


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines past the checkpoint's epoch (written just before an interruption), so resume has no repeats."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epochs_done]
    if len(kept) != len(lines):
        ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def run(recipe: Recipe, resume: str | Path | None = None, console: Console | None = None) -> Path:
    """Train a recipe end to end (or continue a run), then write and print the final report.

    Args:
        recipe: The validated recipe (for a resume: the run's own, with any overrides).
        resume: A run directory to continue from its ``last.pt``.
        console: Where progress goes.

    Returns:
        The run directory.
    """
    console = console or Console(stderr=True)
    run_dir = Path(resume) if resume else Path(recipe.output.dir) / recipe.output.name
    if resume and not (run_dir / "last.pt").is_file():
        raise UserError(f"{run_dir}: no last.pt to resume from (did the first epoch finish?)")
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    device, precision = build.build_device(recipe.train)
    splits = read_splits(recipe)
    classes = splits["train"].classes
    if resume:
        saved = ClassMap.from_json(json.loads((run_dir / "classes.json").read_text()))
        if saved != classes:
            raise UserError(f"{run_dir}: the data's classes differ from the run's classes.json")
    datasets = {
        role: build.build_dataset(recipe.data, s, role == "train", recipe.train.seed) for role, s in splits.items()
    }
    loaders = {
        role: build.build_loader(recipe.data, ds, role == "train", recipe.train.seed) for role, ds in datasets.items()
    }

    if resume:  # the weights come from last.pt: never touch the hub or the original checkpoint again
        recipe_for_model = recipe.model_copy(
            update={"model": recipe.model.model_copy(update={"pretrained": False, "checkpoint": ""})}
        )
    else:
        recipe_for_model = recipe
    model, load_report = build.build_model(recipe_for_model, len(classes))
    if load_report:
        console.print(load_report.summary())
    model.to(device)
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = build.build_loss(recipe, splits["train"]).to(device)
    plan = build.plan_steps(recipe, len(datasets["train"]))
    groups = build.build_groups(recipe, model)
    policy = build.build_policy(recipe, model, groups)
    cache = build.build_feature_cache(recipe, policy, splits["train"])
    optimizer, scheduler = build.build_optimizer(recipe, model, plan, groups)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    settings = build.build_fit_settings(recipe, device, precision)

    if resume:
        state = restore(run_dir / "last.pt", model, optimizer, scheduler, scaler)
        _trim_metrics(run_dir / "metrics.jsonl", state.epoch)
        console.print(f"resuming {run_dir} after epoch {state.epoch} (step {state.step})")
    else:
        run_dir = open_run(recipe)
        state = TrainState()
        ckpt.atomic_write_json(run_dir / "classes.json", classes.to_json())
    ckpt.atomic_write_text(run_dir / "recipe.toml", tomli_w.dumps(recipe_to_dict(recipe)))
    console.print(
        f"{run_dir}: {recipe.model.name}, {len(classes)} classes, {len(datasets['train'])} train / "
        f"{len(datasets['val'])} val images, {plan.total_steps} steps, {device.type} {precision}"
    )
    try:
        state = fit(model, loaders["train"], loaders["val"], loss_fn, optimizer, scheduler, scaler, settings, run_dir,
                    state, console, policy, cache)  # fmt: skip
    except KeyboardInterrupt:
        raise UserError(f"interrupted; continue with `finetune run --resume {run_dir}`") from None
    finally:
        if policy is not None:
            policy.remove()
        if state.bad_images:
            ckpt.atomic_write_json(run_dir / "bad_images.json", state.bad_images)

    best = ckpt.load_checkpoint(run_dir / "best.pt")
    model.load_state_dict(best["model"])
    report: dict[str, Any] = {
        "run": str(run_dir),
        "best_epoch": state.best_epoch,
        "select": recipe.train.select,
        "threshold": recipe.train.threshold,
        "bad_images": state.bad_images,
        "splits": {},
    }
    for role in ("val", "test"):
        if role in loaders:
            out = predict(model, loaders[role], device, precision, recipe.train.channels_last, None,
                          recipe.data.on_bad_image, state, console)  # fmt: skip
            report["splits"][role] = split_report(out["targets"], out["probs"], classes, recipe.train.threshold)
    ckpt.atomic_write_json(run_dir / "report.json", report)
    print_report(report, Console())
    return run_dir


def load_run_model(run_dir: Path, recipe: Recipe, which: str = "best") -> tuple[torch.nn.Module, ClassMap]:
    """The trained model of a run, on CPU, in eval mode, and its classes."""
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    classes = ClassMap.from_json(json.loads((run_dir / "classes.json").read_text()))
    bare = recipe.model_copy(update={"model": recipe.model.model_copy(update={"pretrained": False, "checkpoint": ""})})
    model, _ = build.build_model(bare, len(classes))
    model.load_state_dict(ckpt.load_checkpoint(path)["model"])
    return model.eval(), classes


def evaluate(
    run_dir: str | Path, role: str = "test", threshold: float | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Score a run's best checkpoint on one split; writes ``eval_<role>.json`` in the run and prints the tables."""
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    split_name(recipe, role)
    device, precision = build.build_device(recipe.train)
    model, classes = load_run_model(run_dir, recipe)
    split = build.build_split(recipe.data, getattr(recipe.data, role), classes)
    missing = check_images(split.image_paths)
    if missing:
        raise UserError(f"{missing[0]}; check data.root and data.images")
    loader = build.build_loader(recipe.data, build.build_dataset(recipe.data, split, False), False)
    model.to(device)
    out = predict(model, loader, device, precision, False, None, recipe.data.on_bad_image, None, console)
    thr = recipe.train.threshold if threshold is None else threshold
    report = {
        "run": str(run_dir),
        "threshold": thr,
        "splits": {role: split_report(out["targets"], out["probs"], classes, thr)},
    }
    ckpt.atomic_write_json(run_dir / f"eval_{role}.json", report)
    return report


def predict_images(run_dir: str | Path, images: list[str], threshold: float | None = None) -> list[dict[str, Any]]:
    """Per-image labels (probability >= threshold) and every class's probability."""
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    model, classes = load_run_model(run_dir, recipe)
    mean, std = build.norm_stats(recipe.data)
    from finetune.data.transforms import eval_transform

    tf = eval_transform(recipe.data.image_size, mean, std)
    thr = recipe.train.threshold if threshold is None else threshold
    results = []
    for path in images:
        try:
            pixels = read_rgb(path)
        except FileNotFoundError:
            raise UserError(f"{path}: image file not found") from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
            raise UserError(f"{path}: cannot decode image ({err})") from None
        with torch.inference_mode():
            probs = torch.sigmoid(model(tf(image=pixels)["image"][None]).float())[0].numpy()
        order = np.argsort(-probs)
        results.append(
            {
                "image": str(path),
                "labels": [classes.names[i] for i in order if probs[i] >= thr],
                "probabilities": {classes.names[i]: round(float(probs[i]), 5) for i in order},
                "threshold": thr,
            }
        )
    return results
