import json
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.data.demo import write_demo


def test_demo_is_deterministic_and_coco_shaped(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write_demo(root, {"train": 30, "val": 5}, size=64, seed=3)
    for split in ("train", "val"):
        ja = (a / "annotations" / f"instances_{split}.json").read_text()
        assert ja == (b / "annotations" / f"instances_{split}.json").read_text()
        files = sorted((a / split).glob("*.jpg"))
        assert [f.read_bytes() for f in files] == [(b / split / f.name).read_bytes() for f in files]
    doc = json.loads((a / "annotations" / "instances_train.json").read_text())
    assert len(doc["images"]) == 30 and len(doc["categories"]) == 10
    for ann in doc["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0
        assert 0 < ann["area"] <= w * h
    per_image = np.bincount([ann["image_id"] for ann in doc["annotations"]], minlength=31)[1:]
    assert per_image.max() <= 4
    assert Image.open(a / "train" / doc["images"][0]["file_name"]).size == (64, 64)


def test_demo_is_imbalanced(tmp_path: Path) -> None:
    write_demo(tmp_path, {"train": 400}, size=48, seed=0)
    doc = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    counts = np.bincount([a["category_id"] for a in doc["annotations"]], minlength=16)
    assert counts[1] > 4 * counts[15] > 0  # circles common, arrows rare but present
