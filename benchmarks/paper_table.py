"""The seed paper's six real-data results beside this toolkit's, each run as far as a time budget allows.

    python benchmarks/paper_table.py --cifar DIR --imagenette DIR [--budget-min 60] [--rows 4,5,6,7,8,9]
        [--steps 12] [--out runs/paper_table] [--set KEY=VALUE ...]

"MobileNetV2: The Same but Better" (../shared/seeds/) trains from scratch with its own recipes, which this repository
ships: ``recipes/cifar10_reduced.toml`` and ``recipes/imagenette_standard.toml``. Each row below is one of those
recipes with only what the paper's row names changed (model variant, resolution, expansion t, epochs), on the real
images: CIFAR-10 as JPEG class folders (``DIR/{train,test}``) and Imagenette 2 (``DIR/{train,val}``), fetched as
``../shared/data/REAL_DATA.md`` says. Nothing is downloaded.

For every row the script first times real training steps of that recipe (its loader, augmentation, model,
optimizer; ``--steps`` after two warm-up steps) and evaluation batches, and estimates the whole run from them:
epochs x (train images / training rate + eval images / eval rate), plus the final report's predictions. Rows whose
estimate fits in what is left of ``--budget-min`` run in full (``finetune run``, one at a time, in a subprocess); the
others are printed as "not run (needs a GPU: about N h on this CPU)" with N from that estimate.

The paper reports test accuracy with no validation split, so these recipes validate on the test split. To select
nothing on it, the toolkit's number is the last epoch's test top-1 (from ``metrics.jsonl``), not the best epoch's.
The table is printed as Markdown and written to ``OUT/paper_table.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finetune.allocator import reuse_freed_memory
from finetune.assembly import build_run
from finetune.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One result of the paper and the recipe that reproduces it."""

    table: str
    data: str  # cifar10 | imagenette
    model: str
    epochs: int
    paper: float  # the paper's test accuracy, %
    recipe: str
    sets: list[str] = field(default_factory=list)


ROWS = [
    Row("4", "cifar10", "Reduced, 32 px", 60, 90.63, "cifar10_reduced.toml"),
    Row("5", "cifar10", "Reduced, 32 px", 30, 90.44, "cifar10_reduced.toml", ["train.epochs=30"]),
    Row(
        "6",
        "cifar10",
        "Standard, 224 px",
        30,
        90.98,
        "cifar10_reduced.toml",
        ['model.name="mobilenetv2_standard"', "data.image_size=224", "train.epochs=30"],
    ),
    Row(
        "7",
        "imagenette",
        "Reduced, 32 px",
        20,
        89.36,
        "imagenette_standard.toml",
        ['model.name="mobilenetv2_reduced"', "data.image_size=32"],
    ),
    Row("8", "imagenette", "Standard, 224 px, t = 6", 20, 85.40, "imagenette_standard.toml"),
    Row(
        "9", "imagenette", "Standard, 224 px, t = 4", 20, 90.41, "imagenette_standard.toml", ["model.arch.expansion=4"]
    ),
]


ARG = {"cifar10": "cifar", "imagenette": "imagenette"}  # a row's data -> its command-line flag


def data_sets(row: Row, args: argparse.Namespace) -> list[str]:
    """The overrides that point a row's recipe at the real images."""
    if row.data == "cifar10":  # the JPEG mirror is a class folder; its test split is the paper's evaluation set
        return ['data.format="folder"', f'data.root="{args.cifar}"', 'data.train="train"', 'data.val="test"']
    return [f'data.root="{args.imagenette}"', 'data.train="train"', 'data.val="val"']


def overrides(row: Row, args: argparse.Namespace, name: str) -> list[str]:
    """Every ``--set`` of a row's run."""
    out = f'output.dir="{args.out}"'
    return [*data_sets(row, args), *row.sets, *args.set, out, f'output.name="{name}"', "output.html=false"]


def _rate(step, batches, warmup: int, steps: int) -> tuple[float, int]:
    """Images/s of ``step(batch)`` over ``steps`` batches after ``warmup`` (data loading included)."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    seen, start = 0, time.perf_counter()
    for _ in range(steps):
        seen += step(next(it))
    return seen / (time.perf_counter() - start), seen


def estimate(row: Row, args: argparse.Namespace) -> dict:
    """Time real steps of the row's recipe; the whole run's seconds estimated from them."""
    reuse_freed_memory()  # as `finetune run` does
    recipe = load_recipe(ROOT / "recipes" / row.recipe, overrides(row, args, f"estimate-{row.table}"))
    parts = build_run(recipe)
    model = parts.place(for_training=True)
    opt, _ = parts.optimizer_and_scheduler
    loss_fn, s = parts.loss_fn, parts.fit_settings
    from finetune.eval.predict import image_inputs
    from finetune.precision import autocast

    def train_step(batch: dict) -> int:
        x = image_inputs(batch, s)
        with autocast(s.device, s.precision):
            out = model(x)
        loss = loss_fn(out.float(), batch["target"].to(s.device).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(x)

    @torch.inference_mode()
    def eval_step(batch: dict) -> int:
        x = image_inputs(batch, s)
        with autocast(s.device, s.precision):
            model(x)
        return len(x)

    model.train()
    train_rate, _ = _rate(train_step, parts.loader("train", augment=True), 2, args.steps)
    model.eval()
    eval_rate, _ = _rate(eval_step, parts.loader("val"), 1, max(2, args.steps // 3))
    n_train, n_val = len(parts.splits["train"].targets), len(parts.splits["val"].targets)
    epoch_s = n_train / train_rate + n_val / eval_rate
    total = recipe.train.epochs * epoch_s + n_val / eval_rate
    return {
        "train_images_per_s": train_rate,
        "eval_images_per_s": eval_rate,
        "train_images": n_train,
        "eval_images": n_val,
        "epoch_s": epoch_s,
        "estimate_s": total,
        "precision": s.precision,
        "device": str(s.device),
    }


def run_row(row: Row, args: argparse.Namespace) -> dict:
    """Train the row in full (``finetune run``); its last epoch's test top-1 and the wall time."""
    name = f"table{row.table}"
    cmd = [sys.executable, "-m", "finetune", "run", str(ROOT / "recipes" / row.recipe)]
    for s in overrides(row, args, name):
        cmd += ["--set", s]
    start = time.perf_counter()
    log = Path(args.out) / f"{name}.log"
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"}).returncode
    wall = time.perf_counter() - start
    if code:
        return {"status": f"failed (exit {code}; see {log})", "wall_s": wall}
    metrics = [json.loads(line) for line in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    return {"status": "run", "top1": 100 * last["val_top1"], "epochs_run": last["epoch"], "wall_s": wall}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", default="", help="CIFAR-10 JPEG folders (train/, test/)")
    parser.add_argument("--imagenette", default="", help="Imagenette 2 folders (train/, val/)")
    parser.add_argument("--budget-min", type=float, default=60.0, help="run rows in full while their estimate fits")
    parser.add_argument("--rows", default="4,5,6,7,8,9")
    parser.add_argument("--steps", type=int, default=12, help="training steps timed per row for the estimate")
    parser.add_argument("--out", default="runs/paper_table")
    parser.add_argument("--set", action="append", default=[], help="an override for every row (KEY=VALUE)")
    parser.add_argument("--estimate-only", action="store_true")
    args = parser.parse_args()
    args.out = str(Path(args.out).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    chosen = [r for r in ROWS if r.table in args.rows.split(",")]
    missing = {r.data for r in chosen if not getattr(args, ARG[r.data])}
    if missing:
        sys.exit(
            f"--{' and --'.join(sorted(missing))}: give the folder of the real images (../shared/data/REAL_DATA.md)"
        )
    left = args.budget_min * 60
    results = []
    for row in chosen:
        est = estimate(row, args)
        print(
            f"table {row.table}: {est['train_images_per_s']:.1f} img/s training, {est['eval_images_per_s']:.1f} "
            f"img/s eval ({est['precision']}); estimate {_hours(est['estimate_s'])}",
            flush=True,
        )
        res = {"status": "not run", **est}
        if not args.estimate_only and est["estimate_s"] <= left:
            res.update(run_row(row, args))
            left -= res["wall_s"]
        results.append({**asdict(row), **res})
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"Paper vs toolkit ({machine}; toolkit: last epoch's test top-1, no selection on test)",
        "",
        "| table | data | model | epochs | paper | toolkit | wall time | device, precision |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] == "run":
            ours, wall = f"{r['top1']:.2f}", _hours(r["wall_s"])
        elif r["status"] == "not run":
            hours = round(r["estimate_s"] / 3600, 1)
            why = "needs a GPU" if hours > 3 else "over the budget"
            ours, wall = f"not run ({why}: about {hours:g} h on this CPU)", "-"
        else:
            ours, wall = r["status"], _hours(r["wall_s"])
        lines.append(
            f"| {r['table']} | {r['data']} | {r['model']} | {r['epochs']} | {r['paper']:.2f} | {ours} | {wall} | "
            f"{r['device']}, {r['precision']} |"
        )
    print("\n".join(lines))
    (Path(args.out) / "paper_table.json").write_text(json.dumps({"machine": machine, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
