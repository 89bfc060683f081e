"""glibc's malloc as ``finetune run`` sets it (freed memory reused) against glibc's default, on the trainer.

    python benchmarks/allocator.py [--model mobilenetv2_reduced] [--size 32] [--batches 15] [--repeats 6]

Each measurement is a fresh process (a malloc setting cannot be undone inside one): ``train_one_epoch`` on the same
in-memory batches, warmed up by one epoch, then timed over one epoch. The two settings alternate, so drift slower
than a pair cancels. Printed: images/s per setting (median and every repeat), the median ratio reuse/default and
the spread of the per-pair ratios, and the share of CPU time spent in the kernel (``os.times``) under each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, os, sys, time
from pathlib import Path
import torch
from rich.console import Console
from torch import nn
from finetune.allocator import reuse_freed_memory
from finetune.mobilenet import MODEL_NAMES
from finetune.models import build_mobilenetv2
from finetune.optim import create_optimizer, create_scheduler, whole_model_groups
from finetune.train.fit import train_one_epoch
from finetune.train.loop import FitSettings, Loop

model_name, size, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reused = reuse_freed_memory()
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
batches = [{"image": torch.randn(batch, 3, size, size, generator=g), "target": torch.randint(0, 10, (batch,)),
            "index": torch.arange(batch), "errors": []} for _ in range(n)]
if model_name in MODEL_NAMES:
    model = build_mobilenetv2(model_name, 10, 0.2, {})
else:
    import timm
    model = timm.create_model(model_name, num_classes=10)
model = model.to(memory_format=torch.channels_last)
ce = nn.CrossEntropyLoss()
opt = create_optimizer(whole_model_groups(model, 1e-3, 0.0), "adamw", 1e-3)
loop = Loop(model=model, loss_fn=lambda logits, t: ce(logits, t.long()), optimizer=opt,
            scheduler=create_scheduler(opt, 10_000, 10), scaler=torch.amp.GradScaler("cpu", enabled=False),
            train_loader=batches, val_loader=batches,
            settings=FitSettings(epochs=1, device=torch.device("cpu"), channels_last=True), run_dir=Path("."),
            console=Console(quiet=True))
train_one_epoch(loop)
t0, w0 = os.times(), time.perf_counter()
rate = train_one_epoch(loop)["images_per_s"]
t1 = os.times()
busy = (t1.user - t0.user) + (t1.system - t0.system)
print(json.dumps({"rate": rate, "reused": reused, "system": (t1.system - t0.system) / max(busy, 1e-9)}))
"""


def _child(args: argparse.Namespace, setting: str) -> dict:
    env = {**os.environ, "FINETUNE_MALLOC": setting}
    cmd = [sys.executable, "-c", CHILD, args.model, str(args.size), str(args.batches), str(args.batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, cwd=Path(__file__).parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilenetv2_reduced")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=6, help="(default, reuse) pairs, the order alternating")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"default": [], "reuse": []}
    start = time.perf_counter()
    for r in range(args.repeats):
        for setting in ("default", "reuse") if r % 2 == 0 else ("reuse", "default"):
            runs[setting].append(_child(args, setting))
    assert all(not x["reused"] for x in runs["default"]) and all(x["reused"] for x in runs["reuse"])
    ratios = sorted(b["rate"] / a["rate"] for a, b in zip(runs["default"], runs["reuse"], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"{args.model} {args.size}px batch {args.batch}, {args.batches} batches, channels-last, fp32, trainer epoch")
    for setting, xs in runs.items():
        rates = [x["rate"] for x in xs]
        kernel = statistics.median(x["system"] for x in xs)
        print(
            f"{'malloc ' + setting:>16}: {statistics.median(rates):7.1f} img/s (median; "
            f"{', '.join(f'{r:.1f}' for r in rates)}), kernel time {100 * kernel:.0f} % of CPU time"
        )
    print(
        f"{'ratio reuse/default':>16}: {statistics.median(ratios):7.3f}  per pair: min {ratios[0]:.3f}, middle half "
        f"{q[0]:.3f}-{q[2]:.3f}, max {ratios[-1]:.3f}   ({time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
