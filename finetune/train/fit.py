"""The training loop: mixed precision, accumulation, clipping, per-epoch evaluation, atomic checkpoints.

One plain loop that reads top to bottom (``fit`` -> ``train_one_epoch`` / ``predict_loader``). Behaviour comes in as
objects (the :class:`~finetune.train.loop.Loop`, its settings and :class:`~finetune.train.loop.Hook` objects); nothing
here reads a recipe or knows about freezing, cached features, logging or early stopping: those are hooks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from finetune import runfiles
from finetune.console import LogTicker
from finetune.errors import UserError
from finetune.eval.predict import handle_bad_images, image_inputs, predict_loader
from finetune.io import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from finetune.optim import group_lrs
from finetune.precision import autocast
from finetune.train.loop import Hook, Loop, TrainState, hook_key
from finetune.train.mixing import cutmix_batch, mix_batch


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


def _optimizer_step(loop: Loop) -> None:
    s, opt = loop.settings, loop.optimizer
    if s.grad_clip > 0:
        loop.scaler.unscale_(opt)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(loop.model.parameters(), s.grad_clip)
    loop.scaler.step(opt)
    loop.scaler.update()
    opt.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.state.step += 1


def _forward_backward(
    loop: Loop, forward: Any, inputs: torch.Tensor | None, batch: dict[str, Any], i: int
) -> tuple[float, int]:
    """Batch ``i``'s loss backward (scaled for accumulation); returns its loss times images, and its images."""
    s, state = loop.settings, loop.state
    targets = None if inputs is None else batch["target"].to(s.device, non_blocking=True)
    if loop.agree is not None:  # DDP: every rank steps, or none does
        inputs, targets = loop.agree(inputs, targets)
    if inputs is None or targets is None:
        return 0.0, 0
    if s.mixup > 0 and len(inputs):
        inputs, targets = mix_batch(inputs, targets, s.mixup, (s.seed, state.epoch, i))
    if s.cutmix > 0 and len(inputs) and batch.get("image") is not None and len(batch["image"]) == len(inputs):
        inputs, targets = cutmix_batch(inputs, targets, s.cutmix, (s.seed, state.epoch, i), batch.get("boxes"))
    with autocast(s.device, s.precision):
        logits = forward(inputs)
    # The loss runs in fp32 outside autocast: log-sigmoid terms underflow to NaN in fp16. An empty stand-in batch (a
    # DDP rank with nothing readable in this step) contributes zero gradients.
    loss = loop.loss_fn(logits.float(), targets.float()) if len(inputs) else logits.float().sum() * 0.0
    if not torch.isfinite(loss):
        broken = [n for n, p in loop.model.named_parameters() if not torch.isfinite(p).all()]
        if broken and state.step == 0:  # before any step: not the LR, the weights the run started from
            raise UserError(
                f"the starting weights hold NaN or inf ({broken[0]} and {len(broken) - 1} more): model.checkpoint "
                "(or the pretrained file) is broken; use another"
            )
        raise UserError(
            f"the loss became {loss.item()} at epoch {state.epoch + 1}, batch {i + 1}: training diverged; "
            'lower optim.lr, set train.grad_clip, or use train.precision = "fp32"'
        )
    loop.scaler.scale(loss / s.accum_steps).backward()
    return loss.item() * len(inputs), len(inputs)


def train_one_epoch(loop: Loop, hooks: Sequence[Hook] = ()) -> dict[str, float]:
    """One pass over ``loop.loader`` with ``loop.forward``; returns mean loss, the top group's LR and images/s."""
    model, s, state = loop.model, loop.settings, loop.state
    loader, forward = loop.loader or loop.train_loader, loop.forward or model
    inputs_of = loop.inputs or (lambda batch: image_inputs(batch, s))
    model.train()
    done = state.batch  # batches a mid-epoch checkpoint had done (the sampler skips them)
    total_loss, seen = _partial_sums(loop)
    n_batches = done + len(loader)
    start = time.perf_counter() - state.partial.get("time", 0.0)
    loop.optimizer.zero_grad(set_to_none=True)
    batches = iter(loader)
    if loop.resume_rng is not None:  # the RNG of the checkpoint's moment, after the epoch's hooks and workers drew
        set_rng_state(loop.resume_rng)
        loop.resume_rng = None
    label = f"epoch {state.epoch + 1}/{s.epochs}"
    later = (s.epochs - state.epoch - 1) * n_batches  # the rest of the run, in batches like this epoch's
    ticker = LogTicker(loop.console, label, n_batches, s.progress_every, s.progress_steps, after=later, done=done)
    with _progress(loop.console) as bar:
        task = bar.add_task(label, total=n_batches, completed=done, info="")
        for i, batch in enumerate(batches, start=done):
            handle_bad_images(batch["errors"], s.on_bad_image, state.bad_images, loop.console)
            n = _forward_backward(loop, forward, inputs_of(batch), batch, i)
            total_loss, seen = total_loss + n[0], seen + n[1]
            if (i + 1) % s.accum_steps == 0 or i + 1 == n_batches:
                _optimizer_step(loop)
                for h in hooks:
                    h.on_step_end(loop)
                if s.checkpoint_every and state.step % s.checkpoint_every == 0 and i + 1 < n_batches:
                    ranks = loop.share([total_loss, seen]) if loop.share is not None else [[total_loss, seen]]
                    state.batch, state.partial = i + 1, {"ranks": ranks, "time": _since(start)}
                    save_step_checkpoint(loop, hooks)
            rate = seen / max(time.perf_counter() - start, 1e-9)
            lr = loop.optimizer.param_groups[-1]["lr"]
            info = f"loss {total_loss / max(seen, 1):.4f}  lr {lr:.2e}  {rate:.0f} img/s"
            bar.update(task, advance=1, info=info)
            ticker.tick(i + 1, info)
    elapsed = _since(start)
    state.batch, state.partial = 0, {}
    if not seen:
        raise UserError(
            f"epoch {state.epoch + 1}: not one training image could be read ({len(state.bad_images)} unreadable); "
            "check data.root and the images"
        )
    return {
        "train_loss": total_loss / max(seen, 1),
        "lr": loop.optimizer.param_groups[-1]["lr"],
        "images_per_s": seen / max(elapsed, 1e-9),
        "train_time_s": elapsed,
    }


_SHOWN = {"map": "mAP", "macro_f1": "macro-F1", "micro_f1": "micro-F1", "top1": "top-1", "top5": "top-5"}


def _is_better(score: float, best: float | None, select: str) -> bool:
    """Whether ``score`` beats ``best``; with no real score yet (none, or NaN: no val positives) the newest wins."""
    if best is None or math.isnan(best):
        return True
    if math.isnan(score):
        return False
    return score < best if select == "loss" else score > best


def checkpoint_state(loop: Loop, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Everything needed to continue a run, in types ``torch.load(weights_only=True)`` accepts."""
    extra = {"eval_model": loop.eval_model.state_dict()} if loop.eval_model is not None else {}
    return {
        "model": loop.model.state_dict(),
        **extra,
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "train_state": asdict(loop.state),
        "hooks": {hook_key(h): h.state_dict() for h in hooks if h.state_dict()},
        "rng": rng_state(),
    }


def _partial_sums(loop: Loop) -> tuple[float, int]:
    """This rank's loss sum and image count of the epoch so far, as a mid-epoch checkpoint kept them (0, 0 if none)."""
    ranks = loop.state.partial.get("ranks", [])
    if loop.rank < len(ranks):
        return float(ranks[loop.rank][0]), int(ranks[loop.rank][1])
    return 0.0, 0


def _since(start: float) -> float:
    return time.perf_counter() - start


STEPS_DIR, KEEP_STEPS = "steps", 2


def step_checkpoints(run_dir: Path) -> list[Path]:
    """A run's mid-epoch checkpoints, oldest first (only ``step-<digits>.pt``: anything else there is not ours)."""
    return sorted(p for p in (run_dir / STEPS_DIR).glob("step-*.pt") if p.stem[5:].isdigit())


def save_step_checkpoint(loop: Loop, hooks: Sequence[Hook] = ()) -> None:
    """A mid-epoch checkpoint, ``RUN/steps/step-<step>.pt`` (atomic; rank 0); the newest ``KEEP_STEPS`` are kept."""
    if not loop.is_main:
        return
    folder = loop.run_dir / STEPS_DIR
    folder.mkdir(exist_ok=True)
    save_checkpoint(folder / f"step-{loop.state.step:08d}.pt", checkpoint_state(loop, hooks))
    for old in step_checkpoints(loop.run_dir)[:-KEEP_STEPS]:
        old.unlink(missing_ok=True)


def clear_step_checkpoints(run_dir: Path) -> None:
    """Remove the mid-epoch checkpoints an epoch's ``last.pt`` has superseded."""
    for old in step_checkpoints(run_dir):
        old.unlink(missing_ok=True)


def selected_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The weights a checkpoint was selected on: the EMA's when the run kept one, else the model's."""
    return checkpoint.get("eval_model", checkpoint["model"])


def restore(path: Path, loop: Loop, hooks: Sequence[Hook] = ()) -> TrainState:
    """Load a checkpoint written by :func:`fit` into the loop's objects and hooks; sets and returns its state."""
    saved = load_checkpoint(path)
    try:
        loop.model.load_state_dict(saved["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        msg = f"{path}: its weights do not fit this model ({first[:150]}); is model.name the run's?"
        raise UserError(msg) from None
    saved_groups, groups = len(saved["optimizer"]["param_groups"]), len(loop.optimizer.param_groups)
    if saved_groups != groups:  # e.g. 0.1.0 gave L2-SP on a model without layer groups no head groups of its own
        raise UserError(
            f"{path}: its optimizer state has {saved_groups} parameter groups where this run has {groups} (written by "
            "an older finetune for this recipe); it cannot continue exactly: start the run again"
        )
    loop.optimizer.load_state_dict(saved["optimizer"])
    loop.scheduler.load_state_dict(saved["scheduler"])
    loop.scaler.load_state_dict(saved["scaler"])
    for h in hooks:
        if hook_key(h) in saved.get("hooks", {}):
            h.load_state_dict(saved["hooks"][hook_key(h)])
    set_rng_state(saved["rng"])
    loop.state = TrainState(**saved["train_state"])
    loop.resume_rng = saved["rng"] if loop.state.batch else None
    return loop.state


def _set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    for holder in (loader.sampler, loader.dataset):
        if hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)


def _skip(loader: torch.utils.data.DataLoader, batches: int) -> None:
    if not hasattr(loader.sampler, "set_skip"):
        raise UserError(
            "train.checkpoint_every: this run's sampler cannot start mid-epoch; move RUN/steps away to resume from "
            "last.pt (the epoch's start)"
        )
    loader.sampler.set_skip(batches * (loader.batch_size or 1))


def _validate(loop: Loop, stats: dict[str, float]) -> tuple[dict[str, Any], bool]:
    """Score the epoch on val, update the best score; the epoch's record and whether it improved."""
    s, state = loop.settings, loop.state
    model = loop.eval_model or loop.model
    sharded = loop.gather is not None
    out = predict_loader(
        model,
        loop.val_loader,
        s,
        loss_fn=loop.loss_fn,
        bad_images=state.bad_images,
        console=loop.console,
        allow_empty=sharded,
    )
    if loop.gather is not None:
        out = loop.gather(out)
        if not len(out.index):
            raise UserError("no readable image in the evaluation split")
    metrics = s.task.metrics(out.targets, out.probs, s.threshold)
    record = {"epoch": state.epoch, "step": state.step, **stats, "lr_groups": group_lrs(loop.optimizer)}
    record["val_loss"] = out.loss
    record.update({f"val_{k}": v for k, v in metrics.items()})
    score = out.loss if s.select == "loss" else metrics[s.select]
    improved = _is_better(score, state.best_score, s.select)
    if improved:
        state.best_score, state.best_epoch = score, state.epoch
    return record, improved


def _epoch_line(loop: Loop, stats: dict[str, float], record: dict[str, Any], improved: bool) -> str:
    shown = "".join(f"{label} {record[f'val_{k}']:.3f}  " for k, label in _SHOWN.items() if f"val_{k}" in record)
    return (
        f"epoch {loop.state.epoch}/{loop.settings.epochs}  loss {stats['train_loss']:.4f}  "
        f"val_loss {record['val_loss']:.4f}  {shown}{stats['images_per_s']:.0f} img/s" + ("  *best" if improved else "")
    )


def fit(loop: Loop, hooks: Sequence[Hook] = ()) -> TrainState:
    """Train from ``loop.state.epoch`` to ``settings.epochs``, evaluating and checkpointing after every epoch.

    Writes ``last.pt`` every epoch and ``best.pt`` when the selected validation metric improves (atomically); what
    else happens (freezing stages, metric logs, early stopping) is up to ``hooks``.
    """
    s = loop.settings
    for h in hooks:
        h.on_fit_start(loop)
    try:
        for epoch in range(loop.state.epoch, s.epochs):
            if loop.state.stop_reason:
                break
            loop.epoch, loop.loader, loop.forward, loop.inputs = epoch, loop.train_loader, loop.model, None
            _set_epoch(loop.train_loader, epoch)
            for h in hooks:
                h.on_epoch_start(loop)
            if loop.state.batch:  # resumed from a mid-epoch checkpoint: the batches it had done are not drawn again
                _skip(loop.loader or loop.train_loader, loop.state.batch)
            stats = train_one_epoch(loop, hooks)
            loop.state.epoch = epoch + 1
            record, improved = _validate(loop, stats)
            for h in hooks:
                h.on_epoch_end(loop, record)
            full = checkpoint_state(loop, hooks)
            if improved and loop.is_main:
                save_checkpoint(loop.run_dir / runfiles.BEST, full)
            if loop.is_main:
                save_checkpoint(loop.run_dir / runfiles.LAST, full)
                clear_step_checkpoints(loop.run_dir)
            loop.console.print(_epoch_line(loop, stats, record, improved))
            if loop.state.stop_reason:
                loop.console.print(loop.state.stop_reason)
    finally:
        for h in hooks:
            h.on_fit_end(loop)
    return loop.state
