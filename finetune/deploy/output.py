"""Showing and saving predictions: the table ``finetune predict`` prints and its ``--csv`` file."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.deploy.predictor import Prediction
from finetune.io import atomic_write_text, csv_cell


def csv_header(classes: list[str]) -> str:
    """The first line :func:`write_csv` writes for these classes (its newline included)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["path", "labels", *(csv_cell(c) for c in classes)])
    return buf.getvalue()


def write_csv(path: Path, results: list[Prediction], classes: list[str]) -> None:
    """One row per image: ``path``, ``labels`` (``|``-separated, most probable first), one probability per class."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in results:  # names and paths never run as formulas
        probabilities = (f"{r.probabilities[c]:.6f}" for c in classes)
        writer.writerow([csv_cell(r.source), csv_cell("|".join(r.labels)), *probabilities])
    atomic_write_text(path, csv_header(classes) + buf.getvalue())


def print_predictions(results: list[Prediction], console: Console, top: int = 3) -> None:
    """A table: image, labels, the ``top`` most probable classes."""
    table = Table(show_header=True)
    for col in ("image", "labels", f"top {top}"):
        table.add_column(col)
    for r in results:
        best = sorted(r.probabilities.items(), key=lambda kv: -kv[1])[:top]
        shown = ", ".join(f"{k} {v:.2f}" for k, v in best)
        table.add_row(escape(r.source), escape(", ".join(r.labels) or "(none)"), escape(shown))
    console.print(table)
