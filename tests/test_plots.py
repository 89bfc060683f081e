"""The PNG plots and Markdown tables a user reads: legible at a glance, bounded at hundreds of classes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.split import ClassMap
from finetune.eval import plots
from finetune.eval.run_report import RunReport
from finetune.eval.tables import markdown_report
from finetune.eval.tasks import MULTI_LABEL


def test_pr_plot_titles_counts_and_thresholds_read_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random((200, 8)) < np.linspace(0.5, 0.02, 8)).astype(np.float32)
    probs = np.clip(targets * 0.6 + rng.random((200, 8)) * 0.5, 0, 1)
    thresholds = np.array([0.39, 0.33, 0.4, 0.41, 0.3, 0.32, 0.35, 0.38])
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.pr_curves(targets, probs, thresholds, [f"c{i}" for i in range(8)], tmp_path / "pr.png", "val")
    (fig,) = figures
    left, right = fig.axes[:2]
    assert left.get_title() == "most frequent classes (val)" and right.get_title() == "least frequent classes (val)"
    labels = [t.get_text() for ax in (left, right) for t in ax.get_legend().get_texts()]
    support = targets.sum(0).astype(int)
    assert labels[0] == f"c0 (n={support[0]}, t=0.39)" and all(".0," not in label for label in labels)
    assert not [t for ax in (left, right) for t in ax.texts]  # no free-floating threshold labels to collide


def test_markdown_summary_rows_are_closed() -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((40, 3)) < 0.4).astype(np.float32)
    probs = rng.random((40, 3))
    classes = ClassMap((1, 2, 3), ("a", "b", "c"))
    split = MULTI_LABEL.split_report(targets, probs, classes, 0.5, np.full(3, 0.4))
    text = markdown_report(
        RunReport({"task": "multi_label", "threshold": 0.5, "calibration": None, "splits": {"val": split}})
    )
    rows = [line for line in text.splitlines() if line.startswith("| val |")]
    assert len(rows) == 2 and all(row.endswith(" |") for row in rows)


# Memory that grows with the square of the class count.
def test_plots_stay_bounded_at_500_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 500
    cm = rng.integers(0, 3, (n, n))
    names = [f"class {i}" for i in range(n)]
    start = time.perf_counter()
    plots.confusion_png(cm, names, tmp_path / "cm.png", "test")
    plots.f1_bars(rng.random(n), rng.random(n), names, tmp_path / "f1.png", "f1")
    assert time.perf_counter() - start < 20  # was 103 s and 19.4 GB for the confusion matrix alone
    for name in ("cm.png", "f1.png"):
        with Image.open(tmp_path / name) as img:
            assert max(img.size) < 3000, (name, img.size)
    keep = plots.most_confused(cm)
    errors = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    assert len(keep) == plots.MAX_PLOTTED and errors[keep].min() >= np.delete(errors, keep).max()
