"""Tasks: what differs between multi-label and single-label runs, in one place.

A :class:`Task` owns the activation (sigmoid or softmax), the losses and selection metrics it accepts, the metrics
logged every epoch, the per-split report (building, printing, plots) and how a probability row becomes labels.
Nothing else in the package asks which kind of run it is: it asks the run's task. Data formats map to tasks in
:data:`TASK_OF_FORMAT`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from finetune.data.coco import ClassMap
from finetune.errors import UserError
from finetune.labels import label_indices


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
        """The convex loss a linear head is solved for (summed over classes, mean over samples)."""
        raise NotImplementedError

    def labels(self, probs: np.ndarray, thresholds: float | np.ndarray) -> list[list[int]]:
        """Predicted class indices per row of ``probs``, most probable first."""
        raise NotImplementedError

    def split_report(
        self, targets: np.ndarray, probs: np.ndarray, classes: ClassMap, threshold: float, calibrated: Any = None
    ) -> dict[str, Any]:
        """Summary and per-class numbers of one split."""
        raise NotImplementedError

    def print_report(self, report: dict[str, Any], console: Console) -> None:
        """The report's tables on the console."""
        raise NotImplementedError

    def write_extras(self, report: dict[str, Any], classes: ClassMap, run_dir: Path) -> None:
        """Task-specific files beside ``report.json`` (plots, Markdown)."""

    def threshold_note(self, how: str) -> str:
        """How labels are chosen, for a prediction's output."""
        return how

    def check_recipe(self, loss: str, select: str, fmt: str, source: str) -> None:
        """Cross-section rules as one-line user errors."""
        if loss not in self.losses:
            raise UserError(self._loss_message(loss, fmt, source))
        if select != "auto" and select not in self.selects:
            raise UserError(f"{source}: train.select: {self._select_message(select)}")

    def _loss_message(self, loss: str, fmt: str, source: str) -> str:
        return f"{source}: loss.name: use one of {', '.join(self.losses)}"

    def _select_message(self, select: str) -> str:
        return f"{self.name.replace('_', '-')} runs select by " + ", ".join(f'"{s}"' for s in self.selects)

    def select(self, select: str) -> str:
        """The selection metric: the recipe's, or the task's default for ``auto``."""
        return self.default_select if select == "auto" else select


class MultiLabel(Task):
    """Several labels per image: sigmoid, mAP and F1 at a threshold, per-class calibrated thresholds."""

    name = "multi_label"
    losses = ("bce", "focal", "asl")
    selects = ("map", "macro_f1", "micro_f1", "loss")
    default_select = "map"
    calibrates = True

    def activation(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.sigmoid(logits)

    def head_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # One logistic regression per class, as scikit-learn's LogisticRegression fits them one by one.
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(logits)

    def metrics(self, targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:  # noqa: D102
        from finetune.metrics import summarize

        return summarize(targets, probs, threshold)

    def labels(self, probs: np.ndarray, thresholds: float | np.ndarray) -> list[list[int]]:  # noqa: D102
        return label_indices(probs, True, thresholds)

    def split_report(  # noqa: D102
        self, targets: np.ndarray, probs: np.ndarray, classes: ClassMap, threshold: float, calibrated: Any = None
    ) -> dict[str, Any]:
        from finetune.report import split_report

        return split_report(targets, probs, classes, threshold, calibrated)

    def print_report(self, report: dict[str, Any], console: Console) -> None:  # noqa: D102
        from finetune.report import print_report

        print_report(report, console)

    def write_extras(self, report: dict[str, Any], classes: ClassMap, run_dir: Path) -> None:  # noqa: D102
        from finetune.checkpoint import atomic_write_text
        from finetune.report import markdown_report

        atomic_write_text(run_dir / "report.md", markdown_report(report))

    def _loss_message(self, loss: str, fmt: str, source: str) -> str:
        if loss == "ce":
            return (
                f'{source}: loss.name: "ce" is for single-label data; {fmt.upper()} is multi-label: use "bce", '
                '"focal" or "asl"'
            )
        return super()._loss_message(loss, fmt, source)

    def _select_message(self, select: str) -> str:
        return f'"{select}" is for single-label data' if select == "top1" else super()._select_message(select)


class SingleLabel(Task):
    """One label per image: softmax, top-1/top-5, per-class recall and a confusion matrix; the arg-max is the label."""

    name = "single_label"
    losses = ("ce",)
    selects = ("top1", "map", "loss")
    default_select = "top1"

    def activation(self, logits: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.softmax(logits, 1)

    def head_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.cross_entropy(logits, targets)  # multinomial logistic regression

    def metrics(self, targets: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:  # noqa: D102
        from finetune.metrics import summarize_single

        return summarize_single(targets, probs)

    def labels(self, probs: np.ndarray, thresholds: float | np.ndarray) -> list[list[int]]:  # noqa: D102
        return label_indices(probs, False, thresholds)

    def split_report(  # noqa: D102
        self, targets: np.ndarray, probs: np.ndarray, classes: ClassMap, threshold: float, calibrated: Any = None
    ) -> dict[str, Any]:
        from finetune.report import single_label_report

        return single_label_report(targets, probs, classes)

    def print_report(self, report: dict[str, Any], console: Console) -> None:  # noqa: D102
        from finetune.report import print_single_report

        print_single_report(report, console)

    def write_extras(self, report: dict[str, Any], classes: ClassMap, run_dir: Path) -> None:  # noqa: D102
        from finetune import plots

        shown = "test" if "test" in report["splits"] else next(iter(report["splits"]))
        cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
        for t, p, count in report["splits"][shown]["confusion"]:
            cm[t, p] = count
        plots.confusion_png(cm, list(classes.names), run_dir / "confusion_matrix.png", f"{shown}: confusion matrix")

    def threshold_note(self, how: str) -> str:  # noqa: D102
        return "the highest-scoring class (single-label)"

    def _loss_message(self, loss: str, fmt: str, source: str) -> str:
        return f'{source}: loss.name: data.format = "{fmt}" is single-label; use "ce"'

    def _select_message(self, select: str) -> str:
        return 'single-label runs select by "top1", "map" or "loss"'


MULTI_LABEL, SINGLE_LABEL = MultiLabel(), SingleLabel()
TASKS = {t.name: t for t in (MULTI_LABEL, SINGLE_LABEL)}
TASK_OF_FORMAT = {"coco": MULTI_LABEL, "csv": MULTI_LABEL, "folder": SINGLE_LABEL, "cifar10": SINGLE_LABEL}


def task_for(fmt: str) -> Task:
    """The task of a data format (``coco`` -> multi-label, ``folder``/``cifar10`` -> single-label)."""
    return TASK_OF_FORMAT[fmt]
