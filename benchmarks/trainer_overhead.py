"""Trainer overhead: ``train_one_epoch`` vs a bare PyTorch loop on the same batches, in one run.

    python benchmarks/trainer_overhead.py [--model mobilenetv2_050] [--size 96] [--batches 20] [--repeats 9]
        [--channels-last] [--malloc reuse|default]

Prints images/s of both and their ratio (1.00 = no overhead). Both use the same model, optimizer, loss, batches
and fp32 on CPU; the trainer adds its scheduler, grad scaler (disabled), bad-image handling and progress bookkeeping.

The machine's speed drifts (the bare loop alone moved by up to 15 % between repeats in one process), so the two are
interleaved in pairs, the order alternating (bare first, then trainer first), and the ratio is taken within each
pair: drift slower than a pair cancels. Printed: the median ratio and the spread of the per-pair ratios (min, max
and the middle half); an overhead is real when the whole middle half lies below 1.

Both run in one process with glibc's malloc set as ``finetune run`` sets it (:mod:`finetune.allocator`);
``--malloc default`` leaves it as it is. ``--model`` takes a timm name or ``mobilenetv2_reduced`` / ``_standard``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from torch import nn

from finetune.allocator import reuse_freed_memory
from finetune.mobilenet import MODEL_NAMES
from finetune.models import build_mobilenetv2
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
    parser.add_argument("--repeats", type=int, default=9, help="interleaved (bare, trainer) pairs")
    parser.add_argument("--malloc", choices=["reuse", "default"], default="reuse")
    args = parser.parse_args()
    reused = args.malloc == "reuse" and reuse_freed_memory()
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
    if args.model in MODEL_NAMES:
        model = build_mobilenetv2(args.model, 10, 0.2, {})
    else:
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
    pairs = []
    for r in range(args.repeats):  # interleaved, the order alternating: drift slower than a pair cancels
        if r % 2 == 0:
            b = bare()
            o = ours()
        else:
            o = ours()
            b = bare()
        pairs.append((b, o))
    ratios = sorted(o / b for b, o in pairs)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    b_med, o_med = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    b_spread = (max(p[0] for p in pairs) - min(p[0] for p in pairs)) / b_med
    print(
        f"{args.model} {args.size}px batch {args.batch}, {args.batches} batches, {args.repeats} interleaved pairs, "
        f"malloc {'reuse' if reused else 'default'}{', channels-last' if args.channels_last else ''}"
    )
    print(f"{'bare PyTorch loop':>22}: {b_med:8.1f} img/s (median; min-max spread {100 * b_spread:.0f} %)")
    print(f"{'finetune trainer':>22}: {o_med:8.1f} img/s (median)")
    print(
        f"{'ratio trainer/bare':>22}: {statistics.median(ratios):8.3f}  per pair: min {ratios[0]:.3f}, "
        f"middle half {q[0]:.3f}-{q[2]:.3f}, max {ratios[-1]:.3f}"
    )


if __name__ == "__main__":
    main()
