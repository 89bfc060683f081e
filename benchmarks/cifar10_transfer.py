"""Issue 34's target: ``recipes/cifar10_transfer.toml`` on the real CIFAR-10, over seeds, its linear probe beside it.

    python benchmarks/cifar10_transfer.py --cifar DIR [--seeds 0,1] [--out runs/cifar10_transfer]
        [--weights ../shared/weights/efficientnet_lite0.imagenet.safetensors] [--set KEY=VALUE ...]

Per seed, one ``finetune run`` of the recipe as a user runs it (a subprocess, timed from start to exit: the cached
maps' extraction, the probe, training, validation and the final report all included), with ``train.seed`` and the
held-out draw (``data.holdout.seed``) set to the seed. The val role is a stratified 10 % of the 50,000 train images;
the 10,000 test images are read only for the numbers below.

The linear-probe row scores the probe the run solved first (``RUN/probe.safetensors``: the classifier on the
ImageNet backbone's pooled features, C picked on val) on the same test images, through the starting network; that
pass is outside the run's wall time. The paper's best from-scratch result (Table 4, 60 epochs, GPU) is 90.63 %.
A run already in ``--out`` is read back, not trained again.
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

import torch
from safetensors.torch import load_file

from finetune.assembly import build_run
from finetune.config import load_recipe
from finetune.eval.predict import predict_loader

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cifar10_transfer.toml"
PAPER_BEST = 90.63


def overrides(args: argparse.Namespace, seed: int) -> list[str]:
    """The ``--set`` values of one seed's run."""
    return [
        f'data.root="{args.cifar}"',
        f'model.checkpoint="{args.weights}"',
        f'output.dir="{args.out}"',
        f'output.name="seed{seed}"',
        f"train.seed={seed}",
        f"data.holdout.seed={seed}",
        *args.set,
    ]


def run(args: argparse.Namespace, seed: int) -> float:
    """Train one seed (unless its report exists); the wall time in seconds."""
    run_dir = Path(args.out) / f"seed{seed}"
    timing = Path(args.out) / f"seed{seed}.wall_s"
    if (run_dir / "report.json").is_file() and timing.is_file():
        return float(timing.read_text())
    cmd = [sys.executable, "-m", "finetune", "run", str(RECIPE)]
    for s in overrides(args, seed):
        cmd += ["--set", s]
    start = time.perf_counter()
    with (Path(args.out) / f"seed{seed}.log").open("w") as log:
        code = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "160"}
        ).returncode
    wall = time.perf_counter() - start
    if code:
        sys.exit(f"seed {seed}: finetune run exited {code}; see {args.out}/seed{seed}.log")
    timing.write_text(f"{wall:.1f}\n")
    return wall


def probe_top1(args: argparse.Namespace, seed: int) -> float:
    """Test top-1 (%) of the run's solved probe on the starting network."""
    run_dir = Path(args.out) / f"seed{seed}"
    parts = build_run(load_recipe(RECIPE, overrides(args, seed)), roles=("test",))
    model = parts.place()
    head = load_file(run_dir / "probe.safetensors")
    with torch.no_grad():
        model.get_classifier().weight.copy_(head["weight"])
        model.get_classifier().bias.copy_(head["bias"])
    out = predict_loader(model, parts.loader("test"), parts.eval_settings)
    return 100 * float((out["probs"].argmax(1) == out["targets"].argmax(1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cifar", required=True, help="CIFAR-10 JPEG folders (train/, test/)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="runs/cifar10_transfer")
    parser.add_argument(
        "--weights", default=str(ROOT.parent / "shared/weights/efficientnet_lite0.imagenet.safetensors")
    )
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    args.out = str(Path(args.out).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        wall = run(args, seed)
        report = json.loads((Path(args.out) / f"seed{seed}" / "report.json").read_text())
        test = 100 * report["splits"]["test"]["summary"]["top1"]
        val = 100 * report["splits"]["val"]["summary"]["top1"]
        rows.append({"seed": seed, "test_top1": test, "val_top1": val, "wall_s": wall, "probe": probe_top1(args, seed)})
        print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nrecipes/cifar10_transfer.toml on CIFAR-10 ({torch.get_num_threads()} threads); paper Table 4: {PAPER_BEST}"
    )
    print("| seed | linear probe, test top-1 | transfer recipe, test top-1 | val top-1 | wall time |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [
            str(r["seed"]),
            *(f"{r[k]:.2f}" for k in ("probe", "test_top1", "val_top1")),
            f"{r['wall_s'] / 60:.1f} min",
        ]
        print(f"| {' | '.join(cells)} |")
    if len(rows) > 1:
        mean = statistics.mean(r["test_top1"] for r in rows)
        print(f"| mean | {statistics.mean(r['probe'] for r in rows):.2f} | {mean:.2f} | | |")
    (Path(args.out) / "cifar10_transfer.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
