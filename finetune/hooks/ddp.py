"""DDP as a hook: the loop's forward wrapped in ``DistributedDataParallel``, rebuilt on an explicit signal."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.distributed import Dist
from finetune.train.loop import Hook, Loop


class _Forward(nn.Module):
    """A module whose forward is the loop's forward (so DDP wraps exactly what the step runs)."""

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fn(x)


class DDPHook(Hook):
    """Wraps the loop's forward in DDP each epoch; rebuilt when a hook signals a change (``loop.changes``).

    DDP registers gradient hooks for the parameters that require grad when it is built, so a new stage or a new
    forward needs a new wrapper. It must come after the hooks that choose ``loop.forward`` (freezing): it wraps what
    they chose (the assembly checks the order).
    """

    def __init__(self, d: Dist) -> None:
        self.d = d
        self._key: int | None = None
        self._ddp: DistributedDataParallel | None = None
        self._steps_left = 0
        self._device = torch.device("cpu")

    def on_epoch_start(self, loop: Loop) -> None:  # noqa: D102
        fn = loop.forward or loop.model
        if self._key != loop.changes or self._ddp is None:
            self._key = loop.changes
            device_ids = [self.d.local_rank] if loop.settings.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(_Forward(loop.model, fn), device_ids=device_ids)
        loop.forward = self._ddp
        # Less the batches a mid-epoch checkpoint had done (the loop skips them after this hook): the broadcast of BN
        # buffers must still come after the epoch's last step.
        done = loop.state.batch
        self._steps_left = math.ceil((len(loop.loader or loop.train_loader) - done) / loop.settings.accum_steps)

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        self._device, loop.agree, loop.share, loop.rank = loop.settings.device, self.agree, self.share, self.d.rank

    def share(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` in rank order (a mid-epoch checkpoint keeps each rank's running loss)."""
        parts: list[Any] = [None] * self.d.world
        dist.all_gather_object(parts, values)
        return parts

    def agree(
        self, inputs: torch.Tensor | None, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every rank steps together: ``(None, None)`` on all when no rank has a readable image in this step.

        A rank whose whole share is unreadable (``on_bad_image = "skip"``) steps on an empty batch of the others'
        shape, so DDP's gradient all-reduce still has every rank (it would wait for this one for ever otherwise). One
        two-number all-reduce per step; the shapes are gathered only in a step that needs them.
        """
        device = self._device
        counts = torch.tensor([0 if inputs is None else len(inputs), int(inputs is None)], device=device)
        dist.all_reduce(counts)
        if counts[0] == 0:
            return None, None
        if counts[1] == 0:
            return inputs, targets
        mine = None if inputs is None or targets is None else (inputs.shape[1:], inputs.dtype, targets.shape[1:])
        shapes: list[Any] = [None] * self.d.world
        dist.all_gather_object(shapes, mine)
        if mine is not None:
            return inputs, targets
        shape, dtype, target_shape = next(s for s in shapes if s is not None)
        return torch.zeros((0, *shape), dtype=dtype, device=device), torch.zeros((0, *target_shape), device=device)

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        """The epoch's train loss over every rank (each measured its shard) and the job's images/s."""
        t = torch.tensor([record["train_loss"], record["images_per_s"]], device=loop.settings.device)
        dist.all_reduce(t)  # on the device: NCCL has no CPU tensors
        record["train_loss"], record["images_per_s"] = float(t[0]) / self.d.world, float(t[1])

    def on_step_end(self, loop: Loop) -> None:
        """After the epoch's last step, rank 0's buffers (BN running statistics) on every rank.

        Validation then scores one model. DDP itself broadcasts them before every training forward, so earlier steps
        need nothing.
        """
        self._steps_left -= 1
        if self._steps_left == 0:
            for buffer in loop.model.buffers():
                dist.broadcast(buffer, src=0)

    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        self._ddp, self._key, loop.agree, loop.share = None, None, None, None
