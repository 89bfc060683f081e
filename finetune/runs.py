"""Runs: start or resume a training run in ``runs/<name>/``, evaluate a run on a split, predict images.

A run directory holds ``recipe.toml`` (resolved), ``classes.json``, ``metrics.jsonl``, ``last.pt``, ``best.pt``,
``thresholds.json`` (per-class calibrated thresholds), ``report.json`` / ``report.md``, ``pr_curves.png`` and
``f1_per_class.png`` and, if any image could not be read, ``bad_images.json``.
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

from finetune import build, plots
from finetune import checkpoint as ckpt
from finetune.config import Recipe, load_recipe, recipe_to_dict
from finetune.data.coco import ClassMap, check_images, read_rgb
from finetune.data.stats import load_or_compute
from finetune.errors import UserError
from finetune.metrics import prf, summarize
from finetune.report import (
    markdown_report,
    print_report,
    print_single_report,
    single_label_report,
    split_report,
)
from finetune.thresholds import Calibration, cross_fit, fit_thresholds
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
    if recipe.data.augment.normalize == "dataset":  # resolve once; recipe.toml then records the numbers used
        stats, cached = load_or_compute(splits["train"], recipe.data.format, recipe.data.image_size)
        recipe.data.augment.normalize = {"mean": stats["mean"], "std": stats["std"]}
        console.print(
            f"normalize: train-split mean {stats['mean']} std {stats['std']} ({'cached' if cached else 'computed'})"
        )
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
    eval_loaders = {role: loaders[role] for role in ("val", "test") if role in loaders}
    if recipe.calibrate.enabled and recipe.calibrate.split == "train":  # unaugmented, in order, nothing dropped
        eval_loaders["train"] = build.build_loader(
            recipe.data, build.build_dataset(recipe.data, splits["train"], False), False
        )
    single = recipe.data.single_label
    outs = {
        role: predict(
            model,
            loader,
            device,
            precision,
            recipe.train.channels_last,
            None,
            recipe.data.on_bad_image,
            state,
            console,
            single,
        )
        for role, loader in eval_loaders.items()
        if role != "train" or not single
    }
    extra = {"best_epoch": state.best_epoch, "select": settings.select, "bad_images": state.bad_images}
    if single:
        report = finish_single_report(run_dir, classes, outs, extra)
        print_single_report(report, Console())
    else:
        report = finish_report(run_dir, recipe, classes, outs, extra, console)
        print_report(report, Console())
    return run_dir


def finish_single_report(
    run_dir: Path, classes: ClassMap, outs: dict[str, dict[str, Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    """Single-label report.json and confusion_matrix.png (of the test split if there is one, else val)."""
    report: dict[str, Any] = {"run": str(run_dir), "task": "single_label", **extra, "splits": {}}
    for role, out in outs.items():
        report["splits"][role] = single_label_report(out["targets"], out["probs"], classes)
    shown = "test" if "test" in report["splits"] else "val"
    plots.confusion_png(np.array(report["splits"][shown]["confusion"]), list(classes.names),
                        run_dir / "confusion_matrix.png", f"{shown}: confusion matrix")  # fmt: skip
    ckpt.atomic_write_json(run_dir / "report.json", report)
    return report


def fit_calibration(recipe: Recipe, out: dict[str, Any], classes: ClassMap, role: str) -> Calibration:
    """Per-class thresholds from ``[calibrate]`` on one split's predictions."""
    c = recipe.calibrate
    try:
        cal = fit_thresholds(out["targets"], out["probs"], c.metric, c.beta, c.min_positives, c.shrink)
    except ValueError as err:
        raise UserError(f"calibrate: {err}") from None
    cal.names, cal.split = list(classes.names), role
    return cal


def finish_report(
    run_dir: Path,
    recipe: Recipe,
    classes: ClassMap,
    outs: dict[str, dict[str, Any]],
    extra: dict[str, Any],
    console: Console,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Calibrate (unless disabled or given), then write report.json, report.md, thresholds.json and the plots.

    The calibration gain is quoted on data the thresholds were not fitted on: the test split when there is one,
    otherwise k-fold cross-fitting on the calibration split.
    """
    c, fixed = recipe.calibrate, recipe.train.threshold
    role = c.split
    if calibration is None and c.enabled and not recipe.data.single_label:
        calibration = fit_calibration(recipe, outs[role], classes, role)
    thr = calibration.thresholds if calibration is not None else None
    report: dict[str, Any] = {"run": str(run_dir), **extra, "threshold": fixed, "calibration": None, "splits": {}}
    for name, out in outs.items():
        if name != "train":
            report["splits"][name] = split_report(out["targets"], out["probs"], classes, fixed, thr)
    if calibration is not None:
        role = calibration.split
        if "test" in report["splits"] and role != "test":
            test = report["splits"]["test"]
            honest = {"how": "test split", "fixed": test["summary"], "calibrated": test["calibrated"]["summary"]}
            f1_fixed = [r["f1"] for r in test["per_class"]]
            f1_cal = [r["f1_cal"] for r in test["per_class"]]
        else:
            out = outs[role]
            options = {"metric": c.metric, "beta": c.beta, "min_positives": c.min_positives, "shrink": c.shrink}
            per_row, _ = cross_fit(out["targets"], out["probs"], c.folds, recipe.train.seed, **options)
            honest = {
                "how": f"{min(c.folds, len(per_row))}-fold cross-fitting on {role}",
                "fixed": summarize(out["targets"], out["probs"], fixed),
                "calibrated": summarize(out["targets"], out["probs"], per_row),
            }
            f1_fixed = prf(out["targets"], out["probs"], fixed)["f1"]
            f1_cal = prf(out["targets"], out["probs"], per_row)["f1"]
        report["calibration"] = {
            "fitted_on": role,
            "metric": calibration.metric,
            "beta": calibration.beta,
            "min_positives": c.min_positives,
            "shrink": c.shrink,
            "global_threshold": calibration.global_threshold,
            "honest": honest,
        }
        save_thresholds(run_dir, calibration)
        out = outs[role]
        plotted = plots.pr_curves(out["targets"], out["probs"], calibration.thresholds, classes.names,
                                  run_dir / "pr_curves.png", role)  # fmt: skip
        plots.f1_bars(np.asarray(f1_fixed), np.asarray(f1_cal), classes.names, run_dir / "f1_per_class.png",
                      f"per-class F1, {honest['how']}: fixed {fixed:g} vs calibrated")  # fmt: skip
        report["calibration"]["plots"] = {"pr_curves.png": plotted, "f1_per_class.png": honest["how"]}
    ckpt.atomic_write_json(run_dir / "report.json", report)
    ckpt.atomic_write_text(run_dir / "report.md", markdown_report(report))
    return report


def save_thresholds(run_dir: Path, calibration: Calibration) -> None:
    """Write ``thresholds.json``; an existing one is kept as ``thresholds.prev.json`` (nothing is lost)."""
    path = run_dir / "thresholds.json"
    if path.exists():
        ckpt.atomic_write_bytes(run_dir / "thresholds.prev.json", path.read_bytes())
    ckpt.atomic_write_json(path, calibration.to_json())


def load_thresholds(run_dir: Path, threshold: float | None, recipe: Recipe) -> tuple[np.ndarray | float, str]:
    """The thresholds to apply: ``threshold`` if given, else the run's thresholds.json, else ``train.threshold``."""
    if threshold is not None:
        return threshold, f"fixed {threshold:g}"
    path = run_dir / "thresholds.json"
    if path.is_file():
        cal = Calibration.from_json(json.loads(path.read_text()))
        return cal.thresholds, f"calibrated on {cal.split or 'val'} (thresholds.json)"
    return recipe.train.threshold, f"fixed {recipe.train.threshold:g}"


def predict_splits(
    run_dir: str | Path, roles: list[str], recipe: Recipe | None = None, console: Console | None = None
) -> tuple[dict[str, dict[str, Any]], ClassMap]:
    """Probabilities and targets of a run's best checkpoint on each of ``roles`` (train/val/test), unaugmented.

    Returns:
        Role -> ``{"targets", "probs", "index"}`` arrays, and the run's classes.
    """
    run_dir = Path(run_dir)
    recipe = recipe or load_run_recipe(run_dir)
    device, precision = build.build_device(recipe.train)
    model, classes = load_run_model(run_dir, recipe)
    model.to(device)
    outs = {}
    for role in roles:
        split = build.build_split(recipe.data, split_name(recipe, role), classes)
        missing = check_images(split.image_paths)
        if missing:
            raise UserError(f"{missing[0]}; check data.root and data.images")
        loader = build.build_loader(recipe.data, build.build_dataset(recipe.data, split, False), False)
        outs[role] = predict(model, loader, device, precision, False, None, recipe.data.on_bad_image, None, console,
                             recipe.data.single_label)  # fmt: skip
    return outs, classes


def calibrate_run(
    run_dir: str | Path, role: str = "val", console: Console | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Re-fit a run's thresholds on ``role`` with its best checkpoint; rewrites thresholds.json and the report.

    ``overrides`` (``calibrate.shrink=20``...) apply to this calibration only; the run's recipe.toml is unchanged.
    """
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, overrides)
    if recipe.data.single_label:
        raise UserError(f"{run_dir}: a single-label run predicts the highest-scoring class; it has no thresholds")
    recipe.calibrate.split = role
    recipe.calibrate.enabled = True
    roles = [r for r in dict.fromkeys([role, "val", "test"]) if r != "test" or recipe.data.test]
    outs, classes = predict_splits(run_dir, roles, recipe, console)
    old = run_dir / "report.json"
    extra = {k: v for k, v in json.loads(old.read_text()).items() if k in ("best_epoch", "select", "bad_images")} \
        if old.is_file() else {}  # fmt: skip
    return finish_report(run_dir, recipe, classes, outs, extra, console or Console(stderr=True))


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
    outs, classes = predict_splits(run_dir, [role], recipe, console)
    out = outs[role]
    if recipe.data.single_label:
        report = {"run": str(run_dir), "task": "single_label",
                  "splits": {role: single_label_report(out["targets"], out["probs"], classes)}}  # fmt: skip
        ckpt.atomic_write_json(run_dir / f"eval_{role}.json", report)
        return report
    thr, how = load_thresholds(run_dir, threshold, recipe)
    fixed = thr if np.isscalar(thr) else recipe.train.threshold
    report = {
        "run": str(run_dir),
        "threshold": fixed,
        "thresholds": how,
        "splits": {role: split_report(out["targets"], out["probs"], classes, fixed, None if np.isscalar(thr) else thr)},
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
    single = recipe.data.single_label
    thr, how = load_thresholds(run_dir, threshold, recipe)
    how = "the highest-scoring class (single-label)" if single else how
    per_class = np.broadcast_to(np.asarray(thr, dtype=np.float64), (len(classes),))
    results = []
    for path in images:
        try:
            pixels = read_rgb(path)
        except FileNotFoundError:
            raise UserError(f"{path}: image file not found") from None
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
            raise UserError(f"{path}: cannot decode image ({err})") from None
        with torch.inference_mode():
            logits = model(tf(image=pixels)["image"][None]).float()
            probs = (torch.softmax(logits, 1) if single else torch.sigmoid(logits))[0].numpy()
        order = np.argsort(-probs)
        labels = [classes.names[order[0]]] if single else [classes.names[i] for i in order if probs[i] >= per_class[i]]
        results.append(
            {
                "image": str(path),
                "labels": labels,
                "probabilities": {classes.names[i]: round(float(probs[i]), 5) for i in order},
                "thresholds": how,
            }
        )
    return results
