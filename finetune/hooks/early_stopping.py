"""Early stopping as a hook: stop when the selected validation metric has stopped improving."""

from __future__ import annotations

from typing import Any

from finetune.train.loop import Hook, Loop


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
