import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.data.coco import read_coco_split
from finetune.data.dataset import ImageDataset, collate
from finetune.data.demo import CATEGORIES
from finetune.data.split import check_images, read_rgb
from finetune.errors import UserError

from .conftest import COCO_TINY


def targets_from_json(ann_file: Path, include_crowd: bool = True, min_area: float = 0.0) -> dict[int, set[int]]:
    """Independent reference: image id -> set of category ids, straight from the JSON."""
    doc = json.loads(ann_file.read_text())
    out: dict[int, set[int]] = {img["id"]: set() for img in doc["images"]}
    for a in doc["annotations"]:
        if (a.get("iscrowd", 0) and not include_crowd) or a["bbox"][2] * a["bbox"][3] < min_area:
            continue
        out[a["image_id"]].add(a["category_id"])
    return out


def assert_targets_match(split, ann_file: Path, **kw) -> None:
    ref = targets_from_json(ann_file, **kw)
    assert sorted(ref) == split.image_ids
    for row, img_id in enumerate(split.image_ids):
        got = {split.classes.ids[c] for c in np.flatnonzero(split.targets[row])}
        assert got == ref[img_id], img_id


def test_demo_split_targets_and_id_mapping(tiny_coco: Path) -> None:
    split = read_coco_split(tiny_coco, "train")
    assert split.classes.ids == tuple(c[0] for c in CATEGORIES)  # ids with gaps, sorted
    assert split.classes.names[3] == "star" and split.classes.ids[3] == 5
    assert_targets_match(split, tiny_coco / "annotations" / "instances_train.json")
    assert all(p.is_file() for p in split.image_paths)


def test_min_box_area_and_crowd(tmp_path: Path) -> None:
    doc = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}, {"id": 11, "file_name": "c.jpg"}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 0},  # area 4
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 1},
            {"id": 3, "image_id": 9, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},
        ],  # image 11 has none: an all-negative sample
    }
    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_s.json"
    ann.write_text(json.dumps(doc))
    split = read_coco_split(tmp_path, "s")
    assert split.classes.names == ("dog", "cat")  # sorted by id
    np.testing.assert_array_equal(split.targets, [[1, 1], [1, 0], [0, 0]])
    split = read_coco_split(tmp_path, "s", include_crowd=False, min_box_area=5)
    np.testing.assert_array_equal(split.targets, [[0, 0], [1, 0], [0, 0]])
    assert_targets_match(split, ann, include_crowd=False, min_area=5)


def test_missing_and_malformed_annotation_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="annotation file not found; check data.root"):
        read_coco_split(tmp_path, "train")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid COCO annotation file"):
        read_coco_split(tmp_path, "train")


def test_val_categories_must_match_train(tiny_coco: Path, tmp_path: Path) -> None:
    train = read_coco_split(tiny_coco, "train")
    doc = json.loads((tiny_coco / "annotations" / "instances_val.json").read_text())
    doc["categories"] = doc["categories"][:3]
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] in {1, 2, 3}]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="categories differ"):
        read_coco_split(tmp_path, "val", classes=train.classes)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    img = Image.new("RGB", (20, 10), (200, 30, 40)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = img.convert("I;16")
    path = tmp_path / f"x.{'png' if mode in ('RGBA', 'P', 'I;16') else 'jpg'}"
    img.save(path)
    arr = read_rgb(path)
    assert arr.shape == (10, 20, 3) and arr.dtype == np.uint8


def test_transparent_pixels_composite_on_white(tmp_path: Path) -> None:
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert (read_rgb(tmp_path / "t.png") == 255).all()


def test_bad_images_become_errors_not_crashes(tiny_coco: Path, tmp_path: Path) -> None:
    split = read_coco_split(tiny_coco, "val")
    paths = list(split.image_paths)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    paths[0], paths[1] = corrupt, tmp_path / "missing.jpg"
    ds = ImageDataset(paths, split.targets, split.classes)
    batch = collate([ds[i] for i in range(4)])
    assert len(batch["errors"]) == 2 and "cannot decode image" in batch["errors"][0]
    assert "image file not found" in batch["errors"][1]
    assert batch["image"].shape[0] == 2 and batch["index"].tolist() == [2, 3]
    problems = check_images(paths, decode=True)
    assert [p.split(":")[0] for p in problems] == [str(corrupt), str(tmp_path / "missing.jpg")]


@pytest.mark.skipif(not COCO_TINY.is_dir(), reason="../shared/data/coco-tiny not present")
@pytest.mark.parametrize("split_name", ["train2017", "val2017"])
def test_real_coco_tiny(split_name: str) -> None:
    split = read_coco_split(COCO_TINY, split_name)
    assert len(split.classes) == 80
    assert split.classes.ids[0] == 1 and split.classes.ids[-1] == 90 and split.classes.names[0] == "person"
    doc = json.loads((COCO_TINY / "annotations" / f"instances_{split_name}.json").read_text())
    by_id = {c["id"]: c["name"] for c in doc["categories"]}
    assert list(split.classes.ids) == sorted(by_id) and [by_id[i] for i in split.classes.ids] == list(
        split.classes.names
    )
    assert_targets_match(split, COCO_TINY / "annotations" / f"instances_{split_name}.json")
    assert not check_images(split.image_paths)
    assert set(np.unique(split.targets)) == {0.0, 1.0}
    annotated = {a["category_id"] for a in doc["annotations"] if a["image_id"] in set(split.image_ids)}
    assert {split.classes.ids[c] for c in np.flatnonzero(split.targets.sum(0))} == annotated


def _pil_rgb(path: Path) -> np.ndarray:
    """The reference decode: PIL, as read_rgb did before its JPEG fast path."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize(
    "mode, save",
    [
        ("RGB", {"subsampling": 2, "quality": 90}),  # 4:2:0, COCO's usual
        ("RGB", {"subsampling": 1, "quality": 75}),  # 4:2:2
        ("RGB", {"subsampling": 0, "quality": 95}),  # 4:4:4
        ("RGB", {"progressive": True, "quality": 85}),
        ("L", {"quality": 90}),
        ("CMYK", {"quality": 90}),  # libjpeg cannot make RGB of it: PIL's conversion, as before
    ],
)
def test_jpeg_fast_path_gives_pils_pixels_bitwise(tmp_path: Path, mode: str, save: dict) -> None:
    from finetune.data import split as coco

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (9, 13, 3)), np.ones((7, 7, 1)))[:61, :83]  # odd sizes: partial MCUs
    pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(pixels).convert(mode).save(path, **save)
    out = read_rgb(path)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _pil_rgb(path))
    assert (coco._decode_jpeg(path.read_bytes()) is None) == (mode == "CMYK")  # the fast path did the work


def test_jpeg_fast_path_leaves_truncated_and_oversized_files_to_pil(tmp_path: Path, monkeypatch) -> None:
    from finetune.data import split as coco

    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert coco._decode_jpeg(data[: len(data) // 2]) is None
    with pytest.raises(OSError) as pils:
        _pil_rgb(tmp_path / "cut.jpg")
    with pytest.raises(OSError, match=str(pils.value)):  # PIL's own error, as before
        read_rgb(tmp_path / "cut.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 48 = 3072 pixels: over 2x the limit
    assert coco._decode_jpeg(data) is None
    with pytest.raises(Image.DecompressionBombError):
        read_rgb(tmp_path / "ok.jpg")


def test_jpeg_fast_path_on_real_coco_images() -> None:
    if not COCO_TINY.is_dir():
        pytest.skip("../shared/data/coco-tiny not present")
    paths = sorted(COCO_TINY.rglob("*.jpg"))[:40]
    assert paths
    for path in paths:
        np.testing.assert_array_equal(read_rgb(path), _pil_rgb(path))
