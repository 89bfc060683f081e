"""Unknown labels on real COCO: training with 30% of the labels "not checked", masked vs written as negatives.

    python benchmarks/unknown_labels.py [--size 224] [--seeds 0,1,2] [--unknown 0.3] [--out DIR]

Data: ../shared/data/coco-small with efficientnet_lite0's ImageNet weights, split per seed as ``transfer.py`` does
(160 train; the 158 val images in two halves: val selects and calibrates, test is read only for the table). A
share ``--unknown`` of the (image, class) entries of train and val is drawn at random and hidden, as Open Images'
"not verified" labels are; the test half keeps every label, so both runs are scored against the truth. Two CSV
files (class-column form) hold the same images and labels:

- ``masked``: a hidden entry is an empty cell: unknown, left out of the loss, the probe, selection and calibration;
- ``negatives``: a hidden entry is written 0, what a loader without unknown labels has to do (a hidden positive
  becomes a false negative).

Both train the flagship recipe's schedule, shortened (probe, 4 epochs of the top blocks, then 2 of everything).
The masked run is also checked: its val AP per class in report.json equals scikit-learn's AP on that class's known
val rows, from the run's own predictions.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from sklearn.metrics import average_precision_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import COCO_SMALL, FLAGSHIP, WEIGHTS, make_root  # noqa: E402

from finetune.assembly import build_run  # noqa: E402
from finetune.config import load_recipe  # noqa: E402
from finetune.runs.predict import predict_run  # noqa: E402
from finetune.runs.run import run_recipe  # noqa: E402

SCHEDULE = [
    "train.epochs=6",
    'freeze.stages=[{train = ["classifier"], solver = "lbfgs"}, '
    '{epochs = 4, train = ["blocks.5:", "head", "classifier"], lr = 3e-4}, '
    '{train = ["all"], lr = 1e-4, layer_decay = 0.7}]',
]
ROLES = {"train": "train2017", "val": "val2017", "test": "test2017"}


def write_csvs(root: Path, seed: int, share: float) -> tuple[list[str], dict[str, Path], float]:
    """Write ``masked.csv`` and ``negatives.csv`` in ``root``; returns the classes, the files, the share hidden."""
    sets = [f'data.root="{root}"', 'data.test="test2017"']
    splits = build_run(load_recipe(FLAGSHIP, sets)).splits
    names = list(splits["train"].classes.names)
    rng = np.random.default_rng(1000 + seed)
    files = {kind: root / f"{kind}.csv" for kind in ("masked", "negatives")}
    hidden = total = 0
    with contextlib.ExitStack() as stack:
        writers = {kind: csv.writer(stack.enter_context(path.open("w", newline=""))) for kind, path in files.items()}
        for w in writers.values():
            w.writerow(["path", *names, "split"])
        for role, folder in ROLES.items():
            s = splits[role]
            for path, row in zip(s.image_paths, s.targets):
                hide = rng.random(len(row)) < share if role != "test" else np.zeros(len(row), dtype=bool)
                hidden, total = hidden + hide.sum(), total + (len(row) if role != "test" else 0)
                rel = f"{folder}/{Path(path).name}"
                writers["masked"].writerow([rel, *("" if h else str(int(v)) for h, v in zip(hide, row)), folder])
                writers["negatives"].writerow([rel, *("0" if h else str(int(v)) for h, v in zip(hide, row)), folder])
    return names, files, hidden / total


def train(root: Path, out: Path, names: list[str], csv_file: Path, size: int, seed: int) -> tuple[Path, dict]:
    sets = [
        f'data.root="{root}"',
        'data.format="csv"',
        f'data.csv="{csv_file}"',
        f"data.classes={json.dumps(names)}",
        'data.train="train2017"',
        'data.val="val2017"',
        'data.test="test2017"',
        'model.name="efficientnet_lite0"',
        "model.pretrained=false",
        f'model.checkpoint="{WEIGHTS}"',
        f"train.seed={seed}",
        f"data.image_size={size}",
        "data.num_workers=2",
        "output.html=false",
        f'output.dir="{out}"',
        f'output.name="{csv_file.stem}-{size}-s{seed}-{time.time_ns()}"',
        *SCHEDULE,
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = run_recipe(load_recipe(FLAGSHIP, sets), console=Console(file=io.StringIO()))
    return run_dir, json.loads((run_dir / "report.json").read_text())


def known_ap_gap(run_dir: Path, report: dict) -> float:
    """Largest gap between report.json's val AP and scikit-learn's AP on each class's known val rows."""
    with contextlib.redirect_stdout(io.StringIO()):
        outs, _ = predict_run(run_dir, ["val"], console=Console(file=io.StringIO()))
    y, p = outs["val"]["targets"], outs["val"]["probs"]
    gaps = []
    for c, row in enumerate(report["splits"]["val"]["per_class"]):
        rows = ~np.isnan(y[:, c])
        if y[rows, c].sum() > 0:
            gaps.append(abs(row["ap"] - average_precision_score(y[rows, c], p[rows, c])))
    return max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--unknown", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/finetune-unknown") / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    if not COCO_SMALL.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {COCO_SMALL} and {WEIGHTS}")
    rows: dict[str, list[dict[str, float]]] = {"masked": [], "negatives": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        root = make_root(args.out, seed)
        names, files, share = write_csvs(root, seed, args.unknown)
        for kind, path in files.items():
            start = time.perf_counter()
            run_dir, report = train(root, args.out, names, path, args.size, seed)
            test = report["splits"]["test"]
            r = {
                "map": test["summary"]["map"],
                "macro_f1_cal": test["calibrated"]["summary"]["macro_f1"],
                "micro_f1_cal": test["calibrated"]["summary"]["micro_f1"],
                "val_unknown": report["splits"]["val"].get("unknown", 0),
            }
            if kind == "masked":
                r["ap_gap"] = known_ap_gap(run_dir, report)
            rows[kind].append(r)
            gap = f"  val AP vs sklearn on known rows: max gap {r['ap_gap']:.1e}" if "ap_gap" in r else ""
            print(
                f"seed {seed} {kind:9s} ({100 * share:.0f}% hidden; val unknown {r['val_unknown']}): test mAP "
                f"{100 * r['map']:.1f}  macro-F1 cal {100 * r['macro_f1_cal']:.1f}  micro-F1 cal "
                f"{100 * r['micro_f1_cal']:.1f}  {time.perf_counter() - start:.0f}s{gap}",
                flush=True,
            )
    print(f"\n| hidden labels ({100 * args.unknown:.0f}%) | test mAP | macro-F1 cal | micro-F1 cal |")
    print("|---|---:|---:|---:|")
    for kind, rs in rows.items():
        cells = []
        for k in ("map", "macro_f1_cal", "micro_f1_cal"):
            v = [100 * r[k] for r in rs]
            cells.append(f"{statistics.mean(v):.1f} ({min(v):.1f}-{max(v):.1f})")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    diffs = [100 * (m["map"] - n["map"]) for m, n in zip(rows["masked"], rows["negatives"])]
    print(f"\nmasked - negatives, test mAP per seed: {', '.join(f'{d:+.1f}' for d in diffs)}")


if __name__ == "__main__":
    main()
