"""A real single-label set from what is at hand: COCO object crops, one class per crop.

    python benchmarks/coco_crops.py --out /tmp/coco-crops [--coco ../shared/data/coco-small]
        [--min-side 48] [--per-image 1] [--min-count 5]

Every non-crowd box of ``--coco`` whose sides are both at least ``--min-side`` pixels is cut out with 10% context
on each side (clipped to the image) and saved as a JPEG. Its label is the box's COCO category. ``train2017`` boxes
become the ``train`` split and ``val2017`` boxes the ``val`` split, so the two splits never share a photograph
(``finetune compare`` then draws its selection and scoring halves from ``val``). At most ``--per-image`` boxes of
one class are kept per photograph (the largest), so a crowd of people does not make the set one class. Classes
with fewer than ``--min-count`` crops in either split are left out. The result is a ``format = "csv"`` dataset
with ``data.task = "single_label"``: ``labels.csv`` (path,label,split) and ``crops/``.

The crops are real photographs with real labels; they are harder than a curated single-label set (occlusion,
small objects, context from other classes).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
from pathlib import Path

from PIL import Image

from finetune.data.coco import read_coco_split

SPLITS = {"train2017": "train", "val2017": "val"}


def boxes(coco: Path, split: str, min_side: float, per_image: int) -> list[tuple[Path, str, list[float]]]:
    """(image path, class name, [x, y, w, h]) for each kept box of ``split``, largest first per (image, class).

    The boxes come from finetune's COCO reader (pycocotools; crowd boxes left out), in image-id and class-name order.
    """
    s = read_coco_split(coco, split, include_crowd=False)
    names = s.classes.names
    per: dict[tuple[int, str], list[tuple[Path, list[float]]]] = collections.defaultdict(list)
    for image_id, path, rows in zip(s.image_ids, s.image_paths, s.boxes):
        for c, x0, y0, x1, y1 in rows.tolist():
            if min(x1 - x0, y1 - y0) >= min_side:
                per[(image_id, names[int(c)])].append((Path(path), [x0, y0, x1 - x0, y1 - y0]))
    kept = []
    for (_, name), found in sorted(per.items()):
        for path, b in sorted(found, key=lambda f: -f[1][2] * f[1][3])[:per_image]:
            kept.append((path, name, b))
    return kept


def crop(image: Image.Image, box: list[float], context: float = 0.1) -> Image.Image:
    """The box with ``context`` of its size added on each side, clipped to the image."""
    x, y, w, h = box
    left, top = max(0, int(x - context * w)), max(0, int(y - context * h))
    right, bottom = min(image.width, int(x + w + context * w + 1)), min(image.height, int(y + h + context * h + 1))
    return image.crop((left, top, right, bottom))


def main() -> None:
    """Write the crops and labels.csv; print the class counts."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coco", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/coco-small")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--min-side", type=float, default=48.0)
    ap.add_argument("--per-image", type=int, default=1)
    ap.add_argument("--min-count", type=int, default=5)
    args = ap.parse_args()
    found = {s: boxes(args.coco, s, args.min_side, args.per_image) for s in SPLITS}
    counts = {s: collections.Counter(name for _, name, _ in found[s]) for s in SPLITS}
    classes = sorted(c for c in counts["train2017"] if min(counts[s][c] for s in SPLITS) >= args.min_count)
    (args.out / "crops").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, role in SPLITS.items():
        for i, (file, name, box) in enumerate(found[split]):
            if name not in classes:
                continue
            with Image.open(file) as im:
                piece = crop(im.convert("RGB"), box)
            path = f"crops/{role}_{file.stem}_{i:04d}.jpg"
            buf = io.BytesIO()
            piece.save(buf, "JPEG", quality=95)
            (args.out / path).write_bytes(buf.getvalue())
            rows.append((path, name, role))
    tmp = args.out / "labels.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    tmp.replace(args.out / "labels.csv")
    print(f"{len(classes)} classes, {len(rows)} crops in {args.out}")
    for c in classes:
        print(f"  {c}: train {counts['train2017'][c]}, val {counts['val2017'][c]}")


if __name__ == "__main__":
    main()
