"""Transfer on real data: scratch vs head-only vs staged unfreezing at equal epochs, on ../shared/data/coco-tiny.

    python benchmarks/transfer.py [--epochs 8] [--size 224] [--out /tmp/finetune-transfer]

coco-tiny holds 80 COCO 2017 train and 80 val images (80 categories, real annotations). The pretrained runs start
from the real ImageNet weights of timm's ``efficientnet_lite0`` in ../shared/weights/. Every configuration trains
for the same number of epochs with the same data, loss, optimizer and seed; only the starting weights and the
freezing schedule differ. Head-only runs twice, on cached features and normally, to time the cache. Prints a table
of val mAP, macro-F1 and micro-F1 (at 0.5) and the wall time of each run.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from finetune.config import validate_recipe
from finetune.training import run

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO_TINY = SHARED / "data" / "coco-tiny"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0.imagenet.safetensors"


def recipe(name: str, out: Path, epochs: int, size: int, extra: dict) -> dict:
    base = {
        "data": {
            "root": str(COCO_TINY),
            "train": "train2017",
            "val": "val2017",
            "image_size": size,
            "batch_size": 16,
            "num_workers": 2,
            "augment": {"scale": [0.35, 1.0]},
        },
        "model": {"name": "efficientnet_lite0", "drop_rate": 0.2},
        "loss": {"name": "bce"},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01, "warmup_epochs": 1},
        "train": {"epochs": epochs, "precision": "fp32", "seed": 0, "channels_last": True},
        "output": {"dir": str(out), "name": name},
    }
    for section, values in extra.items():
        base.setdefault(section, {}).update(values)
    return base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("/tmp/finetune-transfer") / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    args = parser.parse_args()
    if not COCO_TINY.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {COCO_TINY} and {WEIGHTS}")
    e = args.epochs
    if e < 3:
        raise SystemExit("--epochs must be at least 3 (staged unfreezing has three stages)")
    pre = {"checkpoint": str(WEIGHTS)}
    head = {"stages": [{"train": ["classifier"]}]}
    staged = {
        "stages": [
            {"epochs": max(1, e // 4), "train": ["classifier"]},
            {"epochs": max(1, e // 4), "train": ["blocks.4:", "head", "classifier"]},
            {"train": ["all"]},
        ],
        "cache_features": True,
    }
    configs = {
        "scratch": {},
        "head-only (cached features)": {"model": pre, "freeze": {**head, "cache_features": True}},
        "head-only": {"model": pre, "freeze": head},
        "staged unfreezing": {"model": pre, "freeze": staged, "optim": {"layer_decay": 0.7}},
        "full fine-tune": {"model": pre, "optim": {"lr": 1e-3}},
    }
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    rows = []
    for i, (name, extra) in enumerate(configs.items()):
        cfg = validate_recipe(recipe(f"{i}", args.out, e, args.size, extra), name)
        start = time.perf_counter()
        run_dir = run(cfg, console=Console(file=io.StringIO()))
        elapsed = time.perf_counter() - start
        report = json.loads((run_dir / "report.json").read_text())
        lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        val = report["splits"]["val"]["summary"]
        train_s = sum(m["train_time_s"] for m in lines)
        rows.append((name, val, report["best_epoch"], train_s, elapsed))
        print(f"{name}: mAP {val['map']:.3f}  train {train_s:.1f}s  total {elapsed:.1f}s", flush=True)
    table = Table(title=f"efficientnet_lite0 on coco-tiny (80 train / 80 val), {e} epochs at {args.size}px, CPU")
    for col in ("configuration", "val mAP", "macro-F1", "micro-F1", "best epoch", "train s", "total s"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for name, val, best, train_s, total in rows:
        table.add_row(
            name,
            f"{100 * val['map']:.1f}",
            f"{100 * val['macro_f1']:.1f}",
            f"{100 * val['micro_f1']:.1f}",
            str(best),
            f"{train_s:.1f}",
            f"{total:.1f}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
