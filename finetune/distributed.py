"""Data-parallel training through ``torchrun``: process group, sharded sampling, gathered evaluation, DDP per stage.

``torchrun --nproc_per_node N -m finetune run RECIPE`` starts N processes; each reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from its environment (:func:`setup`). Nothing here launches processes.

- **Sampling.** Every rank draws the same seeded (seed, epoch) permutation and takes every ``world``-th index from
  its rank on (:class:`ShardSampler`). With ``data.batch_size`` the *global* batch and ``batch_size / world`` per
  rank, step ``i`` of the ranks together sees exactly the images step ``i`` of one process sees, so a DDP run
  follows the single-process run (and resumes exactly).
- **Evaluation.** Each rank predicts its shard (no padding duplicates); :func:`gather` joins them in dataset order.
- **Stages.** DDP registers gradient hooks for the parameters that require grad when it is built, so
  :class:`DDPHook` rebuilds the wrapper whenever the trainable set or the forward changes (a stage boundary, the
  switch to cached features). The wrapped module's ``forward`` is the loop's forward: the frozen prefix runs under
  ``no_grad`` inside it.
- **BatchNorm.** ``train.sync_bn`` uses timm's ``SyncBatchNorm`` conversion on CUDA; on the CPU, where torch's
  refuses to run, :func:`convert_sync_bn` gives the same modules a forward that all-reduces the batch statistics
  with autograd, on a process group of their own.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from finetune.loop import Hook, Loop


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and prints."""
        return self.rank == 0


def setup(device_type: str = "cpu") -> Dist:
    """Join the process group torchrun describes in the environment (gloo on the CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, world, local)


def teardown() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _BN_GROUP[0] = None


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op in one process)."""
    if d.enabled:
        dist.barrier()


def gather_list(items: list[Any], d: Dist) -> list[Any]:
    """Every rank's ``items`` joined (in rank order, without repeats)."""
    if not d.enabled:
        return items
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, items)
    return list(dict.fromkeys(x for part in parts for x in part))


class ShardSampler(torch.utils.data.Sampler[int]):
    """Rank ``rank``'s share of a dataset: every ``world``-th index of the (seed, epoch) permutation, or of 0..n-1.

    Args:
        n: Dataset size.
        seed: Seed of the permutation (the same on every rank).
        rank: This rank.
        world: Number of ranks.
        shuffle: Permute per epoch (training) or keep dataset order (evaluation, feature extraction).
        pad: Equal counts on every rank (training): with ``batch`` (the global batch) and more than one batch of
            images, the permutation is cut to whole global batches, as one process's ``drop_last`` cuts it, so every
            rank takes exactly one process's number of steps; otherwise leading indices are repeated.
        batch: The global batch size (training).
    """

    def __init__(
        self, n: int, seed: int, rank: int, world: int, shuffle: bool = True, pad: bool = True, batch: int = 0
    ) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle, self.pad = n, seed, rank, world, shuffle, pad
        self.batch = batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch``."""
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.n))
        else:  # exactly the single-process EpochSampler's permutation
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        if self.pad and self.batch and self.n > self.batch:
            order = order[: self.n // self.batch * self.batch]
        elif self.pad and self.n % self.world:
            order = (order * self.world)[: self.n + self.world - self.n % self.world]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self._order())


def gather(out: dict[str, Any], d: Dist) -> dict[str, Any]:
    """Join every rank's predictions (``targets``, ``probs``, ``index`` arrays; ``loss``) in dataset order."""
    if not d.enabled:
        return out
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, out)
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index, kind="stable")
    keep = order[np.r_[True, np.diff(index[order]) != 0]]  # one row per image, whatever a sampler padded
    joined = {k: np.concatenate([p[k] for p in parts])[keep] for k in ("targets", "probs", "index")}
    if "loss" in out:
        sizes = [len(p["index"]) for p in parts]
        joined["loss"] = float(sum(p["loss"] * s for p, s in zip(parts, sizes)) / max(sum(sizes), 1))
    return joined


def gather_features(feats: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, d: Dist) -> tuple[Any, Any]:
    """Every rank's cached features joined in dataset order (each rank extracted its own shard)."""
    if not d.enabled:
        return feats, targets
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, (feats.cpu(), targets.cpu(), index.cpu()))
    f, t, i = (torch.cat([p[k] for p in parts]) for k in range(3))
    order = torch.argsort(i, stable=True)
    return f[order].to(feats.device), t[order].to(targets.device)


class _Forward(nn.Module):
    """A module whose forward is the loop's forward (so DDP wraps exactly what the step runs)."""

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.fn(x)


class DDPHook(Hook):
    """Wraps the loop's forward in DDP each epoch; rebuilt when the trainable parameters or the forward change.

    It must come after the hooks that choose ``loop.forward`` (freezing): it wraps what they chose.
    """

    def __init__(self, d: Dist) -> None:
        self.d = d
        self._key: tuple | None = None
        self._ddp: DistributedDataParallel | None = None
        self._steps_left = 0

    def on_epoch_start(self, loop: Loop) -> None:  # noqa: D102
        fn = loop.forward or loop.model
        trainable = tuple(n for n, p in loop.model.named_parameters() if p.requires_grad)
        key = (trainable, getattr(fn, "__name__", type(fn).__name__))
        if key != self._key:
            self._key = key
            device_ids = [self.d.local_rank] if loop.settings.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(_Forward(loop.model, fn), device_ids=device_ids)
        loop.forward = self._ddp
        self._steps_left = math.ceil(len(loop.loader or loop.train_loader) / loop.settings.accum_steps)

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
        self._ddp, self._key = None, None


def _global_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of ``x`` with statistics over every rank's batch (all-reduced with autograd)."""
    from torch.distributed.nn.functional import all_reduce as reduce_with_grad

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated, but the one all-reduce with autograd
            return reduce_with_grad(t, group=_BN_GROUP[0])

    c = x.shape[1]
    stats = all_reduce(torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() / c)]))
    n = stats[-1]
    mean = stats[:c] / n
    centred = x - mean.view(1, c, 1, 1)
    var = all_reduce((centred * centred).sum((0, 2, 3))) / n  # two passes: no cancellation in E[x^2] - E[x]^2
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
    y = centred * torch.rsqrt(var.view(1, c, 1, 1) + bn.eps)
    return y * bn.weight.view(1, c, 1, 1) + bn.bias.view(1, c, 1, 1) if bn.affine else y


_SYNC_CLASSES: dict[type, type] = {}
# BN statistics get their own process group: on the default one, their all-reduces in the backward pass would
# interleave with DDP's asynchronous gradient all-reduces in a different order on each rank, and pair up wrongly.
_BN_GROUP: list[Any] = [None]


def _sync_class(base: type) -> type:
    """``base`` (BatchNorm2d, or timm's BatchNormAct2d with its activation) with globally synchronised statistics."""
    if base not in _SYNC_CLASSES:

        def forward(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
            if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
                return base.forward(self, x)
            y = _global_batch_norm(self, x)
            if hasattr(self, "act"):  # timm's BatchNormAct2d: norm, then drop and act
                y = self.act(self.drop(y))
            return y

        _SYNC_CLASSES[base] = type(f"CpuSync{base.__name__}", (base,), {"forward": forward})
    return _SYNC_CLASSES[base]


def convert_sync_bn(model: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm2d made synchronous across ranks (timm's SyncBatchNorm on CUDA; on the CPU, see below).

    On the CPU, where torch's SyncBatchNorm refuses to run, the same modules (weights, buffers, identity) get a
    forward that all-reduces the batch statistics.
    """
    if device_type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)
    if dist.is_initialized() and _BN_GROUP[0] is None:
        _BN_GROUP[0] = dist.new_group(backend="gloo")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and type(module) not in _SYNC_CLASSES.values():
            module.__class__ = _sync_class(type(module))
    return model
