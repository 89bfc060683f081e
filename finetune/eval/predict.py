"""Running a model over a loader: probabilities and targets as arrays, the bad-image policy, flip TTA.

What validation, ``eval``, ``calibrate`` and ``predict`` share; nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from finetune.data.dataset import batch_images
from finetune.errors import UserError
from finetune.eval.tasks import MULTI_LABEL, Task
from finetune.models import hflip_average
from finetune.precision import autocast
from finetune.predictions import Predictions


@dataclass(kw_only=True)
class EvalSettings:
    """How batches are run through a model."""

    device: torch.device
    precision: str = "fp32"  # fp32 | bf16 | fp16, already resolved
    channels_last: bool = False
    on_bad_image: str = "skip"  # skip | error
    task: Task = MULTI_LABEL
    tta: str = "none"  # "hflip": logits averaged over the image and its mirror


def handle_bad_images(errors: list[str], policy: str, seen: list[str], console: Console) -> None:
    """Apply the bad-image policy to the unreadable images of one batch; ``seen`` collects each message once."""
    if not errors:
        return
    if policy == "error":
        raise UserError(f'{errors[0]}; fix or remove it, or set data.on_bad_image = "skip"')
    for msg in errors:
        if msg not in seen:
            seen.append(msg)
            console.print(f"[yellow]skipped[/] {escape(msg)}")


def image_inputs(batch: dict[str, Any], settings: EvalSettings) -> torch.Tensor | None:
    """A batch's images on the device, normalised; None for a batch whose every image was unreadable."""
    if "image" not in batch:
        return None
    return batch_images(batch, settings.device, settings.channels_last)


@torch.inference_mode()
def predict_loader(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    settings: EvalSettings,
    *,
    loss_fn: nn.Module | None = None,
    bad_images: list[str] | None = None,
    console: Console | None = None,
    allow_empty: bool = False,
) -> Predictions:
    """Probabilities (the task's activation) for every readable image of ``loader``.

    Args:
        model: The network (put in eval mode here).
        loader: Batches of :class:`~finetune.data.dataset.ImageDataset` samples.
        settings: Device, precision, bad-image policy, task and TTA.
        loss_fn: When given, the mean loss is returned too.
        bad_images: Receives the messages of unreadable images (a run's list, so each is reported once).
        console: Where skipped images are reported.
        allow_empty: Return empty arrays, not an error, when nothing was read (a DDP rank's share, gathered next).

    Returns:
        The rows in loader order, with their dataset indices and, with ``loss_fn``, the mean loss.
    """
    model.eval()
    bad_images = [] if bad_images is None else bad_images
    console = console or Console(stderr=True)
    targets, probs, indices, total_loss = [], [], [], 0.0
    for batch in loader:
        handle_bad_images(batch["errors"], settings.on_bad_image, bad_images, console)
        inputs = image_inputs(batch, settings)
        if inputs is None:
            continue
        target = batch["target"].to(settings.device, non_blocking=True)
        with autocast(settings.device, settings.precision):
            logits = hflip_average(model, inputs) if settings.tta == "hflip" else model(inputs)
        logits = logits.float()
        if loss_fn is not None:
            total_loss += loss_fn(logits, target.float()).item() * len(inputs)
        probs.append(settings.task.activation(logits).cpu().numpy())
        targets.append(target.cpu().numpy())
        indices.append(batch["index"].numpy())
    if not probs and not allow_empty:
        raise UserError("no readable image in the evaluation split")
    if not probs:  # a DDP rank's empty shard (a split with fewer images than ranks): the gather joins the others
        n = len(getattr(loader.dataset, "classes", ()) or ())
        targets, probs, indices = [np.zeros((0, n), np.float32)], [np.zeros((0, n), np.float32)], [np.zeros(0, int)]
    n = sum(len(p) for p in probs)
    return Predictions(
        probs=np.concatenate(probs),
        targets=np.concatenate(targets),
        index=np.concatenate(indices),
        loss=None if loss_fn is None else total_loss / max(n, 1),
    )
