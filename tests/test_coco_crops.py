"""benchmarks/coco_crops.py: COCO boxes cut out as a single-label CSV set that finetune reads."""

from __future__ import annotations

import collections
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.assembly.data import build_split
from finetune.config import load_recipe
from finetune.data.demo import write_demo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import coco_crops  # noqa: E402


def test_crops_are_the_boxes_and_read_as_single_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coco, out = tmp_path / "coco", tmp_path / "crops"
    write_demo(coco, {"train2017": 12, "val2017": 12}, size=96)
    argv = ["coco_crops.py", "--coco", str(coco), "--out", str(out), "--min-side", "8", "--per-image", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--min-count", "3"])
    coco_crops.main()
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert rows and {r["split"] for r in rows} == {"train", "val"}

    # each crop is its box (with 10% context, clipped), cut from its photograph, of the box's class
    for split, role in coco_crops.SPLITS.items():
        kept = coco_crops.boxes(coco, split, 8, 1)
        doc = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in doc["categories"]}
        per = collections.Counter((a["image_id"], names[a["category_id"]]) for a in doc["annotations"])
        assert len(kept) == len(per)  # one box per (photograph, class)
        mine = [r for r in rows if r["split"] == role]
        listed = [(f, n, b) for f, n, b in kept if n in {r["label"] for r in rows}]
        assert [r["label"] for r in mine] == [n for _, n, _ in listed]
        for r, (file, _, (x, y, w, h)) in zip(mine, listed):
            with Image.open(file) as im:
                whole = np.asarray(im.convert("RGB"))
            top, left = max(0, int(y - 0.1 * h)), max(0, int(x - 0.1 * w))
            box = whole[top : int(y + 1.1 * h + 1), left : int(x + 1.1 * w + 1)]
            with Image.open(out / r["path"]) as im:
                assert im.size == (box.shape[1], box.shape[0])
                error = np.abs(np.asarray(im, dtype=np.int16) - box).mean()
            assert error < 8  # the JPEG re-encoding only

    # a class under --min-count in either split is left out; the rest read as a single-label CSV set
    found = {s: collections.Counter(n for _, n, _ in coco_crops.boxes(coco, s, 8, 1)) for s in coco_crops.SPLITS}
    wanted = {c for c in found["train2017"] if min(found["train2017"][c], found["val2017"][c]) >= 3}
    counts = {role: collections.Counter(r["label"] for r in rows if r["split"] == role) for role in ("train", "val")}
    assert set(counts["train"]) == set(counts["val"]) == wanted and wanted < set(found["train2017"])
    sets = [f'data.root="{out}"', 'data.format="csv"', 'data.label_column="label"', 'data.task="single_label"']
    sets += ['data.train="train"', 'data.val="val"', 'data.test=""', 'loss.name="ce"']
    data = load_recipe(Path(__file__).resolve().parents[1] / "recipes/coco_multilabel_focal.toml", sets).data
    train = build_split(data, "train")
    assert len(train.targets) == sum(counts["train"].values())
    assert (np.asarray(train.targets).sum(axis=1) == 1).all()  # one class per crop
    names = [train.classes.names[int(i)] for i in np.argmax(train.targets, axis=1)]
    assert collections.Counter(names) == counts["train"]
    assert sorted(train.classes.names) == sorted(counts["train"])
