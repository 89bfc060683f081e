"""Quantization-aware training in the loop: the rounding simulated from the first step, taken out at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from finetune.train.loop import Hook, Loop
from finetune.train.qat import QuantSim


class QatHook(Hook):
    """Attaches :class:`~finetune.train.qat.QuantSim` to the trained model; checkpoints its activation ranges.

    The activation ranges are the float network's min/max over ``batches`` (unaugmented train images), what the INT8
    exports calibrate: set at the start, and again after every epoch for the next one (the weights have moved), so
    training always rounds with the ranges an export of the current weights would take. A checkpoint keeps them, so
    a resumed run continues with the ranges it stopped with. At the end the simulation is taken out: the run's
    report, exports and checkpoints see the plain network with the weights QAT trained.

    Args:
        sim: Builds the simulation (traced once; the assembly shares it with the EMA's copy).
        batches: The calibration images, normalised, on the device.
    """

    state_key = "qat"

    def __init__(self, sim: Callable[[], QuantSim], batches: Callable[[], Iterable[torch.Tensor]]) -> None:
        self.sim, self.batches = sim, batches
        self._restored: dict[str, Any] | None = None

    def on_fit_start(self, loop: Loop) -> None:
        """Attach the simulation; set the activation ranges (calibrated, or the checkpoint's)."""
        sim, model = self.sim(), loop.model
        if self._restored is not None:
            sim.attach(model)
            sim.quantizers.load_state_dict(self._restored)
            return
        seen = sim.calibrate(model, self.batches())  # the float network's ranges, as the INT8 exports calibrate
        sim.attach(model)
        if loop.is_main:
            loop.console.print(
                f"quantization-aware training: {len(sim.folds)} convolutions with BatchNorm folded, "
                f"{len(sim.weights)} other weights, {len(sim.quantizers)} activations rounded (uint8 ranges from "
                f"{seen} train images)"
            )

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        """The next epoch's ranges, from the float network as it is now (before the checkpoint keeps them)."""
        sim, model = self.sim(), loop.model
        QuantSim.detach(model)
        sim.calibrate(model, self.batches())
        sim.attach(model)

    def on_fit_end(self, loop: Loop) -> None:
        """Take the simulation out of the trained model."""
        QuantSim.detach(loop.model)

    def state_dict(self) -> dict[str, Any]:
        """The activation quantizers' ranges."""
        return {"quantizers": self.sim().quantizers.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep the ranges for :meth:`on_fit_start`."""
        self._restored = state["quantizers"]
