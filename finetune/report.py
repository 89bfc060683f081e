"""The evaluation report: summary and per-class numbers as JSON, and rich tables for the console."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from finetune.data.coco import ClassMap
from finetune.metrics import average_precision, prf, summarize

SUMMARY_KEYS = ("map", "macro_precision", "macro_recall", "macro_f1", "micro_precision", "micro_recall", "micro_f1")


def split_report(targets: np.ndarray, probs: np.ndarray, classes: ClassMap, threshold: float = 0.5) -> dict[str, Any]:
    """Summary metrics and a per-class table for one split, as JSON-ready data."""
    ap = average_precision(targets, probs)
    per = prf(targets, probs, threshold)
    rows = [
        {
            "index": i,
            "id": classes.ids[i],
            "name": classes.names[i],
            "support": int(per["support"][i]),
            "ap": None if np.isnan(ap[i]) else float(ap[i]),
            "precision": float(per["precision"][i]),
            "recall": float(per["recall"][i]),
            "f1": float(per["f1"][i]),
        }
        for i in range(len(classes))
    ]
    return {
        "images": int(len(targets)),
        "threshold": threshold,
        "summary": summarize(targets, probs, threshold),
        "per_class": rows,
    }


def print_report(report: dict[str, Any], console: Console, per_class: bool = True) -> None:
    """Print a summary table (one row per split) and, optionally, each split's per-class table."""
    table = Table(title=f"{report.get('run', 'evaluation')} (threshold {report.get('threshold', 0.5)})")
    table.add_column("split")
    table.add_column("images", justify="right")
    for key in SUMMARY_KEYS:
        table.add_column(key.replace("_", " ").replace("map", "mAP"), justify="right")
    for name, split in report["splits"].items():
        s = split["summary"]
        table.add_row(name, str(split["images"]), *(f"{100 * s[k]:.1f}" for k in SUMMARY_KEYS))
    console.print(table)
    if not per_class:
        return
    for name, split in report["splits"].items():
        t = Table(title=f"{name}: per class")
        for col in ("class", "support", "AP", "P", "R", "F1"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for r in split["per_class"]:
            ap = "-" if r["ap"] is None else f"{100 * r['ap']:.1f}"
            t.add_row(r["name"], str(r["support"]), ap, *(f"{100 * r[k]:.1f}" for k in ("precision", "recall", "f1")))
        console.print(t)
