"""What a frozen prefix costs per training step: through the network, under ``no_grad``, and on cached maps.

    python benchmarks/frozen_prefix.py [--model efficientnet_lite0] [--size 160] [--batch 32] [--repeats 7]

Each row is one stage of a typical schedule; a step is forward + backward + AdamW step, fp32 on CPU, channels-last
(``--no-channels-last`` to turn it off), with the toolkit's :class:`FreezePolicy` doing the work:

- "full": every group trains;
- "top blocks, no_grad prefix": ``blocks.5:``, head and classifier train; the frozen prefix runs forward under
  ``torch.no_grad()`` every step (what the trainer does without a cache);
- "top blocks, cached maps": the same stage on the prefix's output maps, extracted once (``freeze.cache_maps``);
- "classifier, no_grad prefix" and "classifier, cached features": the head-only stage both ways.

The rows run interleaved, ``--repeats`` rounds after a warm-up round; each round's ratio to that round's full step
is kept, so the table gives the median ratio and its spread (min-max over rounds). The cached rows also show the
one-time extraction (per image, the prefix in inference) and what a stage of E epochs costs with it amortised:
``(extract + E x step) / (E x no_grad step)``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from rich.console import Console
from rich.table import Table

from finetune.allocator import reuse_freed_memory
from finetune.groups import layer_groups
from finetune.hooks.freezing import FreezePolicy, Stage
from finetune.optim import create_optimizer, group_multipliers, param_groups


def main() -> None:
    reuse_freed_memory()  # as `finetune run` does, for every measurement in this process
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per row per round")
    parser.add_argument("--epochs", type=int, default=4, help="E of the amortised column")
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    layout = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = timm.create_model(args.model, num_classes=10).to(memory_format=layout)
    groups = layer_groups(model)
    names = tuple(g.name for g in groups)
    n_blocks = len(model.blocks)
    top = tuple(f"blocks.{i}" for i in range(n_blocks - 2, n_blocks)) + ("head", "classifier")
    policy = FreezePolicy(model, groups, [Stage(0, 1, names)], bn="frozen")
    opt = create_optimizer(param_groups(model, groups, group_multipliers(groups), 1e-4, 0.01), "adamw", 1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (args.batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def set_stage(train: tuple[str, ...]) -> None:
        policy.stages = [Stage(0, 1, train)]
        policy.apply(0)
        model.train()

    set_stage(top)
    prefix = policy.prefix
    maps = policy.prefix_maps(x, prefix).contiguous(memory_format=layout)
    model.eval()
    with torch.no_grad():  # as the cache extracts them
        pooled = policy.pooled_features(x)
    model.train()

    def step(forward, inputs: torch.Tensor) -> None:
        loss_fn(forward(inputs), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cases = [
        ("full (all groups train)", names, lambda: step(policy.forward, x)),
        (f"{top[0]}:, head, classifier; no_grad prefix", top, lambda: step(policy.forward, x)),
        (f"{top[0]}:, head, classifier; cached maps", top, lambda: step(policy.suffix_forward, maps)),
        ("classifier; no_grad prefix", ("classifier",), lambda: step(policy.forward, x)),
        ("classifier; cached features", ("classifier",), lambda: step(policy.head_forward, pooled)),
    ]
    times: dict[str, list[float]] = {c[0]: [] for c in cases}
    extract = {"maps": [], "pooled": []}
    for r in range(args.repeats + 1):  # the first round warms up and is dropped
        for label, train, run in cases:
            set_stage(train)
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            if r:
                times[label].append((time.perf_counter() - start) / args.steps)
        set_stage(top)
        start = time.perf_counter()
        policy.prefix_maps(x, prefix)
        t_maps = time.perf_counter() - start
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            policy.pooled_features(x)
        t_pooled = time.perf_counter() - start
        if r:
            extract["maps"].append(t_maps)
            extract["pooled"].append(t_pooled)
    full = times[cases[0][0]]
    threads = torch.get_num_threads()
    table = Table(
        title=f"{args.model}, batch {args.batch} x {args.size}px, fp32 CPU, {threads} threads, "
        f"{'NCHW' if args.no_channels_last else 'channels-last'}; {args.repeats} rounds"
    )
    for col in ("step", "median s", "vs full (min-max)", "img/s", f"{args.epochs}-epoch stage vs no_grad"):
        table.add_column(col, justify="right" if col != "step" else "left")
    no_grad = {"maps": times[cases[1][0]], "pooled": times[cases[3][0]]}
    for i, (label, *_) in enumerate(cases):
        ratios = sorted(t / f for t, f in zip(times[label], full))
        med = statistics.median(times[label])
        amortised = ""
        kind = {2: "maps", 4: "pooled"}.get(i)
        if kind:
            e = args.epochs
            ratio = (statistics.median(extract[kind]) + e * med) / (e * statistics.median(no_grad[kind]))
            amortised = f"{ratio:.2f} (extraction {args.batch / statistics.median(extract[kind]):.0f} img/s)"
        table.add_row(
            label,
            f"{med:.3f}",
            f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
            f"{args.batch / med:.0f}",
            amortised,
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
