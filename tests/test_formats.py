"""Data as it comes: Pascal VOC, Open Images, Hugging Face imagefolder and named-column CSV, against COCO."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.assembly.data import build_split
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.eval.metrics import voc_ap
from tests.conftest import assert_user_error, run_cli
from tests.helpers import write_all_formats

FORMATS = ("voc", "openimages", "imagefolder", "csv")


@pytest.fixture(scope="module")
def formats(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """``tiny_coco`` written in every other format: the ``--set`` overrides of each."""
    return write_all_formats(tiny_coco, tmp_path_factory.mktemp("formats"))


def _split(recipe: Path, sets: list[str], split: str, classes=None):
    return build_split(load_recipe(recipe, sets).data, split, classes)


def test_every_format_reads_cocos_targets_and_images(tiny_recipe: Path, formats: dict[str, list[str]]) -> None:
    for split in ("train", "val", "test"):
        coco = _split(tiny_recipe, [], split)
        kept = np.nansum(coco.targets, 1) > 0  # the images with an object (every format but COCO needs one)
        assert kept.sum() >= len(kept) // 2
        coco.targets, coco.boxes = coco.targets[kept], [b for b, k in zip(coco.boxes, kept) if k]
        coco.image_paths = [p for p, k in zip(coco.image_paths, kept) if k]
        for fmt in FORMATS:
            other = _split(tiny_recipe, formats[fmt], split)
            assert other.classes.names == coco.classes.names, fmt
            np.testing.assert_array_equal(other.targets, coco.targets, err_msg=f"{fmt} {split}")
            assert [p.resolve() for p in other.image_paths] == [p.resolve() for p in coco.image_paths], fmt
        voc = _split(tiny_recipe, formats["voc"], split)
        for a, b in zip(voc.boxes, coco.boxes):  # VOC's 1-based inclusive pixels come back to COCO's boxes
            np.testing.assert_allclose(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])])


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_validates_and_has_stats(tiny_recipe: Path, formats: dict, fmt: str, tmp_path: Path) -> None:
    sets = [x for s in formats[fmt] for x in ("--set", s)]
    proc = run_cli("validate", str(tiny_recipe), *sets)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("data", "stats", str(tiny_recipe), *sets)
    assert proc.returncode == 0 and "mean" in proc.stdout + proc.stderr, proc.stderr
    proc = run_cli("run", str(tiny_recipe), *sets, "--set", f'output.name="{fmt}"')
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / fmt / "report.json").read_text())
    assert set(report["splits"]) == {"val", "test"}
    if fmt == "voc":
        assert 0.0 <= report["voc07_map"]["test"] <= 1.0


def _voc(root: Path, images: dict[str, list[tuple[str, int]]], split: str = "train") -> Path:
    """A VOC folder: per image id, its (class, difficult) objects."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, objects in images.items():
        xml = "".join(
            f"<object><name>{n}</name><difficult>{h}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax>"
            f"<ymax>4</ymax></bndbox></object>"
            for n, h in objects
        )
        (root / "Annotations" / f"{i}.xml").write_text(f"<annotation><filename>{i}.jpg</filename>{xml}</annotation>")
    (root / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def test_voc_difficult_objects_follow_the_option(tmp_path: Path) -> None:
    from finetune.data.voc import read_voc_split

    root = _voc(tmp_path, {"a": [("cat", 1)], "b": [("cat", 1), ("cat", 0)], "c": [("dog", 0), ("cat", 1)]})
    expect = {
        "unknown": [[np.nan, 0], [1, 0], [np.nan, 1]],  # VOC07: a class seen only as difficult is not scored there
        "positive": [[1, 0], [1, 0], [1, 1]],
        "ignore": [[0, 0], [1, 0], [0, 1]],
    }
    for option, want in expect.items():
        split = read_voc_split(root, "train", option)
        assert split.classes.names == ("cat", "dog")
        np.testing.assert_array_equal(split.targets, np.asarray(want, dtype=np.float32), err_msg=option)


def _devkit_voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """py-faster-rcnn's ``voc_eval.voc_ap`` (Ross Girshick, after the VOC devkit), kept verbatim as the reference."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def test_voc_ap_equals_the_devkit_on_a_planted_case() -> None:
    rng = np.random.default_rng(3)
    n, c = 60, 4
    y = (rng.random((n, c)) < 0.3).astype(np.float32)
    y[rng.random((n, c)) < 0.1] = np.nan  # difficult: left out of the class, as the devkit's gt == 0
    scores = rng.random((n, c))
    for eleven in (True, False):
        ours = voc_ap(y, scores, eleven)
        for k in range(c):
            keep = ~np.isnan(y[:, k])
            order = np.argsort(-scores[keep, k])
            tp = np.cumsum(y[keep, k][order] == 1)
            fp = np.cumsum(y[keep, k][order] == 0)
            rec, prec = tp / np.sum(y[keep, k] == 1), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
            assert ours[k] == pytest.approx(_devkit_voc_ap(rec, prec, eleven), abs=1e-12), (eleven, k)
    assert not np.allclose(voc_ap(y, scores, True), voc_ap(y, scores, False))  # the two forms are not the same


def test_single_label_csv_and_imagefolder(folder_data: Path, tmp_path: Path) -> None:
    rows = ["file,animal,fold"]
    for split in ("train", "val"):
        meta = ["file_name,label"]
        for image in sorted((folder_data / split).glob("*/*.png")):
            rows.append(f"{image},{image.parent.name},{split}")
            meta.append(f"{image.parent.name}/{image.name},{image.parent.name}")
        (tmp_path / "hf" / split).mkdir(parents=True)
        (tmp_path / "hf" / split / "metadata.csv").write_text("\n".join(meta) + "\n")
        for image in sorted((folder_data / split).glob("*/*.png")):
            (tmp_path / "hf" / split / image.parent.name).mkdir(exist_ok=True)
            (tmp_path / "hf" / split / image.parent.name / image.name).symlink_to(image)
    (tmp_path / "one.csv").write_text("\n".join(rows) + "\n")
    base = ['data.task="single_label"', 'loss.name="ce"', f'data.root="{tmp_path}"']
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nformat = "folder"\n')
    folder = build_split(load_recipe(recipe, [f'data.root="{folder_data}"', 'loss.name="ce"']).data, "val")
    csv_sets = [*base, 'data.format="csv"', 'data.csv="one.csv"', 'data.path_column="file"']
    csv_sets += ['data.label_column="animal"', 'data.split_column="fold"']
    hf_sets = [*base, 'data.format="imagefolder"', f'data.root="{tmp_path / "hf"}"']
    for sets in (csv_sets, hf_sets):
        split = build_split(load_recipe(recipe, sets).data, "val")
        assert split.classes.names == folder.classes.names
        np.testing.assert_array_equal(split.targets, folder.targets)
        assert (split.targets.sum(1) == 1).all()


def _error(fn, *needles: str) -> None:
    with pytest.raises(UserError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_voc_files_name_the_file_and_element(tmp_path: Path) -> None:
    from finetune.data.voc import read_voc_split

    root = _voc(tmp_path / "a", {"a": [("cat", 0)], "b": []})
    _error(lambda: read_voc_split(root, "train"), "b.xml", "no <object>")
    root = _voc(tmp_path / "b", {"a": [("cat", 0)], "b": [("zebra", 0)]})
    _error(lambda: read_voc_split(root, "train", class_names=["cat"]), "b.xml", "'zebra'", "not a class")
    train = read_voc_split(root, "train")
    _voc(root, {"c": [("horse", 0)]}, "val")
    _error(lambda: read_voc_split(root, "val", classes=train.classes), "c.xml", "'horse'")
    (root / "ImageSets/Main/val.txt").write_text("c\nmissing\n")
    _error(lambda: read_voc_split(root, "val", classes=train.classes), "val.txt:2", "missing.xml")


def test_bad_openimages_imagefolder_and_csv_input(tmp_path: Path) -> None:
    from finetune.data.csvfile import Columns, read_csv_split
    from finetune.data.hf_imagefolder import read_imagefolder_split
    from finetune.data.openimages import read_openimages_split

    (tmp_path / "train-labels.csv").write_text("ImageID,LabelName,Confidence\na,/m/cat,1\nb,/m/cat,0.5\n")
    _error(lambda: read_openimages_split(tmp_path, "train", "{split}-labels.csv"), "train-labels.csv:3", "'0.5'")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metadata.csv").write_text("image,labels\na.jpg,cat\n")
    _error(lambda: read_imagefolder_split(tmp_path, "train"), "metadata.csv", "file_name")
    (tmp_path / "train" / "metadata.csv").write_text("file_name,labels\na.jpg,cat\n")
    _error(lambda: read_imagefolder_split(tmp_path, "train", "tags"), "metadata.csv", "'tags'")
    (tmp_path / "train" / "metadata.csv").write_text("file_name,label\na.jpg,cat\nb.jpg,\n")
    _error(lambda: read_imagefolder_split(tmp_path, "train", single=True), "metadata.csv:3", "has 0")
    bad = {
        "dup_column.csv": ("path,labels,labels,split\na.jpg,cat,dog,train\n", ["dup_column.csv:1", "'labels'"]),
        "quote.csv": ('path,labels,split\na.jpg,"cat"dog,train\n', ["quote.csv:2", "malformed"]),
        "open_quote.csv": ('path,labels,split\na.jpg,cat,train\nb.jpg,"dog,train\n', ["open_quote.csv:3", "quote"]),
        "joined.csv": ('path,labels,split\nb.jpg,"dog,train\nc.jpg,cat",train\n', ["joined.csv:2", "line 3"]),
        "twice.csv": ("path,labels,split\n./train/x.jpg,cat,train\ntrain/x.jpg,dog,train\n", ["twice.csv:3", "line 2"]),
    }
    for name, (text, needles) in bad.items():
        (tmp_path / name).write_text(text)
        _error(lambda name=name: read_csv_split(tmp_path, "train", name), *needles)
    (tmp_path / "ok.csv").write_text("file,labels,split\na.jpg,cat,train\n")
    columns = Columns(path="file", labels="tags")
    _error(lambda: read_csv_split(tmp_path, "train", "ok.csv", columns=columns, named=True), "ok.csv", "'tags'")
    _error(lambda: read_csv_split(tmp_path, "train", "ok.csv"), "ok.csv", "'path'")


def test_named_column_missing_is_one_line_in_validate(tiny_recipe: Path, formats: dict) -> None:
    sets = [*formats["csv"][:-1], 'data.split_column="fold"']
    proc = run_cli("validate", str(tiny_recipe), *[x for s in sets for x in ("--set", s)])
    assert_user_error(proc, "data.csv", "'fold'", "data.split_column")


@pytest.mark.extra("hf")
def test_a_save_to_disk_dataset_reads_like_the_imagefolder(
    tiny_recipe: Path, formats: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    folder = _split(tiny_recipe, formats["imagefolder"], "train")
    names = list(folder.classes.names)
    rows = {
        "image": [{"bytes": p.read_bytes(), "path": None} for p in folder.image_paths],  # in the Arrow files
        "tags": [[names.index(n) for n in names if t[names.index(n)] == 1] for t in folder.targets],
    }
    features = datasets.Features(
        {"image": datasets.Image(), "tags": datasets.Sequence(datasets.ClassLabel(names=names))}
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    sets = [s for s in formats["imagefolder"] if not s.startswith("data.root")] + [f'data.root="{tmp_path / "saved"}"']
    saved = _split(tiny_recipe, sets, "train")
    assert saved.classes.names == folder.classes.names
    np.testing.assert_array_equal(saved.targets, folder.targets)
    assert all(p.parent == tmp_path / "cache" / "hf-images" for p in saved.image_paths)  # bytes written once
    assert [p.read_bytes() for p in saved.image_paths] == [p.read_bytes() for p in folder.image_paths]
    _error(lambda: _split(tiny_recipe, sets, "val"), "no split 'val'")


def test_open_images_class_names_with_and_without_a_header(tmp_path: Path) -> None:
    from finetune.data.openimages import read_class_names

    (tmp_path / "a.csv").write_text("/m/1,Cat\n/m/2,Dog\n/m/3,Dog\n")
    (tmp_path / "b.csv").write_text("LabelName,DisplayName\n/m/1,Cat\n")
    assert read_class_names(tmp_path / "a.csv") == {"/m/1": "Cat", "/m/2": "Dog (/m/2)", "/m/3": "Dog (/m/3)"}
    assert read_class_names(tmp_path / "b.csv") == {"/m/1": "Cat"}
