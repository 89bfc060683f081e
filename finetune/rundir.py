"""The run directory: its paths, creating or reopening one, ``classes.json``, the saved recipe, atomic writes.

A run directory holds ``recipe.toml`` (resolved), ``classes.json``, ``metrics.jsonl`` (and ``metrics.csv``,
``tensorboard/``, ``mlruns/`` when ``[log] to`` asks), ``last.pt``, ``best.pt``, ``thresholds.json`` (per-class
calibrated thresholds), ``report.json`` / ``report.md``, plots and, if any image could not be read,
``bad_images.json``. Nothing here overwrites a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomli_w

from finetune import checkpoint as ckpt
from finetune.config import Recipe, load_recipe, recipe_to_dict
from finetune.data.coco import ClassMap
from finetune.errors import UserError


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
    def create(cls, path: str | Path) -> RunDir:
        """Make a new run directory; refuse one that already holds a run (nothing a user made is lost)."""
        run = cls(path)
        if run.path.exists() and any(run.path.iterdir()):
            raise UserError(
                f"{run.path} already holds a run; continue it with `finetune run --resume {run.path}` "
                "or start another with --set output.name=NEW_NAME"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (it has a ``recipe.toml``)."""
        run = cls(path)
        if not (run.path / "recipe.toml").is_file():
            raise UserError(f"{path}: not a run directory (no recipe.toml)")
        return run

    @classmethod
    def for_resume(cls, path: str | Path) -> RunDir:
        """An existing run directory with a ``last.pt`` to continue from."""
        run = cls.open(path)
        if not (run.path / "last.pt").is_file():
            raise UserError(f"{path}: no last.pt to resume from (did the first epoch finish?)")
        return run

    def recipe(self, overrides: list[str] | None = None) -> Recipe:
        """The resolved recipe saved in the run, with optional ``--set`` overrides."""
        return load_recipe(self.path / "recipe.toml", overrides)

    def save_recipe(self, recipe: Recipe) -> None:
        """Write ``recipe.toml`` (the resolved recipe the run trains with)."""
        self.write_text("recipe.toml", tomli_w.dumps(recipe_to_dict(recipe)))

    def classes(self) -> ClassMap:
        """The run's classes (``classes.json``)."""
        return ClassMap.from_json(self.read_json("classes.json"))

    def save_classes(self, classes: ClassMap) -> None:
        """Write ``classes.json``."""
        self.write_json("classes.json", classes.to_json())

    def checkpoint(self, which: str = "best") -> dict[str, Any]:
        """A checkpoint of the run (``best`` or ``last``), loaded safely."""
        path = self.path / f"{which}.pt"
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
        return ckpt.load_checkpoint(path)

    def trim_metrics(self, epochs_done: int) -> None:
        """Drop ``metrics.jsonl`` lines past the checkpoint's epoch, and a partial last line (a kill mid-write)."""
        from finetune.loggers import read_jsonl

        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        rows = read_jsonl(path)
        kept = [r for r in rows if r.get("epoch", 0) <= epochs_done]
        if len(kept) != len(path.read_text().splitlines()):
            self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def read_json(self, name: str) -> Any:
        """A JSON file of the run."""
        return json.loads((self.path / name).read_text())

    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON file atomically."""
        ckpt.atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        """Write a text file atomically."""
        ckpt.atomic_write_text(self.path / name, text)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file atomically."""
        ckpt.atomic_write_bytes(self.path / name, data)
