"""The training loop: mixed precision, accumulation, clipping, per-epoch evaluation, atomic checkpoints.

One plain loop that reads top to bottom (``fit`` -> ``train_one_epoch`` / ``predict``). Behaviour comes in as
objects and plain settings; nothing here reads a recipe.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from finetune import checkpoint as ckpt
from finetune.errors import UserError
from finetune.freezing import FeatureCache, FreezePolicy
from finetune.metrics import summarize, summarize_single
from finetune.optim import group_lrs

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FitSettings:
    """Plain settings for :func:`fit`."""

    epochs: int
    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16, already resolved
    accum_steps: int = 1
    grad_clip: float = 0.0
    channels_last: bool = False
    threshold: float = 0.5
    select: str = "map"  # map | macro_f1 | micro_f1 | top1 | loss
    on_bad_image: str = "skip"  # skip | error
    single_label: bool = False  # softmax + top-k accuracy instead of sigmoid + mAP/F1


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_score: float | None = None
    best_epoch: int = -1
    bad_images: list[str] = field(default_factory=list)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch): the order of epoch k is the same after a resume."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16, a no-op for fp32."""
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _handle_bad(errors: list[str], policy: str, state: TrainState, console: Console) -> None:
    """Apply the bad-image policy to the unreadable images of one batch."""
    if not errors:
        return
    if policy == "error":
        raise UserError(f'{errors[0]}; fix or remove it, or set data.on_bad_image = "skip"')
    for msg in errors:
        if msg not in state.bad_images:
            state.bad_images.append(msg)
            console.print(f"[yellow]skipped[/] {msg}")


def _to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = batch["image"].to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["target"].to(device, non_blocking=True)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    settings: FitSettings,
    state: TrainState,
    console: Console,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, the top group's last LR and images per second.

    ``forward`` replaces ``model(images)``: a freeze policy's forward (frozen prefix under no_grad), or the
    classifier alone when ``loader`` yields cached features.
    """
    forward = forward or model
    model.train()
    device, accum = settings.device, settings.accum_steps
    total_loss, seen, n_batches = 0.0, 0, len(loader)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with _progress(console) as bar:
        task = bar.add_task(f"epoch {state.epoch + 1}/{settings.epochs}", total=n_batches, info="")
        for i, batch in enumerate(loader):
            _handle_bad(batch["errors"], settings.on_bad_image, state, console)
            if "image" in batch:
                images, targets = _to_device(batch, device, settings.channels_last)
                with autocast(device, settings.precision):
                    logits = forward(images)
                # The loss runs in fp32 outside autocast: log-sigmoid terms underflow to NaN in fp16.
                loss = loss_fn(logits.float(), targets.float())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at epoch {state.epoch + 1}, batch {i}")
                scaler.scale(loss / accum).backward()
                total_loss += loss.item() * len(images)
                seen += len(images)
            if (i + 1) % accum == 0 or i + 1 == n_batches:
                if settings.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.step += 1
            rate = seen / max(time.perf_counter() - start, 1e-9)
            info = f"loss {total_loss / max(seen, 1):.4f}  lr {optimizer.param_groups[-1]['lr']:.2e}  {rate:.0f} img/s"
            bar.update(task, advance=1, info=info)
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "lr": optimizer.param_groups[-1]["lr"],
        "images_per_s": seen / max(elapsed, 1e-9),
        "train_time_s": elapsed,
    }


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    loss_fn: nn.Module | None = None,
    on_bad_image: str = "skip",
    state: TrainState | None = None,
    console: Console | None = None,
    single_label: bool = False,
) -> dict[str, Any]:
    """Probabilities (sigmoid, or softmax with ``single_label``) for every readable image of ``loader``.

    Returns:
        ``targets`` and ``probs`` (``[n, classes]`` arrays, rows in loader order), ``index`` (dataset indices) and,
        with ``loss_fn``, the mean ``loss``.
    """
    model.eval()
    state = state or TrainState()
    console = console or Console(stderr=True)
    targets, probs, indices, total_loss = [], [], [], 0.0
    for batch in loader:
        _handle_bad(batch["errors"], on_bad_image, state, console)
        if "image" not in batch:
            continue
        images, target = _to_device(batch, device, channels_last)
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        if loss_fn is not None:
            total_loss += loss_fn(logits, target.float()).item() * len(images)
        probs.append((torch.softmax(logits, 1) if single_label else torch.sigmoid(logits)).cpu().numpy())
        targets.append(target.cpu().numpy())
        indices.append(batch["index"].numpy())
    if not probs:
        raise UserError("no readable image in the evaluation split")
    out: dict[str, Any] = {
        "targets": np.concatenate(targets),
        "probs": np.concatenate(probs),
        "index": np.concatenate(indices),
    }
    if loss_fn is not None:
        out["loss"] = total_loss / len(out["probs"])
    return out


_SHOWN = {"map": "mAP", "macro_f1": "macro-F1", "micro_f1": "micro-F1", "top1": "top-1", "top5": "top-5"}


def _span(train: tuple[str, ...], names: list[str]) -> str:
    """``stem, blocks.0-6, head, classifier`` rather than every block name."""
    if list(train) == names:
        return "all groups"
    blocks = [n for n in train if n.startswith("blocks.")]
    parts = [n for n in train if not n.startswith("blocks.")]
    idx = [int(b.split(".")[1]) for b in blocks]
    if len(blocks) > 2 and idx == list(range(idx[0], idx[-1] + 1)):
        parts.insert(1 if "stem" in train else 0, f"{blocks[0]}-{blocks[-1].split('.')[1]}")
    else:
        parts[1 if "stem" in train else 0 : 0] = blocks
    return ", ".join(parts)


def _is_better(score: float, best: float | None, select: str) -> bool:
    if math.isnan(score):
        return False
    return best is None or (score < best if select == "loss" else score > best)


def checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    state: TrainState,
) -> dict[str, Any]:
    """Everything needed to continue a run, in types ``torch.load(weights_only=True)`` accepts."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": asdict(state),
        "rng": ckpt.rng_state(),
    }


def restore(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> TrainState:
    """Load a checkpoint written by :func:`fit` into the given objects and return its state."""
    state = ckpt.load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state["rng"])
    return TrainState(**state["train_state"])


def fit(
    model: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    val_loader: torch.utils.data.DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    settings: FitSettings,
    run_dir: Path,
    state: TrainState | None = None,
    console: Console | None = None,
    policy: FreezePolicy | None = None,
    cache: FeatureCache | None = None,
) -> TrainState:
    """Train from ``state.epoch`` to ``settings.epochs``, evaluating and checkpointing after every epoch.

    With a freeze ``policy``, each epoch first applies its stage (trainable groups, BN modes) and ends with the check
    that frozen BN statistics did not move; with a ``cache``, head-only stages train on cached features.
    Writes ``metrics.jsonl`` (one line per epoch), ``last.pt`` every epoch and ``best.pt`` when the selected
    validation metric improves; all writes are atomic.
    """
    state = state or TrainState()
    console = console or Console(stderr=True)
    last_stage = -1
    for epoch in range(state.epoch, settings.epochs):
        for holder in (train_loader.sampler, train_loader.dataset):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        loader, forward, extra = train_loader, None, {}
        if policy is not None:
            stage = policy.apply(epoch)
            if policy.stage_index != last_stage:
                last_stage = policy.stage_index
                if len(policy.stages) > 1 or policy.frozen_bn or list(stage.train) != policy.group_names:
                    console.print(
                        f"stage {last_stage + 1}/{len(policy.stages)} (epochs {stage.start + 1}-{stage.end}): "
                        f"training {_span(stage.train, policy.group_names)}; running stats fixed in "
                        f"{len(policy.frozen_bn)} BN layers; {policy.prefix} leading groups run without gradients"
                    )
            forward = policy.forward
            extra = {"stage": last_stage + 1, "cached_features": False}
            if cache is not None and policy.cacheable(epoch):
                before = cache.extract_time_s
                loader, forward = cache.loader(epoch, settings, console), policy.head_forward
                extra["cached_features"] = True
                extra["cache_time_s"] = cache.extract_time_s - before
        stats = train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, settings, state, console, forward)
        if policy is not None:
            policy.check_bn(epoch)
            extra["bn_frozen_checksum"] = policy.bn_checksum()
        out = predict(
            model, val_loader, settings.device, settings.precision, settings.channels_last, loss_fn,
            settings.on_bad_image, state, console, settings.single_label,
        )  # fmt: skip
        if settings.single_label:
            metrics = summarize_single(out["targets"], out["probs"])
        else:
            metrics = summarize(out["targets"], out["probs"], settings.threshold)
        state.epoch = epoch + 1
        record = {"epoch": state.epoch, "step": state.step, **stats, **extra, "lr_groups": group_lrs(optimizer)}
        record["val_loss"] = out["loss"]
        record.update({f"val_{k}": v for k, v in metrics.items()})
        score = out["loss"] if settings.select == "loss" else metrics[settings.select]
        improved = _is_better(score, state.best_score, settings.select)
        if improved:
            state.best_score, state.best_epoch = score, state.epoch
        full = checkpoint_state(model, optimizer, scheduler, scaler, state)
        if improved:
            ckpt.save_checkpoint(run_dir / "best.pt", full)
        ckpt.save_checkpoint(run_dir / "last.pt", full)
        ckpt.append_jsonl(run_dir / "metrics.jsonl", record)
        console.print(
            f"epoch {state.epoch}/{settings.epochs}  loss {stats['train_loss']:.4f}  val_loss {out['loss']:.4f}  "
            + "".join(f"{label} {metrics[k]:.3f}  " for k, label in _SHOWN.items() if k in metrics)
            + f"{stats['images_per_s']:.0f} img/s"
            + ("  *best" if improved else "")
        )
    return state
