"""A run's model over its splits, unaugmented, in dataset order: what eval, calibrate, the page and compare score."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console

from finetune.assembly import RunParts, build_from_run, split_name
from finetune.data.split import ClassMap
from finetune.eval.predict import predict_loader
from finetune.predictions import Predictions
from finetune.rundir.directory import RunDir


def predictions(parts: RunParts, roles: list[str]) -> dict[str, Predictions]:
    """Probabilities and targets of the parts' model on each of ``roles``, unaugmented, in dataset order.

    Returns:
        Role -> its predictions.
    """
    for role in roles:
        split_name(parts.recipe, role)  # a role the recipe has no split for is one clear line
    settings = dataclasses.replace(parts.eval_settings, channels_last=False)  # place() keeps the default layout
    model = parts.place()
    return {role: predict_loader(model, parts.loader(role), settings, console=parts.console) for role in roles}


def predict_run(
    run_dir: str | Path, roles: list[str], overrides: list[str] | None = None, console: Console | None = None
) -> tuple[dict[str, Predictions], ClassMap]:
    """Probabilities and targets of a run's best checkpoint on each of ``roles`` (train/val/test), unaugmented.

    Returns:
        Role -> its predictions, and the run's classes.
    """
    parts = build_from_run(RunDir.open(run_dir), roles, overrides, console)
    return predictions(parts, roles), parts.classes
