"""What the training loop and its hooks share: the settings, the run's state, the :class:`Loop` and :class:`Hook`.

A hook is an object with up to five methods, called in list order (loggers go last, so they see what earlier hooks
added to the record):

- ``on_fit_start(loop)``: once, before the first epoch this process trains (also after a resume);
- ``on_epoch_start(loop)``: may swap ``loop.loader`` and ``loop.forward`` for this epoch (the freezing hook does);
- ``on_step_end(loop)``: after every optimizer step;
- ``on_epoch_end(loop, record)``: after validation, with the epoch's record; may add keys or set
  ``loop.state.stop_reason``; runs before the checkpoint is written;
- ``on_fit_end(loop)``: once, when training ends (normally or not).

A hook with state returns it from ``state_dict()``; it is saved in every checkpoint and handed back to
``load_state_dict()`` on resume, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from finetune.tasks import MULTI_LABEL, Task


@dataclass(kw_only=True)
class EvalSettings:
    """How batches are run through a model."""

    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16, already resolved
    channels_last: bool = False
    on_bad_image: str = "skip"  # skip | error
    task: Task = MULTI_LABEL
    tta: str = "none"  # "hflip": logits averaged over the image and its mirror


@dataclass(kw_only=True)
class FitSettings(EvalSettings):
    """Plain settings for :func:`finetune.trainer.fit`."""

    epochs: int
    accum_steps: int = 1
    grad_clip: float = 0.0
    threshold: float = 0.5
    select: str = "map"  # a key of the task's metrics, or "loss"
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    seed: int = 0  # seeds mixup's draws with (seed, epoch, batch)


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_score: float | None = None
    best_epoch: int = -1
    bad_images: list[str] = field(default_factory=list)
    stop_reason: str = ""  # set by a hook (early stopping): the loop trains no further epoch


@dataclass(kw_only=True)
class Loop:
    """Everything one training run works on; hooks read it and may change ``loader``, ``forward`` and ``state``."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    settings: FitSettings
    run_dir: Path
    state: TrainState = field(default_factory=TrainState)
    console: Console = field(default_factory=lambda: Console(stderr=True))
    epoch: int = 0  # the 0-based epoch in progress
    loader: torch.utils.data.DataLoader | None = None  # this epoch's training batches
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # this epoch's forward
    eval_model: nn.Module | None = None  # what is validated and selected (an EMA hook sets its average); None = model
    gather: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # joins the ranks' val predictions (DDP)
    is_main: bool = True  # the process that writes checkpoints (rank 0 under DDP)


class Hook:
    """Base class: every event does nothing; override the ones you need."""

    def on_fit_start(self, loop: Loop) -> None:
        """Before the first epoch this process trains."""

    def on_epoch_start(self, loop: Loop) -> None:
        """Before an epoch's first batch; may set ``loop.loader`` / ``loop.forward``."""

    def on_step_end(self, loop: Loop) -> None:
        """After every optimizer step."""

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        """After validation, before the checkpoint; may add to ``record``."""

    def on_fit_end(self, loop: Loop) -> None:
        """When training ends, normally or not."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (empty: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def hook_key(hook: Hook) -> str:
    """The name a hook's state is saved under in a checkpoint."""
    return type(hook).__name__


class EarlyStopping(Hook):
    """Stop when the selected validation metric has not improved for ``patience`` epochs.

    The decision reads only the saved :class:`TrainState` (``epoch``, ``best_epoch``), so it is exact on resume.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        s = loop.state
        if self.patience and s.epoch < loop.settings.epochs and s.epoch - s.best_epoch >= self.patience:
            s.stop_reason = (
                f"early stopping after epoch {s.epoch}: val {loop.settings.select} has not improved for "
                f"{self.patience} epochs (best epoch {s.best_epoch})"
            )
            record["stop_reason"] = s.stop_reason
