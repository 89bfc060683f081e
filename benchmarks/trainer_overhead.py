"""Trainer overhead: ``train_one_epoch`` vs a bare PyTorch loop on the same batches, in one run.

    python benchmarks/trainer_overhead.py [--model mobilenetv2_050] [--size 96] [--batches 20]

Prints images/s of both and their ratio (1.00 = no overhead). Both use the same model, optimizer, loss, batches
and fp32 on CPU; the trainer adds its scheduler, grad scaler (disabled), bad-image handling and progress bookkeeping.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from torch import nn

from finetune.optim import create_optimizer, create_scheduler, whole_model_groups
from finetune.train.fit import train_one_epoch
from finetune.train.loop import FitSettings, Loop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilenetv2_050")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randn(args.batch, 3, args.size, args.size, generator=g),
            "target": (torch.rand(args.batch, 10, generator=g) < 0.2).float(),
            "index": torch.arange(args.batch),
            "errors": [],
        }
        for _ in range(args.batches)
    ]
    model = timm.create_model(args.model, num_classes=10)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = nn.BCEWithLogitsLoss()
    opt = create_optimizer(whole_model_groups(model, 1e-3, 0.01), "adamw", 1e-3)
    sched = create_scheduler(opt, 10_000, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    settings = FitSettings(epochs=1, device=torch.device("cpu"), channels_last=args.channels_last)

    def bare() -> float:
        model.train()
        start = time.perf_counter()
        for b in batches:
            x = b["image"].contiguous(memory_format=torch.channels_last) if args.channels_last else b["image"]
            loss = loss_fn(model(x), b["target"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return len(batches) * args.batch / (time.perf_counter() - start)

    loop = Loop(
        model=model,
        loss_fn=loss_fn,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        train_loader=batches,
        val_loader=batches,
        settings=settings,
        run_dir=Path("."),
        console=Console(quiet=True),
    )

    def ours() -> float:
        return train_one_epoch(loop)["images_per_s"]

    bare(), ours()  # warm up both paths
    rows = []
    for _ in range(3):  # interleave to share any drift in machine load
        rows.append((bare(), ours()))
    b = sorted(r[0] for r in rows)[1]
    o = sorted(r[1] for r in rows)[1]
    print(f"{args.model} {args.size}px batch {args.batch}, {args.batches} batches x 3 repeats (median)")
    print(f"{'bare PyTorch loop':>22}: {b:8.1f} img/s")
    print(f"{'finetune trainer':>22}: {o:8.1f} img/s")
    print(f"{'ratio trainer/bare':>22}: {o / b:8.3f}")


if __name__ == "__main__":
    main()
