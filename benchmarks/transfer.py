"""Transfer on real COCO: the linear probe vs every way the toolkit trains the same backbone, on held-out images.

    python benchmarks/transfer.py [--size 224] [--seeds 0,1,2] [--only flagship,LP-FT] [--sklearn-probe] [--out DIR]

A thin caller of ``finetune compare`` (it prints the equivalent command): every configuration below is a row of
one compare, beside the toolkit's linear-probe baseline at the same resolution and TTA, with paired bootstrap
intervals. ``--sklearn-probe`` adds scikit-learn's probe on the same draws, an implementation outside the toolkit.

Data: ../shared/data/coco-small (160 train, 158 val real COCO 2017 images, 80 categories) with the real ImageNet
weights of timm's ``efficientnet_lite0``. The 158 val images are split in two random halves, a new split per seed:
``val2017`` (79 images) selects checkpoints, picks the probe's C and fits thresholds; ``test2017`` (79 images) is
used for nothing but the numbers printed. No number in the table is read on an image used to train, select or
calibrate. Each configuration runs once per seed; the table gives mean and spread (min-max) over seeds.

- probe: scikit-learn ``LogisticRegression`` per class on frozen pooled features (C chosen on val mAP from
  0.01..1), thresholds calibrated on val like the toolkit's.
- flagship: ``recipes/coco_multilabel_focal.toml`` with only ``data.root``, ``model.name``, ``model.checkpoint``
  changed (and ``data.test`` naming the held-out half, read only for this table).
- the others: the same data, model and image size, changing only what their name says.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from finetune.config import load_recipe
from finetune.eval.metrics import summarize
from finetune.eval.thresholds import fit_thresholds
from finetune.runs import compare as cmp

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COCO_SMALL = SHARED / "data" / "coco-small"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0.imagenet.safetensors"
FLAGSHIP = ROOT / "recipes" / "coco_multilabel_focal.toml"
KEYS = ("map", "macro_f1", "macro_f1_cal", "micro_f1", "micro_f1_cal")


def make_root(out: Path, seed: int) -> Path:
    """coco-small with val2017 split in two random halves (per seed): val2017 / test2017 (annotations written)."""
    root = out / f"coco-small-split{seed}"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann = COCO_SMALL / "annotations"
    (root / "annotations" / "instances_train2017.json").write_text((ann / "instances_train2017.json").read_text())
    val = json.loads((ann / "instances_val2017.json").read_text())
    ids = np.random.default_rng(seed).permutation(sorted(im["id"] for im in val["images"])).tolist()
    for name, keep in (("val2017", set(ids[: len(ids) // 2])), ("test2017", set(ids[len(ids) // 2 :]))):
        part = {**val, "images": [im for im in val["images"] if im["id"] in keep]}
        part["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
        (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(part))
    for name, src in (("train2017", "train2017"), ("val2017", "val2017"), ("test2017", "val2017")):
        if not (root / name).exists():
            os.symlink(COCO_SMALL / src, root / name)
    return root


def _scores(targets: np.ndarray, probs: np.ndarray, cal: np.ndarray) -> dict[str, float]:
    fixed, calibrated = summarize(targets, probs, 0.5), summarize(targets, probs, cal)
    return {
        "map": fixed["map"],
        "macro_f1": fixed["macro_f1"],
        "macro_f1_cal": calibrated["macro_f1"],
        "micro_f1": fixed["micro_f1"],
        "micro_f1_cal": calibrated["micro_f1"],
    }


def probe(root: Path, size: int, seed: int, tta: bool = False) -> dict[str, float]:
    """scikit-learn per-class logistic regression on frozen pooled features; C and thresholds fitted on val.

    ``tta``: val and test logits averaged over each image and its mirror (as ``train.tta = "hflip"`` does).
    """
    from sklearn.linear_model import LogisticRegression

    from finetune.assembly import build_run
    from finetune.groups import layer_groups
    from finetune.hooks.feature_cache import extract_features
    from finetune.hooks.freezing import FreezePolicy, Stage

    recipe = load_recipe(
        FLAGSHIP,
        [
            f'data.root="{root}"',
            'data.test="test2017"',
            f"data.image_size={size}",
            'model.name="efficientnet_lite0"',
            "model.pretrained=false",
            f'model.checkpoint="{WEIGHTS}"',
            f"train.seed={seed}",
            "data.num_workers=2",
        ],
    )
    parts = build_run(recipe)
    model = parts.model
    groups = layer_groups(model, "efficientnet_lite0")
    policy = FreezePolicy(model, groups, [Stage(0, 1, ("classifier",))])
    feats, mirrored = {}, {}
    for role in parts.splits:
        loader = parts.loader(role)
        x, y = extract_features(policy, loader, device=torch.device("cpu"))
        feats[role] = (x.numpy(), y.numpy())
        if tta and role != "train":
            flipped = [{**b, "image": b["image"].flip(-1)} for b in loader]  # uint8 NCHW: mirror the width
            mirrored[role] = extract_features(policy, flipped, device=torch.device("cpu"))[0].numpy()
    (xt, yt), yv, ys = feats["train"], feats["val"][1], feats["test"][1]

    def scores(lr: LogisticRegression, role: str) -> np.ndarray:
        z = lr.decision_function(feats[role][0])
        if tta:
            z = (z + lr.decision_function(mirrored[role])) / 2
        return 1 / (1 + np.exp(-z))

    best = None
    for c in (0.01, 0.03, 0.1, 0.3, 1.0):
        pv, ps = np.zeros_like(yv), np.zeros_like(ys)
        for k in range(yt.shape[1]):
            if 0 < yt[:, k].sum() < len(yt):
                lr = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xt, yt[:, k])
                pv[:, k], ps[:, k] = scores(lr, "val"), scores(lr, "test")
        m = summarize(yv, pv)["map"]
        if best is None or m > best[0]:
            best = (m, c, pv, ps)
    _, c, pv, ps = best
    cal = fit_thresholds(yv, pv, min_positives=5).thresholds
    return {**_scores(ys, ps, cal), "c": c}


def configs(size: int) -> dict[str, list[str]]:
    """Overrides of the flagship recipe per configuration (the flagship itself has none)."""
    head = 'freeze.stages=[{train = ["classifier"], epochs = 20}]'
    old_staged = (
        'freeze.stages=[{epochs = 5, train = ["classifier"]}, {epochs = 5, train = ["blocks.4:"]}, {train = ["all"]}]'
    )
    return {
        "flagship (LP-FT + EMA + flip TTA)": [],
        "LP-FT (no EMA)": ["train.ema=0.0"],
        "flagship without flip TTA": ['train.tta="none"'],
        "flagship + stochastic depth 0.2": ["model.drop_path_rate=0.2"],
        "flagship + mixup 0.4": ["data.augment.mixup=0.4"],
        "flagship + probe C at most 0.1": ["freeze.solver_c=[0.01, 0.03, 0.1]"],
        "flagship + 3x the fine-tuning LRs": [
            'freeze.stages=[{train = ["classifier"], solver = "lbfgs"}, '
            '{epochs = 4, train = ["blocks.5:", "head", "classifier"], lr = 1e-3}, '
            '{train = ["all"], lr = 3e-4, layer_decay = 0.7}]'
        ],
        "flagship + whole-image resize instead of RandomResizedCrop": ['data.augment.crop="resize"'],
        "loss: focal (flagship otherwise)": ['loss.name="focal"'],
        "loss: ASL (flagship otherwise)": ['loss.name="asl"'],
        "head only, solver": [
            'freeze.stages=[{train = ["classifier"], solver = "lbfgs"}, '
            '{train = ["classifier"], epochs = 1, lr = 1e-12}]',  # one epoch that changes nothing: the run's report
            "freeze.cache_features=true",
            "train.epochs=1",
            "train.ema=0.0",
        ],
        "head only, AdamW epochs": [
            head,
            "train.epochs=20",
            "optim.lr=3e-3",
            "train.ema=0.0",
            "freeze.cache_features=true",
        ],
        "staged, random head": [
            old_staged,
            "train.epochs=15",
            "optim.lr=1e-3",
            "optim.lr_mult={}",
            "optim.layer_decay=0.7",
            "train.ema=0.0",
        ],
        "full fine-tune, random head": ["freeze.stages=[]", 'freeze.bn="none"', "optim.lr=1e-3", "train.ema=0.0"],
        "scratch": ["freeze.stages=[]", 'freeze.bn="none"', 'model.checkpoint=""', "optim.lr=3e-3", "train.ema=0.0"],
    }


def entries(size: int, wanted: list[str]) -> list[cmp.Entry]:
    """The flagship and its variants as ``finetune compare`` rows (labels: the configuration's first word(s))."""
    base = [
        f'data.root="{COCO_SMALL}"',
        'data.train="train2017"',
        'data.val="val2017"',
        'model.name="efficientnet_lite0"',
        "model.pretrained=false",
        f'model.checkpoint="{WEIGHTS}"',
        f"data.image_size={size}",
        "data.num_workers=2",
        "output.html=false",
    ]
    rows = []
    for name, extra in configs(size).items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        label = "".join(c if c.isalnum() else "-" for c in name.split(" (")[0].lower()).strip("-")
        rows.append(cmp.Entry(label, FLAGSHIP, [*base, *extra]))
    return cmp.with_probes(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma-separated configuration names (prefixes)")
    parser.add_argument("--sklearn-probe", action="store_true", help="also scikit-learn's probe (an outside check)")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/finetune-transfer") / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    if not COCO_SMALL.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {COCO_SMALL} and {WEIGHTS}")
    seeds = cmp.parse_seeds(args.seeds)
    rows = entries(args.size, [w for w in args.only.split(",") if w])
    base = next(r for r in rows if not r.label.startswith("probe-"))
    print("the same as: finetune compare " + " ".join(cmp.command_line(base, rows)), flush=True)
    result = cmp.compare(rows, seeds, args.out, args.resamples)
    print(cmp.markdown(result))
    if args.sklearn_probe:  # scikit-learn's LogisticRegression on the same draws: an implementation outside this one
        for seed in seeds:
            r = probe(make_root(args.out, seed), args.size, seed, tta=True)
            print(f"scikit-learn probe, flip TTA, seed {seed}: " + "  ".join(f"{k} {100 * r[k]:.1f}" for k in KEYS))


if __name__ == "__main__":
    main()
