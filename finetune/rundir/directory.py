"""The run directory: its paths, creating or reopening one, ``classes.json``, the saved recipe, atomic writes.

A run directory holds ``recipe.toml`` (resolved), ``classes.json``, ``metrics.jsonl`` (and ``metrics.csv``,
``tensorboard/``, ``mlruns/`` when ``[log] to`` asks), ``last.pt``, ``best.pt``, ``thresholds.json`` (per-class
calibrated thresholds), ``report.json`` / ``report.md``, plots and, if any image could not be read,
``bad_images.json``. Nothing here overwrites a finished run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import tomli_w

from finetune import runfiles
from finetune.config import Recipe, load_recipe, recipe_to_dict
from finetune.config.overrides import parse_override
from finetune.data.split import ClassMap
from finetune.errors import UserError
from finetune.io import (
    TMP_SUFFIX,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    read_json,
    remove_stale_temporaries,
)

# What a run writes before its first last.pt; a directory holding only these can be rerun or resumed from scratch.
# best.pt is written just before last.pt: alone, it is epoch 1's, from a run killed (or out of disk) between the two.
_BEFORE_FIRST_CHECKPOINT = {
    runfiles.LOCK,
    runfiles.BEST,
    runfiles.RECIPE,
    "steps",
    runfiles.TORCHRUN_ID,
    runfiles.CLASSES,
    runfiles.METRICS,
    runfiles.METRICS_CSV,
    runfiles.BAD_IMAGES,
    "tensorboard",
    "mlruns",
    "wandb",
    runfiles.WANDB_ID,
}
# The keys --resume --set may change: none changes what an epoch computes (epochs may only grow; checked on resume).
RESUME_KEYS = {"train.epochs", "data.num_workers", "data.root", "log.to"}
# What `report` / `inspect` read from a recipe: where the images are and how they are predicted. The model's own
# settings (its input size, training, augmentation) are fixed by the run.
REPORT_KEYS = {"data.root", "data.num_workers", "data.batch_size", "data.images", "train.device", "train.precision"}


def _outside(overrides: list[str] | None, allowed: set[str]) -> str:
    """The first ``--set`` key not in ``allowed`` ("" when there is none)."""
    keys = (".".join(parse_override(item)[0]) for item in overrides or [])
    return next((k for k in keys if k not in allowed), "")


class RunDir:
    """One run's directory.

    Args:
        path: The directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def check_new(cls, path: str | Path) -> RunDir:
        """The run directory a new run would create, refused (as :meth:`create` would) when it holds a run."""
        run = cls(path)
        if run.path.is_dir() and any(run.path.iterdir()) and not run.started_only():
            raise UserError(
                f"{run.path} already holds a run; continue it with `finetune run --resume {run.path}` "
                "or start another with --set output.name=NEW_NAME"
            )
        return run

    @classmethod
    def create(cls, path: str | Path) -> RunDir:
        """Make a new run directory; refuse one that already holds a run (nothing a user made is lost).

        A directory left by a run stopped before its first checkpoint (only the files a run writes first, no
        ``last.pt``) holds nothing worth keeping: it is cleared and reused.
        """
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise UserError(f"{run.path}: is a file; choose another output.dir or output.name")
        cls.check_new(path)
        for entry in list(run.path.iterdir()) if run.path.exists() else []:
            if entry.name == runfiles.LOCK:  # the lock this run holds
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def started_only(self) -> bool:
        """Whether the directory holds only what a run writes before its first checkpoint."""
        if not self.path.is_dir() or self.resume_point() is not None:
            return False
        return all(e.name in _BEFORE_FIRST_CHECKPOINT or e.name.endswith(TMP_SUFFIX) for e in self.path.iterdir())

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (it has a ``recipe.toml``)."""
        run = cls(path)
        if not (run.path / runfiles.RECIPE).is_file():
            raise UserError(f"{path}: not a run directory (no recipe.toml)")
        return run

    @classmethod
    def for_resume(cls, path: str | Path) -> RunDir:
        """An existing run directory to continue; temporary files an interrupted write left are removed."""
        run = cls.open(path)
        if run.resume_point() is None and not run.started_only():
            raise UserError(f"{path}: no last.pt to resume from, and it holds more than a run stopped in epoch 1")
        remove_stale_temporaries(run.path)
        return run

    def resume_point(self) -> Path | None:
        """The checkpoint a resume continues from: ``last.pt``, or a newer mid-epoch ``steps/step-<step>.pt``."""
        from finetune.train.fit import step_checkpoints  # the layer's trainer names them

        last, steps = self.path / runfiles.LAST, step_checkpoints(self.path)
        if not steps:
            return last if last.is_file() else None
        if not last.is_file():
            return steps[-1]
        at = load_checkpoint(last).get("train_state", {}).get("step", 0)
        return steps[-1] if int(steps[-1].stem[5:]) > at else last

    def recipe(self, overrides: list[str] | None = None) -> Recipe:
        """The resolved recipe saved in the run, with optional ``--set`` overrides."""
        return load_recipe(self.path / runfiles.RECIPE, overrides)

    def resume_recipe(self, overrides: list[str] | None = None) -> Recipe:
        """The run's recipe for ``--resume``: only keys that leave the trained weights' meaning intact may change.

        Raises:
            UserError: For any other ``--set`` (a new batch size or LR would make the resumed run another run).
        """
        key = _outside(overrides, RESUME_KEYS)
        if key:
            raise UserError(
                f"--set {key}: cannot change on --resume (allowed: {', '.join(sorted(RESUME_KEYS))}); "
                "start a new run to change it"
            )
        return self.recipe(overrides)

    def report_recipe(self, overrides: list[str] | None = None) -> Recipe:
        """The run's recipe for ``report`` / ``inspect``: a ``--set`` of a key they do not read is refused.

        Raises:
            UserError: For a key outside :data:`REPORT_KEYS`.
        """
        key = _outside(overrides, REPORT_KEYS)
        if key:
            raise UserError(
                f"--set {key}: does nothing here (report and inspect read {', '.join(sorted(REPORT_KEYS))}); "
                "the run's other settings made its model"
            )
        return self.recipe(overrides)

    def save_recipe(self, recipe: Recipe) -> None:
        """Write ``recipe.toml`` (the resolved recipe), with ``data.root`` made absolute so that it works anywhere."""
        raw = recipe_to_dict(recipe)
        raw["data"]["root"] = str(Path(raw["data"]["root"]).resolve())
        checkpoint = raw["model"].get("checkpoint")
        if checkpoint and Path(checkpoint).exists():
            raw["model"]["checkpoint"] = str(Path(checkpoint).resolve())
        self.write_text(runfiles.RECIPE, tomli_w.dumps(raw))

    def classes(self) -> ClassMap:
        """The run's classes (``classes.json``)."""
        raw = self.read_json(runfiles.CLASSES)
        try:
            return ClassMap.from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(
                f"{self.path / runfiles.CLASSES}: corrupt (not a finetune class list); restore it"
            ) from None

    def save_classes(self, classes: ClassMap) -> None:
        """Write ``classes.json``."""
        self.write_json(runfiles.CLASSES, classes.to_json())

    def checkpoint(self, which: str = "best") -> dict[str, Any]:
        """A checkpoint of the run (``best`` or ``last``), loaded safely."""
        path = self.path / f"{which}.pt"
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
        return load_checkpoint(path)

    def trim_metrics(self, epochs_done: int) -> None:
        """Drop ``metrics.jsonl`` lines past the checkpoint's epoch, and a partial last line (a kill mid-write)."""
        from finetune.io import read_jsonl

        path = self.path / runfiles.METRICS
        if not path.is_file():
            return
        rows = read_jsonl(path)
        kept = [r for r in rows if r.get("epoch", 0) <= epochs_done]
        if len(kept) != len(path.read_text().splitlines()):
            self.write_text(runfiles.METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    def read_json(self, name: str) -> Any:
        """A JSON file of the run."""
        return read_json(self.path / name, None, f"restore it, or rerun the command that wrote {name}")

    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON file atomically."""
        atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        """Write a text file atomically."""
        atomic_write_text(self.path / name, text)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file atomically."""
        atomic_write_bytes(self.path / name, data)
