"""Dataset statistics: per-channel mean/std of the train split (for ``normalize = "dataset"``) and label counts.

Mean and std are over every pixel of every train image after resizing to ``image_size`` (the eval pipeline without
normalisation), on the 0..1 scale, computed in float64 from per-image sums so the order of images does not matter.
They are cached as JSON under ``$FINETUNE_CACHE_DIR`` (default ``~/.cache/finetune``), keyed by the split's path,
format, image size and image count, so a run with ``normalize = "dataset"`` reads them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

from finetune.config.rules import task_name
from finetune.data.split import DECODE_ERRORS, Split, read_rgb
from finetune.errors import UserError
from finetune.io import atomic_write_json, cache_dir


def cache_path(split: Split, fmt: str, image_size: int) -> Path:
    """Where the statistics of ``split`` at ``image_size`` are cached."""
    ann = Path(split.annotation_file)
    stamp = ann.stat().st_mtime_ns if ann.is_file() else 0
    key = json.dumps(
        [
            str(Path(split.image_dir).resolve()),
            str(ann.resolve()),
            stamp,
            split.name,
            fmt,
            image_size,
            len(split.targets),
        ]
    )
    return cache_dir("stats") / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def _image(split: Split, i: int, on_bad_image: str) -> np.ndarray | None:
    """Image ``i`` of the split; None for an unreadable one under ``on_bad_image = "skip"``."""
    if isinstance(split.image_paths, np.ndarray):
        return split.image_paths[i]
    path = split.image_paths[i]
    try:
        return read_rgb(path)
    except DECODE_ERRORS as err:  # FileNotFoundError included
        if on_bad_image == "error":
            raise UserError(
                f'{path}: cannot read image ({err}); fix or remove it, or set data.on_bad_image = "skip"'
            ) from None
        return None


def compute_stats(
    split: Split, image_size: int, multi_label: bool = True, on_bad_image: str = "skip"
) -> dict[str, Any]:
    """Per-channel mean/std (0..1), label counts and, for multi-label data, label co-occurrence counts.

    Unreadable images are skipped (and counted in ``skipped``) or, with ``on_bad_image = "error"``, a user error.
    """
    resize = A.Resize(image_size, image_size)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = skipped = 0
    for i in range(len(split.targets)):
        image = _image(split, i, on_bad_image)
        if image is None:
            skipped += 1
            continue
        x = resize(image=image)["image"].reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        pixels += len(x)
    if not pixels:
        raise UserError(f"{split.image_dir}: none of the {len(split.targets)} {split.name} images could be read")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 0.0))
    y = (np.asarray(split.targets) > 0.5).astype(np.int64)
    out: dict[str, Any] = {
        "split": split.name,
        "images": int(len(y)),
        "image_size": image_size,
        "skipped": skipped,
        "mean": [round(float(v), 6) for v in mean],
        "std": [round(float(v), 6) for v in std],
        "label_counts": {name: int(c) for name, c in zip(split.classes.names, y.sum(0))},
    }
    unknown = np.isnan(np.asarray(split.targets, dtype=np.float64)).sum(0)
    if unknown.any():
        out["unknown_counts"] = {name: int(c) for name, c in zip(split.classes.names, unknown)}
    if multi_label:
        out["labels_per_image"] = float(y.sum(1).mean())
        out["cooccurrence"] = (y.T @ y).tolist()
    return out


def stats_key(fmt: str, task: str = "auto") -> str:
    """What the statistics are keyed and counted by: the format, with ``data.task`` when it is not the format's."""
    return fmt if task == "auto" else f"{fmt}/{task}"


def load_or_compute(
    split: Split, fmt: str, image_size: int, refresh: bool = False, on_bad_image: str = "skip"
) -> tuple[dict[str, Any], bool]:
    """Cached statistics, computing and caching them when absent (or with ``refresh``).

    Returns:
        The statistics and whether they came from the cache.
    """
    path = cache_path(split, fmt, image_size)
    if path.is_file() and not refresh:
        try:
            cached = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            cached = None  # a corrupt cache (a kill mid-write by an older version, a hand edit) is computed again
        if isinstance(cached, dict) and {"mean", "std", "label_counts"} <= cached.keys():
            return cached, True
    multi = task_name(*fmt.split("/")) == "multi_label"
    stats = compute_stats(split, image_size, multi_label=multi, on_bad_image=on_bad_image)
    atomic_write_json(path, stats)
    return stats, False
