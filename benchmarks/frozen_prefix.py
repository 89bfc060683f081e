"""Step time of a frozen-prefix training step vs a full step, in one run, on the same batch.

    python benchmarks/frozen_prefix.py [--model mobilenetv2_100] [--size 160] [--batch 32] [--repeats 5]

Each row is one stage of a typical schedule; the step is forward + backward + AdamW step, fp32 on CPU. "no_grad"
rows run the frozen leading groups under ``torch.no_grad()`` (what the trainer does); the "requires_grad only" row
freezes the same groups but runs the plain ``model(x)``, to show what the explicit no_grad adds on top. Reported:
median step time and its ratio to the full step (lower is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from rich.console import Console
from rich.table import Table

from finetune.groups import layer_groups
from finetune.hooks.freezing import FreezePolicy, Stage
from finetune.optim import create_optimizer, group_multipliers, param_groups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilenetv2_100")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=80)
    groups = layer_groups(model)
    names = tuple(g.name for g in groups)
    n_blocks = len(model.blocks)
    top = tuple(f"blocks.{i}" for i in range(n_blocks - 2, n_blocks)) + ("head", "classifier")
    cases = [
        ("full (all groups train)", names, True),
        (f"{top[0]}: + head + classifier, no_grad", top, True),
        ("classifier only, no_grad", ("classifier",), True),
        ("classifier only, requires_grad only", ("classifier",), False),
    ]
    policy = FreezePolicy(model, groups, [Stage(0, 1, c[1]) for c in cases[:1]], bn="frozen")
    opt = create_optimizer(param_groups(model, groups, group_multipliers(groups), 1e-4, 0.01), "adamw", 1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = (torch.rand(args.batch, 80) < 0.05).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    for r in range(args.repeats + 1):  # the first round warms up and is dropped
        for label, train, use_prefix in cases:
            policy.stages = [Stage(0, 1, train)]
            policy.apply(0)
            model.train()
            start = time.perf_counter()
            out = policy.forward(x) if use_prefix else model(x)
            loss_fn(out, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[label].append(time.perf_counter() - start)
    full = statistics.median(times[cases[0][0]])
    threads = torch.get_num_threads()
    table = Table(title=f"{args.model}, batch {args.batch} x {args.size}px, fp32 CPU, {threads} threads")
    for col in ("step", "median s", "vs full"):
        table.add_column(col, justify="right" if col != "step" else "left")
    for label, *_ in cases:
        med = statistics.median(times[label])
        table.add_row(label, f"{med:.3f}", f"{med / full:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
