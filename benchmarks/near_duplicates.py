"""Near duplicates: imagehash's phash (what ``validate --check-images`` uses) vs cosine on pooled backbone features.

Copies of coco-small train images are planted beside the 318 real images, made three ways: ``resized`` (half size,
JPEG quality 70), ``cropped`` (a random 80-90% crop, resized back, JPEG 80) and ``flipped+bright`` (mirrored, 20%
brighter, JPEG 80). Every pair of images is scored by both methods; a planted copy and its original are the true
pairs, every other pair is a false one. For each method the threshold is set where it admits a given number of false
pairs (0, 1, 5), and the share of true pairs found there is printed: the comparison at equal false positives.

    python benchmarks/near_duplicates.py [--copies 40] [--seed 0]

Features: timm's efficientnet_lite0 with its ImageNet weights from ``../shared`` (pooled, L2-normalised, 224 px).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import imagehash
import numpy as np
import timm
import torch
from PIL import Image, ImageEnhance, ImageOps
from rich.console import Console
from rich.table import Table

from finetune.models import load_weights

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO_SMALL = SHARED / "data" / "coco-small"
WEIGHTS = SHARED / "weights" / "efficientnet_lite0.imagenet.safetensors"
KINDS = ("resized", "cropped", "flipped+bright")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def plant(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate of ``img`` made the ``kind`` way."""
    w, h = img.size
    if kind == "resized":
        return _jpeg(img.resize((w // 2, h // 2)), 70)
    if kind == "cropped":
        s = rng.uniform(0.8, 0.9)
        x, y = rng.integers(0, int(w * (1 - s)) + 1), rng.integers(0, int(h * (1 - s)) + 1)
        return _jpeg(img.crop((x, y, x + int(w * s), y + int(h * s))).resize((w, h)), 80)
    return _jpeg(ImageEnhance.Brightness(ImageOps.mirror(img)).enhance(1.2), 80)


@torch.no_grad()
def features(images: list[Image.Image]) -> np.ndarray:
    """Pooled efficientnet_lite0 features, L2-normalised."""
    model = timm.create_model("efficientnet_lite0")
    load_weights(model, WEIGHTS)
    model.reset_classifier(0)  # pooled features out
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**{**cfg, "input_size": (3, 224, 224), "crop_pct": 1.0})
    out = []
    for start in range(0, len(images), 32):
        batch = torch.stack([tf(im) for im in images[start : start + 32]])
        out.append(torch.nn.functional.normalize(model(batch), dim=1).numpy())
    return np.concatenate(out)


def recall_at(scores: np.ndarray, true: np.ndarray, false_allowed: int) -> float:
    """Share of true pairs scored above the ``false_allowed + 1``-th highest false pair (higher = more alike)."""
    false_scores = np.sort(scores[~true])[::-1]
    bar = false_scores[false_allowed] if false_allowed < len(false_scores) else -np.inf
    return float((scores[true] > bar).mean())


def main() -> None:  # noqa: D103
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=40, help="planted copies per kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    paths = sorted((COCO_SMALL / "train2017").glob("*.jpg")) + sorted((COCO_SMALL / "val2017").glob("*.jpg"))
    images = [Image.open(p).convert("RGB") for p in paths]
    n_real, originals, kinds = len(images), [], []
    train = [i for i, p in enumerate(paths) if p.parent.name == "train2017"]
    for kind in KINDS:
        for i in rng.choice(train, args.copies, replace=False):
            images.append(plant(images[i], kind, rng))
            originals.append(int(i))
            kinds.append(kind)
    t0 = time.perf_counter()
    bits = np.array([imagehash.phash(im).hash.flatten() for im in images], dtype=np.int16)
    hamming = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    f = features(images)
    cosine = f @ f.T
    t_feat = time.perf_counter() - t0
    iu = np.triu_indices(len(images), 1)
    group = np.array(list(range(n_real)) + originals)  # a copy belongs to its original: copies of one are alike too
    same = (group[:, None] == group[None, :])[iu]
    kind_of = np.array([""] * n_real + kinds, dtype=object)[iu[1]]  # the later image of a pair is the copy, if any
    real_first = iu[0] < n_real
    table = Table(title=f"{n_real} coco-small images + {len(originals)} planted copies: true pairs found")
    for col in ("copies", "method", "0 false pairs", "1 false pair", "5 false pairs"):
        table.add_column(col, justify="left" if col in ("copies", "method") else "right")
    for kind in (*KINDS, "all"):
        # a kind's row: its (original, copy) pairs against every pair of two different pictures
        sel = same & real_first & ((kind_of == kind) if kind != "all" else True)
        keep = sel | ~same
        for name, scores in (("phash (-bits)", -hamming[iu]), ("lite0 cosine", cosine[iu])):
            s, t = scores[keep], sel[keep]
            table.add_row(kind, name, *(f"{100 * recall_at(s, t, k):.0f}%" for k in (0, 1, 5)))
    Console().print(table)
    false_top = np.sort(cosine[iu][~same])[::-1][:6]
    true_cos = cosine[iu][same & real_first]
    print(f"cosine of the most alike different pictures: {', '.join(f'{c:.3f}' for c in false_top)}")
    print(f"cosine of planted pairs: min {true_cos.min():.3f}, 10th percentile {np.percentile(true_cos, 10):.3f}")
    print(f"phash: {t_hash:.1f} s for {len(images)} images; lite0 features: {t_feat:.1f} s (2 CPU cores)")


if __name__ == "__main__":
    main()
