"""Predicting images with a trained run: labels by the run's task and thresholds, and every class's probability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import build
from finetune.data.coco import read_rgb
from finetune.data.transforms import eval_transform
from finetune.errors import UserError
from finetune.evaluation import load_run_model, load_thresholds
from finetune.rundir import RunDir


def _read(path: str) -> np.ndarray:
    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
        raise UserError(f"{path}: cannot decode image ({err})") from None


def predict_images(run_dir: str | Path, images: list[str], threshold: float | None = None) -> list[dict[str, Any]]:
    """Per-image labels (the task's rule: probability >= threshold, or the arg-max) and every class's probability."""
    run = RunDir.open(run_dir)
    recipe = run.recipe()
    task = build.build_task(recipe)
    model, classes = load_run_model(run, recipe)
    mean, std = build.norm_stats(recipe.data)
    tf = eval_transform(recipe.data.image_size, mean, std)
    thr, how = load_thresholds(run, threshold, recipe.train.threshold)
    results = []
    for path in images:
        pixels = _read(path)
        with torch.inference_mode():
            probs = task.activation(model(tf(image=pixels)["image"][None]).float())[0].numpy()
        (labels,) = task.labels(probs[None], thr)
        order = np.argsort(-probs)
        results.append(
            {
                "image": str(path),
                "labels": [classes.names[i] for i in labels],
                "probabilities": {classes.names[i]: round(float(probs[i]), 5) for i in order},
                "thresholds": task.threshold_note(how),
            }
        )
    return results
