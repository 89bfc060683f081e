"""Data-parallel training through ``torchrun``: the process group, gathering across ranks, synchronised BatchNorm.

``torchrun --nproc_per_node N -m finetune run RECIPE`` starts N processes; each reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from its environment (:func:`setup`). Nothing here launches processes.

- **Sampling.** Every rank draws the same seeded (seed, epoch) permutation and takes every ``world``-th index from its
  rank on (:class:`~finetune.data.samplers.ShardSampler`). With ``data.batch_size`` the *global* batch and
  ``batch_size / world`` per rank, step ``i`` of the ranks together sees exactly the images step ``i`` of one process
  sees, so a DDP run follows the single-process run (and resumes exactly).
- **Evaluation.** Each rank predicts its shard (no padding duplicates); :func:`gather` joins them in dataset order.
- **Stages.** DDP registers gradient hooks for the parameters that require grad when it is built, so
  :class:`~finetune.hooks.ddp.DDPHook` rebuilds the wrapper whenever the freezing hook signals that the trainable set or
  the forward changed (a stage boundary, the switch to cached features). The wrapped module's ``forward`` is the loop's
  forward: the frozen prefix runs under ``no_grad`` inside it.
- **BatchNorm.** ``train.sync_bn`` uses timm's ``SyncBatchNorm`` conversion on CUDA; on the CPU, where torch's
  refuses to run, :func:`convert_sync_bn` gives the same modules a forward that all-reduces the batch statistics
  with autograd, on a process group of their own.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune.predictions import Predictions


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
        backend = "nccl" if device_type == "cuda" else "gloo"
        store = _attempt_store(world, rank)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return Dist(rank, world, local)


def _attempt_store(world: int, rank: int) -> Any:
    """After a torchrun elastic restart, the job's store under a prefix of this attempt; ``None`` before one.

    torchrun keeps one store for the job, so a restarted rank can read the address a killed rank published in the
    attempt before, and gloo's connect then fails ("Connection refused") or waits: seen here in 2 of 3 restarts. Keys
    under ``attempt_<n>/`` are this attempt's only.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt in ("", "0") or "MASTER_ADDR" not in os.environ:
        return None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts it; else rank 0 does
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent and rank == 0,
        multi_tenant=not agent,
    )
    return dist.PrefixStore(f"finetune/attempt_{attempt}", store)


def teardown() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _BN_GROUP[0] = None


def barrier(d: Dist) -> None:
    """Wait for every rank (a no-op in one process)."""
    if d.enabled:
        dist.barrier()


def broadcast_object(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_list(items: list[Any], d: Dist) -> list[Any]:
    """Every rank's ``items`` joined (in rank order, without repeats)."""
    if not d.enabled:
        return items
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, items)
    return list(dict.fromkeys(x for part in parts for x in part))


def gather(out: Predictions, d: Dist) -> Predictions:
    """Join every rank's predictions in dataset order, each image once (whatever a sampler padded)."""
    if not d.enabled:
        return out
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, out)
    return Predictions.join(parts)


def gather_features(feats: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, d: Dist) -> tuple[Any, Any]:
    """Every rank's cached features joined in dataset order (each rank extracted its own shard)."""
    if not d.enabled:
        return feats, targets
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, (feats.cpu(), targets.cpu(), index.cpu()))
    f, t, i = (torch.cat([p[k] for p in parts]) for k in range(3))
    order = torch.argsort(i, stable=True)
    return f[order].to(feats.device), t[order].to(targets.device)


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
