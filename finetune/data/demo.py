"""Embedded demo data: a deterministic, synthetic COCO-format multi-label dataset.

Scenes of 0-4 textured shapes (10 categories) on noisy backgrounds, written as JPEG files plus
``annotations/instances_{split}.json`` with real boxes and polygons, so the whole COCO path is exercised on a
machine with no data. Category ids have gaps (like COCO's 1..90) so the id <-> index mapping is exercised too.

It is made to behave like real multi-label data where per-class thresholds matter (the seed blog's MobileNetV2 on
COCO: precision 87, recall 46 at 0.5). The target splits (train, val, test) are long-tailed, the rarest class in
about 3 % of the images; rare classes co-occur with a common partner (a crescent with a star, as a mouse with a
keyboard); and about a quarter of the objects are hard to see, small or faint, but labelled all the same, as COCO
labels a cup half hidden behind a laptop. The "source" split that stands in for ImageNet is balanced, as ImageNet
is, so the pretrained backbone knows every shape and the fine-tuned head's prior is what holds the rare classes'
probabilities down. A class's F1-optimal threshold then falls below 0.5 (for calibrated probabilities it is half
the F1 the class reaches), and a per-class threshold fitted on val gains on test.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from finetune.io import atomic_write_text

# (COCO id, name, share of the objects drawn on their own): the last classes are rare on purpose.
CATEGORIES: tuple[tuple[int, str, float], ...] = (
    (1, "circle", 0.20),
    (2, "square", 0.18),
    (3, "triangle", 0.15),
    (5, "star", 0.13),
    (6, "cross", 0.11),
    (8, "ring", 0.08),
    (10, "diamond", 0.07),
    (11, "hexagon", 0.03),
    (13, "crescent", 0.01),
    (15, "arrow", 0.005),
)
# Shapes only the "source" split has, as ImageNet has classes a user's data does not: the pretrained run's classifier
# then has 12 outputs, and fine-tuning starts a fresh head for the 10 target classes, as it would from ImageNet.
SOURCE_ONLY: tuple[tuple[int, str, float], ...] = ((20, "pentagon", 0.0), (21, "ellipse", 0.0))
# A class drawn brings its partner into the scene with this probability: the rare classes mostly come with a common
# one, so the context is evidence for them, and a similar shape (hexagon beside circle) is a confuser.
PARTNERS = {"star": ("crescent", 0.12), "square": ("arrow", 0.06), "triangle": ("hexagon", 0.10)}
# Shares of the objects drawn small (radius 6-12 % of the side, log-uniform: from a blob to a clear shape) or faint
# (30-60 % opacity). The hardest are all but unreadable at the training size, and their colour (near the
# class's hue, not always) is only partial evidence: such positives get middling probabilities however good the
# model is, which is what puts a class's best threshold below 0.5.


@dataclass(frozen=True)
class Profile:
    """How a split's scenes are drawn.

    Attributes:
        shares: Each class's share of the objects drawn on their own (the pool's order).
        partners: A class drawn brings its partner with this probability.
        small: The share of objects drawn small.
        faint: The share of objects drawn faint.
        hue_noise: The spread of an object's hue around its class's (classes sit 0.1 apart).
        random_hue: How often an object takes any hue.
        source_only: Whether the pool has the source-only classes too.
    """

    shares: tuple[float, ...]
    partners: dict[str, tuple[str, float]] = field(default_factory=dict)
    small: float = 0.0
    faint: float = 0.0
    hue_noise: float = 0.02
    random_hue: float = 0.1
    source_only: bool = False


LONG_TAIL = Profile(tuple(c[2] for c in CATEGORIES), PARTNERS, 0.25, 0.2, 0.035, 0.15)
# The "source" split (the stand-in for ImageNet pretraining) is balanced, as ImageNet is: every class equally often,
# no partners, so the backbone knows the rare shapes; the long tail is the target data's (train, val, test).
BALANCED_SOURCE = Profile((1.0,) * (len(CATEGORIES) + len(SOURCE_ONLY)), {}, 0.25, 0.2, 0.035, 0.15, True)
# The first demo data (0.7 and before, and the tests' tiny data): every object clearly visible, a milder imbalance,
# no partners, one pool for every split. A model is sure of nearly everything, so 0.5 is about as good as any
# threshold: it shows training, not calibration.
EASY = Profile((0.20, 0.17, 0.14, 0.12, 0.10, 0.08, 0.07, 0.055, 0.035, 0.02))
PROFILES = {"long-tail": (LONG_TAIL, BALANCED_SOURCE), "easy": (EASY, EASY)}  # name -> (target splits, source)
OBJECT_COUNT_P = (0.08, 0.30, 0.30, 0.20, 0.12)  # P(0..4 objects in an image)
# "source" is a disjoint set of scenes for recipes/demo_pretrain.toml (the stand-in for ImageNet pretraining);
# it comes last so train/val/test are the same images with or without it.
DEFAULT_SPLITS = {"train": 2200, "val": 600, "test": 600, "source": 2200}


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _shape(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Outer polygon (and a hole, for ring and crescent) in unit coordinates, roughly inside [-1, 1]^2."""
    if name == "circle":
        return _regular(32), None
    if name == "square":
        return _regular(4, math.sqrt(2), math.pi / 4), None
    if name == "triangle":
        return _regular(3, 1.15, -math.pi / 2) + [0, 0.2], None
    if name == "star":
        outer, inner = _regular(5, 1.0, -math.pi / 2), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], 1).reshape(-1, 2), None
    if name == "cross":
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t)]
        pts += [(-1, -t), (-t, -t)]
        return np.array(pts, float), None
    if name == "ring":
        return _regular(32), _regular(32, 0.55)
    if name == "diamond":
        return _regular(4, 1.0) * [0.65, 1.0], None
    if name == "hexagon":
        return _regular(6), None
    if name == "crescent":
        return _regular(32), _regular(32, 0.85) + [0.45, -0.1]
    if name == "pentagon":
        return _regular(5, 1.0, -math.pi / 2), None
    if name == "ellipse":
        return _regular(32) * [0.5, 1.0], None
    if name == "arrow":
        pts = [(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)]
        return np.array(pts, float), None
    raise ValueError(name)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return 255 * np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _texture(rng: np.random.Generator, h: int, w: int, hue: float, profile: Profile) -> np.ndarray:
    """An HxWx3 float fill: solid, stripes, dots, checker or gradient, mostly in colours near the class's hue.

    Real classes have colour priors (bananas are yellow); some objects ignore theirs, so colour is only evidence.
    """
    if rng.random() < profile.random_hue:
        hue = rng.random()
    c1 = _hsv_to_rgb((hue + rng.normal(0, profile.hue_noise)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    c2 = _hsv_to_rgb((hue + rng.normal(0, profile.hue_noise)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.25, 0.6))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(5)
    period = rng.uniform(7, 14)  # coarse enough to survive the resize to the training size without aliasing
    if kind == 0:
        m = np.zeros((h, w), np.float32)
    elif kind == 1:
        ang = rng.uniform(0, math.pi)
        m = (np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        m = ((np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period)) > 0.5).astype(np.float32)
    elif kind == 3:
        m = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    else:
        m = xx / max(w - 1, 1)
    return c1 * (1 - m[..., None]) + c2 * m[..., None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = rng.uniform(50, 200)
    base = grey + rng.uniform(-25, 25, 3)  # muted backgrounds: colour belongs to the objects
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grad = rng.uniform(-40, 40, 3)
    img = base + grad * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    img = img + rng.normal(0, rng.uniform(6, 22), (size, size, 3))
    return img


def _place(
    rng: np.random.Generator, size: int, cat: int, taken: np.ndarray, small: bool, tries: int = 8
) -> tuple[np.ndarray, np.ndarray] | None:
    """A random pose for one shape that stays inside the image and overlaps no earlier shape (mask, outline)."""
    outer, hole = _shape((*CATEGORIES, *SOURCE_ONLY)[cat][1])
    for _ in range(tries):
        radius = (math.exp(rng.uniform(math.log(0.06), math.log(0.12))) if small else rng.uniform(0.14, 0.26)) * size
        ang = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        aspect = np.array([rng.uniform(0.8, 1.25), 1.0])
        centre = rng.uniform(radius, size - radius, 2)
        outer_px = (outer * aspect) @ rot.T * radius + centre
        mask_img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask_img)
        draw.polygon([tuple(p) for p in outer_px], fill=255)
        if hole is not None:
            draw.polygon([tuple(p) for p in (hole * aspect) @ rot.T * radius + centre], fill=0)
        mask = np.asarray(mask_img) > 0
        if mask.sum() >= 12 and not (mask & _grow(taken)).any():
            return mask, outer_px
    return None


def _grow(mask: np.ndarray, px: int = 2) -> np.ndarray:
    """``mask`` dilated by ``px`` pixels (a gap between shapes keeps their outlines apart)."""
    out = mask.copy()
    for dy in range(-px, px + 1):
        for dx in range(-px, px + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _pool(profile: Profile) -> tuple[tuple[int, str, float], ...]:
    return (*CATEGORIES, *SOURCE_ONLY) if profile.source_only else CATEGORIES


def _categories(rng: np.random.Generator, profile: Profile) -> list[int]:
    """The category indices of one scene: 0-4 drawn by their shares, each maybe followed by its partner (4 at most)."""
    shares, names = np.array(profile.shares), [c[1] for c in _pool(profile)]
    n = rng.choice(len(OBJECT_COUNT_P), p=OBJECT_COUNT_P)
    cats: list[int] = []
    for _ in range(n):
        cat = int(rng.choice(len(shares), p=shares / shares.sum()))
        cats.append(cat)
        partner, p = profile.partners.get(names[cat], ("", 0.0))
        if rng.random() < p:
            cats.append(names.index(partner))
    return cats[: len(OBJECT_COUNT_P) - 1]


def _objects(rng: np.random.Generator, profile: Profile) -> Iterator[tuple[int, bool, float]]:
    """``(category, small, opacity)`` per object, drawn as the scene is painted.

    The easy profile draws each class just before its object is placed, as the first demo did, so its images are
    the same bytes as then (the tests' tiny data and the run fixture made on it rely on that).
    """
    if profile is EASY:
        shares = np.array(profile.shares)
        for _ in range(rng.choice(len(OBJECT_COUNT_P), p=OBJECT_COUNT_P)):
            yield int(rng.choice(len(shares), p=shares / shares.sum())), False, 1.0
        return
    for cat in _categories(rng, profile):
        small = rng.random() < profile.small
        yield cat, small, (rng.uniform(0.3, 0.6) if rng.random() < profile.faint else 1.0)


def render_scene(
    rng: np.random.Generator, size: int = 128, profile: Profile = LONG_TAIL
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one scene; return the uint8 image and its objects (category index, bbox, polygon, area)."""
    img = _background(rng, size)
    objects: list[dict[str, Any]] = []
    taken = np.zeros((size, size), bool)
    for cat, small, alpha in _objects(rng, profile):
        placed = _place(rng, size, cat, taken, small)
        if placed is None:  # no free spot: a labelled object is never hidden under another one
            continue
        mask, outer_px = placed
        taken |= mask
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        tex = _texture(rng, y1 - y0, x1 - x0, cat / len(CATEGORIES) % 1.0, profile)
        region = img[y0:y1, x0:x1]
        m = mask[y0:y1, x0:x1]
        region[m] = (1 - alpha) * region[m] + alpha * tex[m]
        clipped = np.clip(outer_px, 0, size)
        objects.append(
            {
                "category": cat,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "segmentation": [[round(float(v), 1) for v in clipped.reshape(-1)]],
                "area": float(mask.sum()),
            }
        )
    img = img + rng.normal(0, 4, img.shape)  # sensor noise over objects too
    return np.clip(img, 0, 255).astype(np.uint8), objects


def write_demo(
    out_dir: str | Path,
    splits: dict[str, int] | None = None,
    size: int = 128,
    seed: int = 0,
    profile: str = "long-tail",
) -> dict[str, int]:
    """Write the demo dataset (deterministic for a given seed); returns images per split.

    Args:
        out_dir: Dataset root; gets ``<split>/*.jpg`` and ``annotations/instances_<split>.json``.
        splits: Images per split (default: train 2,200 / val 600 / test 600 / source 2,200).
        size: Image side in pixels.
        seed: Generator seed.
        profile: ``long-tail`` (the demo) or ``easy`` (the first demo data: every object clear); see :data:`PROFILES`.

    Returns:
        Images written per split.
    """
    out = Path(out_dir)
    splits = splits or DEFAULT_SPLITS
    target, source = PROFILES[profile]
    for s_index, (split, count) in enumerate(splits.items()):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        drawn = source if split == "source" else target
        pool = _pool(drawn)
        for i in range(count):
            rng = np.random.default_rng([seed, s_index, i])
            pixels, objects = render_scene(rng, size, drawn)
            image_id = s_index * 1_000_000 + i + 1
            file_name = f"{image_id:012d}.jpg"
            tmp = out / split / f".{file_name}.tmp"
            Image.fromarray(pixels).save(tmp, format="JPEG", quality=92)
            os.replace(tmp, out / split / file_name)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for obj in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1 + s_index * 10_000_000,
                        "image_id": image_id,
                        "category_id": pool[obj["category"]][0],
                        "bbox": obj["bbox"],
                        "segmentation": obj["segmentation"],
                        "area": obj["area"],
                        "iscrowd": 0,
                    }
                )
        doc = {
            "info": {"description": "finetune demo shapes", "version": "1", "year": 2026},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in pool],
        }
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "annotations" / f"instances_{split}.json", json.dumps(doc))
    return dict(splits)
