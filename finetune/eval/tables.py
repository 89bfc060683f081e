"""The evaluation report: summary and per-class numbers as JSON and Markdown, and rich tables for the console.

Each split has its numbers at the fixed threshold (``train.threshold``, 0.5 by default) and, when the run has
calibrated thresholds, at those. The run-level ``calibration`` section says where the thresholds were fitted and
quotes the gain on data they were not fitted on: the test split, or k-fold cross-fitting on the calibration split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.data.split import ClassMap
from finetune.eval.metrics import average_precision, prf, summarize
from finetune.eval.run_report import RunReport, SplitReport
from finetune.io import markdown_text
from finetune.labels import unknown_counts

SUMMARY_KEYS = ("map", "macro_precision", "macro_recall", "macro_f1", "micro_precision", "micro_recall", "micro_f1")
HEADLINE = ("macro_f1", "micro_f1", "macro_precision", "macro_recall", "cf1", "of1")


def split_report(
    targets: np.ndarray,
    probs: np.ndarray,
    classes: ClassMap,
    threshold: float = 0.5,
    calibrated: np.ndarray | None = None,
) -> dict[str, Any]:
    """Summary metrics and a per-class table for one split, at ``threshold`` and at ``calibrated`` thresholds.

    Unknown labels (NaN targets) are counted per class (``unknown``) and left out of every number.
    """
    ap = average_precision(targets, probs)
    unknown = unknown_counts(targets)
    per = prf(targets, probs, threshold)
    cal = prf(targets, probs, calibrated) if calibrated is not None else None
    rows = []
    for i in range(len(classes)):
        row = {
            "index": i,
            "id": classes.ids[i],
            "name": classes.names[i],
            "support": int(per["support"][i]),
            "unknown": int(unknown[i]),
            "ap": None if np.isnan(ap[i]) else float(ap[i]),
            "precision": float(per["precision"][i]),
            "recall": float(per["recall"][i]),
            "f1": float(per["f1"][i]),
        }
        if cal is not None:
            row["threshold_cal"] = float(calibrated[i])
            row.update({f"{k}_cal": float(cal[k][i]) for k in ("precision", "recall", "f1")})
        rows.append(row)
    out: dict[str, Any] = {
        "images": int(len(targets)),
        "unknown": int(unknown.sum()),
        "threshold": threshold,
        "summary": summarize(targets, probs, threshold),
        "per_class": rows,
    }
    if calibrated is not None:
        out["calibrated"] = {"summary": summarize(targets, probs, calibrated)}
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def class_columns(split: SplitReport, threshold: str = "threshold") -> list[str]:
    """The per-class table's columns: ``unknown`` only where the split has unknown labels, calibrated ones if any."""
    unknown = ["unknown"] if split.unknown else []
    cal = [threshold, "P cal", "R cal", "F1 cal"] if split.calibrated_summary is not None else []
    return ["class", "support", *unknown, "AP", "P", "R", "F1", *cal]


def _class_cells(
    row: dict[str, Any], calibrated: bool, threshold_digits: int, unknown: bool = False, markup: bool = True
) -> list[str]:
    """One per-class row as text: name, support, (unknown,) AP, P/R/F1, then threshold and P/R/F1 calibrated.

    Args:
        row: The class's row of a report split.
        calibrated: Add the calibrated threshold and P/R/F1.
        threshold_digits: Decimals of the threshold.
        unknown: Add the count of unknown labels.
        markup: Escape the name for rich's console markup (not for Markdown, whose rows escape every cell).
    """
    prf_keys = ("precision", "recall", "f1")
    counts = [str(row["support"])] + ([str(row.get("unknown", 0))] if unknown else [])
    name = escape(row["name"]) if markup else row["name"]
    cells = [name, *counts, _pct(row["ap"]), *(_pct(row[k]) for k in prf_keys)]
    if calibrated:
        cells += [f"{row['threshold_cal']:.{threshold_digits}f}", *(_pct(row[f"{k}_cal"]) for k in prf_keys)]
    return cells


def probabilities_line(s: dict[str, Any]) -> str:
    """One line on the probability scaling: ECE and Brier before -> after, on held-out data."""
    b, a = s["before"], s["after"]
    return (
        f"probabilities: {s['method']} scaling fitted on {s['fitted_on']}; on data it was not fitted on ({s['how']}) "
        f"ECE {b['ece']:.4f} -> {a['ece']:.4f}, Brier {b['brier']:.4f} -> {a['brier']:.4f}"
    )


def unknown_line(report: RunReport) -> str | None:
    """One line on the unknown labels of each split (None when there are none)."""
    parts = []
    for name, split in report.splits.items():
        if split.unknown:
            total = split.images * len(split.per_class)
            parts.append(f"{name} {split.unknown} of {total} entries ({100 * split.unknown / total:.0f}%)")
    if not parts:
        return None
    return "unknown labels (not checked; left out of every number here): " + ", ".join(parts)


def targets_line(t: dict[str, Any]) -> str:
    """One line on the operating points: how many classes met their target, where."""
    return (
        f"operating points: {t['met_fitting']} of {t['classes']} classes meet their target on the fitting split, "
        f"{t['met_held_out']} of {t['scored_held_out']} with held-out positives on data it was not fitted on "
        f"({t['how']})"
    )


TARGET_COLUMNS = ["class", "objective", "target", "threshold", "from", "fitting", "held-out", "other held-out", "met"]


def target_rows(t: dict[str, Any]) -> list[list[str]]:
    """The operating-point table as text: the constrained value reached on each side, the other one held out."""
    rows = []
    for r in t["rows"]:
        met = "-" if r["met_held_out"] is None else ("yes" if r["met_held_out"] else "no")
        rows.append(
            [
                r["name"],
                r["objective"].replace("_at_least", " >="),
                f"{r['target']:g}",
                f"{r['threshold']:.3f}",
                r["source"],
                _pct(r["fitting"]),
                _pct(r["held_out"]),
                _pct(r["held_out_other"]),
                met,
            ]
        )
    return rows


def print_report(report: RunReport | dict[str, Any], console: Console, per_class: bool = True) -> None:
    """Print a summary table (one row per split and threshold kind), the calibration gain and per-class tables."""
    report = RunReport.of(report)
    table = Table(title=escape(report.run))
    table.add_column("split")
    table.add_column("thresholds")
    table.add_column("images", justify="right")
    for key in SUMMARY_KEYS:
        table.add_column(key.replace("_", " ").replace("map", "mAP"), justify="right")
    for name, split in report.splits.items():
        s, c = split.summary, split.calibrated_summary
        table.add_row(name, f"fixed {split.threshold:g}", str(split.images), *(_pct(s[k]) for k in SUMMARY_KEYS))
        if c is not None:
            table.add_row(name, "calibrated", str(split.images), *(_pct(c[k]) for k in SUMMARY_KEYS))
    console.print(table)
    if unknown_line(report):
        console.print(unknown_line(report))
    cal, h = report.calibration, report.honest
    if cal and h:
        console.print(
            f"calibration: fitted on {escape(str(cal['fitted_on']))}; on data it was not fitted on ({h.how}): "
            "macro-F1 "
            f"{_pct(h.fixed['macro_f1'])} -> {_pct(h.calibrated['macro_f1'])}, micro-F1 "
            f"{_pct(h.fixed['micro_f1'])} -> {_pct(h.calibrated['micro_f1'])}"
        )
        if report.operating_points:
            console.print(targets_line(report.operating_points))
    if report.probabilities:
        console.print(probabilities_line(report.probabilities))
    if not per_class:
        return
    for name, split in report.splits.items():
        has_cal, has_unknown = split.calibrated_summary is not None, bool(split.unknown)
        t = Table(title=f"{name}: per class")
        for col in class_columns(split, "thr"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for r in split.per_class:
            t.add_row(*_class_cells(r, has_cal, 2, has_unknown))
        console.print(t)


def _md_row(cells: list[str]) -> str:
    """A Markdown table row whose cells show as text (class names may hold HTML or ``|``)."""
    return "| " + " | ".join(markdown_text(c) for c in cells) + " |"


def markdown_report(report: RunReport | dict[str, Any]) -> str:
    """The same report as Markdown (``report.md`` in the run); every name in it is escaped."""
    report = RunReport.of(report)
    lines = [f"# {markdown_text(report.run)}", ""]
    if unknown_line(report):
        lines += [str(unknown_line(report)), ""]
    cal, h = report.calibration, report.honest
    if cal and h:
        lines += [
            f"Thresholds fitted on **{markdown_text(cal['fitted_on'])}** ({cal['metric']}, "
            f"min_positives {cal['min_positives']}, "
            f"shrink {cal['shrink']:g}; global threshold {cal['global_threshold']:.3f}). "
            f"Measured on data they were not fitted on ({h.how}):",
            "",
            "| metric | fixed threshold | calibrated |",
            "|---|---:|---:|",
            *(f"| {k} | {_pct(h.fixed[k])} | {_pct(h.calibrated[k])} |" for k in HEADLINE),
            "",
        ]
        if report.probabilities:
            lines += [probabilities_line(report.probabilities) + " (reliability.png)", ""]
        if report.operating_points:
            t = report.operating_points
            rule = "|---|---|" + "---:|" * 2 + "---|" + "---:|" * 4
            lines += [targets_line(t), "", "| " + " | ".join(TARGET_COLUMNS) + " |", rule]
            lines += [_md_row(r) for r in target_rows(t)] + [""]
    lines += ["## Summary", "", "| split | thresholds | images | " + " | ".join(SUMMARY_KEYS) + " |"]
    lines.append("|---|---|---:|" + "---:|" * len(SUMMARY_KEYS))
    for name, split in report.splits.items():
        for kind, s in (("fixed", split.summary), ("calibrated", split.calibrated_summary)):
            if s is not None:
                lines.append(_md_row([name, kind, str(split.images), *(_pct(s[k]) for k in SUMMARY_KEYS)]))
    for name, split in report.splits.items():
        has_cal, has_unknown = split.calibrated_summary is not None, bool(split.unknown)
        cols = class_columns(split)
        title = f"## {markdown_text(name)}: per class"
        lines += ["", title, "", "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
        for r in split.per_class:
            lines.append(_md_row(_class_cells(r, has_cal, 3, has_unknown, markup=False)))
    return "\n".join(lines) + "\n"


def single_label_report(targets: np.ndarray, probs: np.ndarray, classes: ClassMap) -> dict[str, Any]:
    """Top-1/top-5, mean per-class recall, per-class precision/recall and the confusion matrix of one split."""
    from finetune.eval.metrics import confusion, labels_of, summarize_single

    y = labels_of(targets)
    pred = np.asarray(probs).argmax(1)
    cm = confusion(y, pred, len(classes))
    support, predicted, hits = cm.sum(1), cm.sum(0), np.diag(cm)
    rows = [
        {
            "index": i,
            "name": classes.names[i],
            "support": int(support[i]),
            "recall": float(hits[i] / support[i]) if support[i] else None,
            "precision": float(hits[i] / predicted[i]) if predicted[i] else None,
        }
        for i in range(len(classes))
    ]
    return {
        "images": int(len(y)),
        "summary": summarize_single(targets, probs),
        "per_class": rows,
        # Sparse (true, predicted, count) triples: at most one per image, where a dense list grows with classes².
        "confusion": [[int(t), int(p), int(cm[t, p])] for t, p in zip(*np.nonzero(cm))],
    }


def print_single_report(report: RunReport | dict[str, Any], console: Console) -> None:
    """Summary (top-1, top-5, mean recall, mAP) per split and per-class recall/precision."""
    report = RunReport.of(report)
    table = Table(title=escape(report.run))
    for col in ("split", "images", "top-1", "top-5", "mean recall", "mAP"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, split in report.splits.items():
        s = split.summary
        table.add_row(name, str(split.images), *(_pct(s[k]) for k in ("top1", "top5", "mean_recall", "map")))
    console.print(table)
    if report.probabilities:
        console.print(probabilities_line(report.probabilities))
    if report.reject:
        from finetune.eval.reject import reject_line

        console.print(reject_line(report.reject))
    for name, split in report.splits.items():
        t = Table(title=f"{name}: per class")
        for col in ("class", "support", "recall", "precision"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for r in split.per_class:
            t.add_row(escape(r["name"]), str(r["support"]), _pct(r["recall"]), _pct(r["precision"]))
        console.print(t)
