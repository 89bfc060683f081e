"""An exponential moving average of the weights, as a hook: updated after every optimizer step, evaluated and selected.

The update is the usual one, the step timm's ``ModelEmaV3`` takes: ``ema = decay * ema + (1 - decay) * weights`` for
every floating-point parameter, with buffers (BatchNorm statistics) copied. The warmup is not timm's: with
``ema_warmup`` the decay at update ``t`` (0-based) is ``min(decay, (1 + t) / (10 + t))`` (TensorFlow's
``ExponentialMovingAverage(num_updates=...)`` rule), so early averages are not dominated by the random start;
``ModelEmaV3`` instead warms up with ``1 - (1 + t / gamma) ** -power``. Validation, best-checkpoint selection and
everything after training use the averaged weights; ``best.pt`` keeps them under ``eval_model`` and ``last.pt`` keeps
the average in the hook's state, so a resumed run continues bitwise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from finetune.train.loop import Hook, Loop


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay used at update number ``updates`` (0-based)."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def detached_copy(model: nn.Module, make: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode whose parameters require no gradient.

    ``make`` builds an empty model of the same architecture (the assembly passes one), into which the weights are
    loaded: the copy then carries none of the original's module hooks (the freeze policy's). Without it, a deep copy,
    as timm's ``ModelEmaV3`` makes; nothing of torch's private state is touched either way.
    """
    if make is None:
        twin = copy.deepcopy(model)
    else:
        twin = make()
        twin.load_state_dict(model.state_dict())
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


class EmaHook(Hook):
    """Keeps an EMA of ``loop.model`` and makes it the model that is validated and selected.

    Args:
        decay: The EMA decay (e.g. 0.999).
        warmup: Ramp the decay up over the first updates.
        make: Builds an empty model of the tracked one's architecture, on its device (see :func:`detached_copy`).
    """

    def __init__(self, decay: float, warmup: bool = True, make: Callable[[], nn.Module] | None = None) -> None:
        self.decay, self.warmup, self.make = decay, warmup, make
        self.updates = 0
        self.model: nn.Module | None = None
        self._pending: dict[str, Any] | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (ema tensor, model tensor, averaged?)

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        self.track(loop.model)
        loop.eval_model = self.model

    def track(self, model: nn.Module) -> None:
        """Start averaging ``model``: copy it (or take the average restored from a checkpoint) and pair the tensors."""
        self.model = detached_copy(model, self.make)
        if self._pending is not None:
            self.model.load_state_dict(self._pending)
            self._pending = None
        params = {n for n, _ in self.model.named_parameters()}
        ema_state = self.model.state_dict()  # the same storage as the copy's tensors: updated in place
        self._pairs = [(ema_state[n], t, t.is_floating_point() and n in params) for n, t in model.state_dict().items()]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step toward the tracked model's current weights (parameters averaged, buffers copied)."""
        d = ema_decay(self.decay, self.updates, self.warmup)
        for target, value, averaged in self._pairs:
            if averaged:
                target.lerp_(value, 1.0 - d)
            else:
                target.copy_(value)
        self.updates += 1

    def on_step_end(self, loop: Loop) -> None:  # noqa: D102
        self.update()

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        record["ema_decay"] = ema_decay(self.decay, max(self.updates - 1, 0), self.warmup)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"updates": self.updates, "weights": self.model.state_dict() if self.model is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.updates = state["updates"]
        if self.model is None:
            self._pending = state["weights"]
        else:
            self.model.load_state_dict(state["weights"])
