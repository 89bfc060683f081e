"""What the training loop and its hooks share: the settings, the run's state, the :class:`Loop` and :class:`Hook`.

A hook is an object with up to five methods, called in list order (loggers go last, so they see what earlier hooks
added to the record):

- ``on_fit_start(loop)``: once, before the first epoch this process trains (also after a resume);
- ``on_epoch_start(loop)``: may swap ``loop.loader``, ``loop.inputs`` and ``loop.forward`` for this epoch (the
  freezing hook does); a hook that changes which parameters train or what ``loop.forward`` computes bumps
  ``loop.changes``, the explicit signal that a wrapper of the forward (DDP) must be rebuilt;
- ``on_step_end(loop)``: after every optimizer step;
- ``on_epoch_end(loop, record)``: after validation, with the epoch's record; may add keys or set
  ``loop.state.stop_reason``; runs before the checkpoint is written;
- ``on_fit_end(loop)``: once, when training ends (normally or not).

A hook with state returns it from ``state_dict()``; it is saved in every checkpoint under :func:`hook_key` and handed
back to ``load_state_dict()`` on resume, so a resumed run continues exactly.

Where order matters (DDP wraps the forward that freezing chose; EMA copies the classifier the probe solved; loggers
see every other hook's keys), the assembly states the rule and checks it: :func:`check_order`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from finetune.eval.predict import EvalSettings


@dataclass(kw_only=True)
class FitSettings(EvalSettings):
    """Plain settings for :func:`finetune.train.fit.fit`."""

    epochs: int
    accum_steps: int = 1
    grad_clip: float = 0.0
    threshold: float = 0.5
    select: str = "map"  # a key of the task's metrics, or "loss"
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of cutmix; 0 = off (multi-label: labels by box area, batch["boxes"])
    seed: int = 0  # seeds mixup's and cutmix's draws with (seed, epoch, batch)
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints (RUN/steps/); 0 = epoch ends only
    progress_every: float = 60.0  # output that is not a terminal (a log): a progress line every this many seconds
    progress_steps: int = 0  # ... and every this many batches; 0 = by time only


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_score: float | None = None
    best_epoch: int = -1
    bad_images: list[str] = field(default_factory=list)
    stop_reason: str = ""  # set by a hook (early stopping): the loop trains no further epoch
    batch: int = 0  # batches of epoch ``epoch + 1`` done (a mid-epoch checkpoint); 0 at an epoch's end
    partial: dict[str, Any] = field(default_factory=dict)  # that epoch's loss sum, images, seconds (each rank's) so far


@dataclass(kw_only=True)
class Loop:
    """Everything one training run works on; hooks read it and may set its epoch's ``loader``, ``inputs``, ``forward``.

    ``changes`` is the explicit signal a hook gives when it changes the trainable set or the forward.
    """

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
    inputs: Callable[[dict[str, Any]], torch.Tensor | None] | None = None  # a batch's inputs (None = images)
    changes: int = 0  # bumped by a hook that changes the trainable set or the forward (DDP rebuilds on it)
    eval_model: nn.Module | None = None  # what is validated and selected (an EMA hook sets its average); None = model
    gather: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # joins the ranks' val predictions (DDP)
    is_main: bool = True  # the process that writes checkpoints (rank 0 under DDP)
    # DDP: (inputs, targets) of this rank's step -> what it steps on; (None, None) when no rank has a readable image
    agree: Callable[[Any, Any], tuple[Any, Any]] | None = None
    share: Callable[[list[float]], list[list[float]]] | None = None  # DDP: every rank's values, in rank order
    rank: int = 0  # this process's rank (DDP)
    resume_rng: dict[str, Any] | None = None  # a mid-epoch checkpoint's RNG, set again once the epoch's batches start


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
    """The name a hook's state is saved under in a checkpoint (its class's ``state_key``, else its class name)."""
    return getattr(type(hook), "state_key", type(hook).__name__)


def check_order(hooks: list[Hook], rules: list[tuple[type, type, str]]) -> None:
    """Raise ``ValueError`` when a hook of type ``a`` comes after one of type ``b`` for a rule ``(a, b, why)``."""
    for a, b, why in rules:
        first_b = next((i for i, h in enumerate(hooks) if isinstance(h, b)), None)
        last_a = max((i for i, h in enumerate(hooks) if isinstance(h, a)), default=None)
        if first_b is not None and last_a is not None and last_a > first_b:
            raise ValueError(f"hook order: {a.__name__} must come before {b.__name__} ({why})")
