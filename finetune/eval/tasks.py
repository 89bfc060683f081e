"""Tasks: what differs between multi-label and single-label runs, in one place.

A :class:`Task` owns the activation (sigmoid or softmax), the losses and selection metrics it accepts, the metrics
logged every epoch, the per-split report (building, printing, plots) and how a probability row becomes labels. Which
losses and selection metrics a task accepts is a recipe rule, kept (torch-free) in :mod:`finetune.config.rules`.
Nothing else in the package asks which kind of run it is: it asks the run's task. Data formats map to tasks in
:func:`task_for` (``data.format``, or ``data.task`` for CSV and imagefolder data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from finetune import runfiles
from finetune.config.rules import LOSSES, SELECTS, task_name
from finetune.data.split import ClassMap
from finetune.eval.run_report import RunReport
from finetune.labels import label_indices
from finetune.predictions import Predictions


class Task:
    """The base: subclasses fill in every method."""

    name = ""
    losses: tuple[str, ...] = ()
    selects: tuple[str, ...] = ()
    default_select = "map"
    calibrates = False  # per-class decision thresholds are fitted after training

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits (``[n, classes]``)."""
        raise NotImplementedError

    def metrics(self, targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
        """Per-epoch validation metrics."""
        raise NotImplementedError

    def head_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The convex loss a linear head is solved for (summed over classes, mean over samples).

        Multi-label: each class's mean is over the samples where its label is known (not NaN).
        """
        raise NotImplementedError

    def labels(self, probs: np.ndarray, thresholds: float | np.ndarray) -> list[list[int]]:
        """Predicted class indices per row of ``probs``, most probable first."""
        raise NotImplementedError

    def split_report(
        self, targets: np.ndarray, probs: np.ndarray, classes: ClassMap, threshold: float, calibrated: Any = None
    ) -> dict[str, Any]:
        """Summary and per-class numbers of one split."""
        raise NotImplementedError

    def print_report(self, report: RunReport, console: Console) -> None:
        """The report's tables on the console."""
        raise NotImplementedError

    def write_extras(self, report: RunReport, classes: ClassMap, run_dir: Path) -> None:
        """Task-specific files beside ``report.json`` (plots, Markdown)."""

    def report_extras(self, outs: dict[str, Predictions]) -> dict[str, Any]:
        """Numbers a training run's report adds for this task (none by default)."""
        return {}

    def threshold_note(self, how: str) -> str:
        """How labels are chosen, for a prediction's output."""
        return how

    def select(self, select: str) -> str:
        """The selection metric: the recipe's, or the task's default for ``auto``."""
        return self.default_select if select == "auto" else select


class MultiLabel(Task):
    """Several labels per image: sigmoid, mAP and F1 at a threshold, per-class calibrated thresholds."""

    name = "multi_label"
    losses = LOSSES["multi_label"]
    selects = SELECTS["multi_label"]
    default_select = "map"
    calibrates = True

    def activation(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.sigmoid(logits)

    def head_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # One logistic regression per class, as scikit-learn's LogisticRegression fits them one by one, each on the
        # samples where the class is known.
        known = ~torch.isnan(targets)
        t = torch.where(known, targets, torch.zeros_like(targets))
        loss = F.binary_cross_entropy_with_logits(logits, t, reduction="none") * known
        return (loss.sum(0) / known.sum(0).clamp(min=1)).sum()

    def metrics(self, targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:  # noqa: D102
        from finetune.eval.metrics import summarize

        return summarize(targets, probs, threshold)

    def labels(self, probs: np.ndarray, thresholds: float | np.ndarray) -> list[list[int]]:  # noqa: D102
        return label_indices(probs, True, thresholds)

    def split_report(  # noqa: D102
        self, targets: np.ndarray, probs: np.ndarray, classes: ClassMap, threshold: float, calibrated: Any = None
    ) -> dict[str, Any]:
        from finetune.eval.tables import split_report

        return split_report(targets, probs, classes, threshold, calibrated)

    def print_report(self, report: RunReport, console: Console) -> None:  # noqa: D102
        from finetune.eval.tables import print_report

        print_report(report, console)
        for role, value in report.voc07_map.items():
            console.print(f"{role}: VOC07 mAP (11-point interpolated) {100 * value:.1f}")

    def write_extras(self, report: RunReport, classes: ClassMap, run_dir: Path) -> None:  # noqa: D102
        from finetune.eval.tables import markdown_report
        from finetune.io import atomic_write_text

        atomic_write_text(run_dir / runfiles.REPORT_MD, markdown_report(report))


class VocMultiLabel(MultiLabel):
    """PASCAL VOC: multi-label, and its report also gives VOC07's own 11-point interpolated mAP per split."""

    def report_extras(self, outs: dict[str, Predictions]) -> dict[str, Any]:  # noqa: D102
        from finetune.eval.metrics import voc_ap

        aps = {r: voc_ap(o.targets, o.probs) for r, o in outs.items() if r != "train"}
        return {"voc07_map": {r: float(np.nanmean(ap)) for r, ap in aps.items() if np.isfinite(ap).any()}}


class SingleLabel(Task):
    """One label per image: softmax, top-1/top-5, per-class recall and a confusion matrix; the arg-max is the label."""

    name = "single_label"
    losses = LOSSES["single_label"]
    selects = SELECTS["single_label"]
    default_select = "top1"

    def activation(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.softmax(logits, 1)

    def head_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.cross_entropy(logits, targets)  # multinomial logistic regression

    def metrics(self, targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:  # noqa: D102
        from finetune.eval.metrics import summarize_single

        return summarize_single(targets, probs)

    def labels(self, probs: np.ndarray, thresholds: float | np.ndarray) -> list[list[int]]:  # noqa: D102
        return label_indices(probs, False, thresholds)

    def split_report(  # noqa: D102
        self, targets: np.ndarray, probs: np.ndarray, classes: ClassMap, threshold: float, calibrated: Any = None
    ) -> dict[str, Any]:
        from finetune.eval.tables import single_label_report

        return single_label_report(targets, probs, classes)

    def print_report(self, report: RunReport, console: Console) -> None:  # noqa: D102
        from finetune.eval.tables import print_single_report

        print_single_report(report, console)

    def write_extras(self, report: RunReport, classes: ClassMap, run_dir: Path) -> None:  # noqa: D102
        from finetune.eval import plots

        shown = report.shown_split
        cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for t, p, count in report.splits[shown].confusion:
            cm[t, p] = count
        plots.confusion_png(cm, list(classes.names), run_dir / runfiles.CONFUSION, f"{shown}: confusion matrix")
        if report.reject:
            plots.coverage_accuracy_png(report.reject, run_dir / runfiles.COVERAGE)

    def threshold_note(self, how: str) -> str:  # noqa: D102
        return "the highest-scoring class (single-label)"


MULTI_LABEL, SINGLE_LABEL = MultiLabel(), SingleLabel()
TASKS = {t.name: t for t in (MULTI_LABEL, SINGLE_LABEL)}


VOC_MULTI_LABEL = VocMultiLabel()


def task_for(fmt: str, task: str = "auto") -> Task:
    """The task of ``data.format`` (``coco``: multi-label, ``folder``/``cifar10``: single-label) or ``data.task``."""
    return VOC_MULTI_LABEL if fmt == "voc" else TASKS[task_name(fmt, task)]
