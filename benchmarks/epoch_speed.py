"""A whole training epoch of ``finetune run`` (data loading included) vs the bare PyTorch loop on tensors in memory.

    python benchmarks/epoch_speed.py --data DIR [--images 2000] [--model mobilenetv2_reduced] [--size 32]
        [--batch 32] [--repeats 3] [--set KEY=VALUE ...]

``DIR`` is a class-folder dataset (``DIR/train/<class>/*``), e.g. the CIFAR-10 JPEG mirror or Imagenette
(../shared/data/REAL_DATA.md). The first ``--images`` training images (spread over the classes) are linked into a
temporary folder. Per round, in one process:

- **trainer**: ``run_recipe`` on them for one epoch (validation on 64 images); the rate is the epoch's own
  ``images_per_s`` from ``metrics.jsonl``: reading, decoding, augmenting and the loader's workers included;
- **bare**: the same architecture and initial weights, the same AdamW, loss, batch size, channels-last and
  precision, on the same images decoded, resized and normalised into one tensor beforehand: forward, backward, step.

Rounds alternate which runs first; the ratio trainer/bare is taken within each round and printed with its spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from finetune.allocator import reuse_freed_memory
from finetune.assembly import build_run
from finetune.config import load_recipe
from finetune.runs.run import run_recipe, seed_everything

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
[data]
format = "folder"
root = "{root}"
train = "train"
val = "val"
image_size = {size}
batch_size = {batch}
num_workers = 2
[data.augment]
crop = "resize"
hflip = 0.5
color_jitter = 0.0
normalize = "imagenet"
[model]
name = "{model}"
[loss]
name = "ce"
[optim]
name = "adamw"
lr = 1e-3
warmup_epochs = 0
[train]
epochs = 1
channels_last = true
[output]
dir = "{out}"
html = false
"""


def subset(data: Path, n: int, out: Path) -> None:
    """Link ``n`` training images (round-robin over the classes) and 64 for val into ``out``."""
    classes = sorted(p for p in (data / "train").iterdir() if p.is_dir())
    files = {c: sorted(c.iterdir()) for c in classes}
    for split, count, offset in (("train", n, 0), ("val", 64, n)):
        for i in range(count):
            c = classes[i % len(classes)]
            src = files[c][(offset + i) // len(classes)]
            dst = out / split / c.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)


def main() -> None:
    reuse_freed_memory()  # as `finetune run` does, for every measurement in this process
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="mobilenetv2_reduced")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="epoch_speed-"))
    subset(Path(args.data), args.images, tmp / "data")
    path = tmp / "recipe.toml"
    text = RECIPE.format(root=tmp / "data", size=args.size, batch=args.batch, model=args.model, out=tmp / "runs")
    path.write_text(text)
    quiet = Console(quiet=True)

    def trainer(r: int) -> float:
        recipe = load_recipe(path, [*args.set, f'output.name="r{r}"'])
        run = run_recipe(recipe, console=quiet)
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["images_per_s"]

    recipe = load_recipe(path, args.set)
    parts = build_run(recipe)
    s = parts.fit_settings
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in parts.normalization)
    images = []
    for p in parts.splits["train"].image_paths:
        img = Image.open(p).convert("RGB").resize((args.size, args.size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1))
    x_all = ((torch.stack(images).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
    y_all = torch.from_numpy(parts.splits["train"].targets.argmax(1))

    def bare() -> float:
        seed_everything(0)
        model = build_run(recipe).place(for_training=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=recipe.optim.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        n = len(x_all) // args.batch * args.batch  # the trainer drops the last partial batch too
        start = time.perf_counter()
        for i in range(0, n, args.batch):
            loss = loss_fn(model(x_all[i : i + args.batch]), y_all[i : i + args.batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return n / (time.perf_counter() - start)

    bare()  # warm-up
    pairs = []
    for r in range(args.repeats):
        if r % 2 == 0:
            b = bare()
            t = trainer(r)
        else:
            t = trainer(r)
            b = bare()
        pairs.append((b, t))
        print(f"round {r + 1}: bare {b:.1f} img/s, trainer {t:.1f} img/s, ratio {t / b:.3f}", flush=True)
    ratios = sorted(t / b for b, t in pairs)
    print(
        f"{args.model} {args.size}px batch {args.batch}, {args.images} images, {s.precision}, "
        f"{torch.get_num_threads()} threads: trainer/bare {statistics.median(ratios):.3f} "
        f"(min {ratios[0]:.3f}, max {ratios[-1]:.3f}, {args.repeats} rounds)"
    )


if __name__ == "__main__":
    main()
