"""The single-label reject option on real images: does "accuracy >= target" on val hold on images it never saw?

    python benchmarks/reject_option.py [--size 224] [--seeds 0,1,2] [--target 0.9] [--out DIR]

Data: ../shared/data/coco-small as a single-label problem: an image's label is the COCO supercategory covering the
largest total box area in it, kept when that is one of the six frequent ones (person, furniture, vehicle, animal,
appliance, electronic): 134 train and 132 val images of real COCO photos, as an image-folder dataset (symlinks).
Per seed the val images are split in two random halves: val (checkpoints, the temperature and the reject
threshold) and test (read only for this table). The model is efficientnet_lite0 with its ImageNet weights, trained
with the flagship schedule shortened (probe, 4 epochs of the top blocks, 2 of everything) and cross-entropy, with
``calibrate.objective = "accuracy_at_least"`` and ``calibrate.probabilities = "temperature"``.

Printed per seed: test top-1 when answering every image; the reject threshold; on test, the share answered and
the accuracy of the answered ones; the top-label ECE before and after the temperature.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import COCO_SMALL, FLAGSHIP, WEIGHTS  # noqa: E402

from finetune.config import load_recipe  # noqa: E402
from finetune.runs.run import run_recipe  # noqa: E402

KEEP = ("person", "furniture", "vehicle", "animal", "appliance", "electronic")
SCHEDULE = [
    "train.epochs=6",
    'freeze.stages=[{train = ["classifier"], solver = "lbfgs"}, '
    '{epochs = 4, train = ["blocks.5:", "head", "classifier"], lr = 3e-4}, '
    '{train = ["all"], lr = 1e-4, layer_decay = 0.7}]',
]


def main_supercategory(split: str) -> dict[str, str]:
    """File name -> the supercategory with the largest total box area in the image (if one of :data:`KEEP`)."""
    doc = json.loads((COCO_SMALL / "annotations" / f"instances_{split}.json").read_text())
    sup = {c["id"]: c["supercategory"] for c in doc["categories"]}
    area: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for a in doc["annotations"]:
        area[a["image_id"]][sup[a["category_id"]]] += a["area"]
    out = {}
    for im in doc["images"]:
        if area[im["id"]]:
            top = area[im["id"]].most_common(1)[0][0]
            if top in KEEP:
                out[im["file_name"]] = top
    return out


def make_root(out: Path, seed: int) -> tuple[Path, dict[str, int]]:
    """``root/{train,val,test}/<supercategory>/<image>`` as symlinks; val and test are random halves of val2017."""
    root = out / f"coco-small-single-split{seed}"
    train, val = main_supercategory("train2017"), main_supercategory("val2017")
    names = sorted(val)
    order = np.random.default_rng(seed).permutation(len(names))
    halves = {"val": [names[i] for i in order[: len(names) // 2]], "test": [names[i] for i in order[len(names) // 2 :]]}
    layout = {"train": [(n, train[n], "train2017") for n in sorted(train)]}
    layout.update({role: [(n, val[n], "val2017") for n in files] for role, files in halves.items()})
    for role, rows in layout.items():
        for name, label, folder in rows:
            link = root / role / label / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(COCO_SMALL / folder / name, link)
    return root, {role: len(rows) for role, rows in layout.items()}


def train(root: Path, out: Path, size: int, seed: int, target: float) -> dict:
    sets = [
        f'data.root="{root}"',
        'data.format="folder"',
        'data.train="train"',
        'data.val="val"',
        'data.test="test"',
        'loss.name="ce"',
        'train.select="top1"',
        'model.name="efficientnet_lite0"',
        "model.pretrained=false",
        f'model.checkpoint="{WEIGHTS}"',
        f"train.seed={seed}",
        f"data.image_size={size}",
        "data.num_workers=2",
        'calibrate.objective="accuracy_at_least"',
        f"calibrate.target={target}",
        'calibrate.probabilities="temperature"',
        "output.html=false",
        f'output.dir="{out}"',
        f'output.name="reject-{size}-s{seed}-{time.time_ns()}"',
        *SCHEDULE,
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = run_recipe(load_recipe(FLAGSHIP, sets), console=Console(file=io.StringIO()))
    return json.loads((run_dir / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("/tmp/finetune-reject") / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    if not COCO_SMALL.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {COCO_SMALL} and {WEIGHTS}")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        root, sizes = make_root(args.out, seed)
        start = time.perf_counter()
        report = train(root, args.out, args.size, seed, args.target)
        r, p = report["reject"], report["probabilities"]
        row = {
            "top1": report["splits"]["test"]["summary"]["top1"],
            "threshold": r["threshold"],
            "fit_coverage": r["fitting"]["coverage"],
            "coverage": r["held_out"]["coverage"],
            "accuracy": r["held_out"]["accuracy"],
            "met": r["held_out"]["met"],
            "ece_before": p["before"]["ece"],
            "ece_after": p["after"]["ece"],
        }
        rows.append(row)
        print(
            f"seed {seed} ({sizes}): test top-1 {100 * row['top1']:.1f}; reject below {row['threshold']:.3f} "
            f"(val coverage {100 * row['fit_coverage']:.0f}%); test: answers {100 * row['coverage']:.0f}% at "
            f"accuracy {100 * row['accuracy']:.1f}% (target {100 * args.target:.0f}%: "
            f"{'met' if row['met'] else 'missed'}); top-label ECE {row['ece_before']:.3f} -> {row['ece_after']:.3f}"
            f"  {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    head = f"| seeds | top-1, all answered | answered | accuracy answered | met {args.target:g} | ECE before -> after |"
    print("\n" + head)
    print("|---|---:|---:|---:|---:|---:|")

    def mean(k: str) -> float:
        return statistics.mean(r[k] for r in rows)

    print(
        f"| {len(rows)} | {100 * mean('top1'):.1f} | {100 * mean('coverage'):.0f}% | {100 * mean('accuracy'):.1f} | "
        f"{sum(r['met'] for r in rows)}/{len(rows)} | {mean('ece_before'):.3f} -> {mean('ece_after'):.3f} |"
    )


if __name__ == "__main__":
    main()
