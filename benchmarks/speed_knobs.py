"""Which settings train fastest on this machine: channels-last, ``torch.compile``, precision, threads, per model.

    python benchmarks/speed_knobs.py [--models reduced,standard] [--steps 6] [--repeats 3] [--no-compile] [--bf16]

For the seed paper's two models (``mobilenetv2_reduced`` at 32 px and ``mobilenetv2_standard`` at 224 px, batch 32,
10 classes) a training step (forward, backward, AdamW) on one batch in memory, under each setting. Settings run
interleaved in rounds; the table gives each one's median images/s and its ratio to the plain baseline (fp32, NCHW,
eager, all threads) with the min-max over rounds. ``compile`` is ``model.compile()`` (inductor), as
``train.compile = true`` does; its compile time is paid in the warm-up round and printed apart. ``--bf16`` adds
bf16 autocast, which on a CPU without AMX is emulated: 0.08x the baseline for the Reduced model at 32 px here, so
it makes the Standard model's rounds take many minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from finetune.allocator import reuse_freed_memory
from finetune.mobilenet import mobilenetv2

MODELS = {"reduced": ("reduced", 32), "standard": ("standard", 224)}


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str):
    """One training step of ``model`` on ``(x, y)`` under ``precision``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        loss_fn(out.float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    reuse_freed_memory()  # as `finetune run` does, for every measurement in this process
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="reduced,standard")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    console = Console(width=150)
    for key in args.models.split(","):
        preset, size = MODELS[key]
        settings = [
            ("fp32, NCHW (baseline)", "fp32", False, False, threads),
            ("fp32, channels-last", "fp32", True, False, threads),
            (f"fp32, channels-last, {max(threads // 2, 1)} thread(s)", "fp32", True, False, max(threads // 2, 1)),
        ]
        if args.bf16:
            settings.append(("bf16 autocast, channels-last", "bf16", True, False, threads))
        if not args.no_compile:
            settings.append(("fp32, channels-last, compile", "fp32", True, True, threads))
        steps, compile_s = {}, {}
        for label, precision, cl, comp, _ in settings:
            torch.manual_seed(0)
            model = mobilenetv2(num_classes=10, preset=preset)
            layout = torch.channels_last if cl else torch.contiguous_format
            model = model.to(memory_format=layout).train()
            if comp:
                model.compile()
            x = torch.randn(args.batch, 3, size, size).contiguous(memory_format=layout)
            y = torch.randint(0, 10, (args.batch,))
            steps[label] = make_step(model, x, y, precision)
            start = time.perf_counter()
            steps[label]()  # warm-up (and compilation)
            compile_s[label] = time.perf_counter() - start
        rates: dict[str, list[float]] = {s[0]: [] for s in settings}
        for _ in range(args.repeats):
            for label, *_, n_threads in settings:
                torch.set_num_threads(n_threads)
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[label]()
                rates[label].append(args.batch * args.steps / (time.perf_counter() - start))
            torch.set_num_threads(threads)
        base = rates[settings[0][0]]
        table = Table(
            title=f"mobilenetv2_{preset}, {size} px, batch {args.batch}, {args.repeats} rounds x {args.steps}"
        )
        for col in ("setting", "img/s (median)", "vs baseline (min-max)", "first step s"):
            table.add_column(col, justify="left" if col == "setting" else "right")
        for label, *_ in settings:
            ratios = sorted(r / b for r, b in zip(rates[label], base))
            table.add_row(
                label,
                f"{statistics.median(rates[label]):.1f}",
                f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})",
                f"{compile_s[label]:.1f}",
            )
        console.print(table)


if __name__ == "__main__":
    main()
