"""Where a dataset's annotations may send the reader: only inside its image folder; path templates take {split} only.

VOC, Open Images, imagefolder and COCO annotations naming a file outside the dataset (an
absolute path, ``..``) had it read; templates with another placeholder, and names over the file system's limit, were
tracebacks. Each case is ``finetune validate`` on a tampered copy: one line and exit 2, or (before) a pass.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import write_all_formats

from .conftest import assert_user_error, run_cli

OUTSIDE = "is outside the image folder"


@pytest.fixture
def formats(tiny_coco: Path, tmp_path: Path) -> tuple[dict[str, list], Path, Path]:
    """Every format written from the tiny data, a recipe, and a real image outside them all (the "secret")."""
    sets = write_all_formats(tiny_coco, tmp_path / "data")
    secret = tmp_path / "secret.jpg"
    shutil.copy(next((tiny_coco / "train").glob("*.jpg")), secret)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nroot = "{tiny_coco}"\n[output]\ndir = "{tmp_path / "runs"}"\n')
    return sets, recipe, secret


def _validate(recipe: Path, sets: list[str]):
    return run_cli("validate", str(recipe), *(x for s in sets for x in ("--set", s)))


def test_voc_filename_outside_the_dataset_is_refused(formats: tuple) -> None:
    sets, recipe, secret = formats
    xml = sorted((Path(sets["voc"][1].split('"')[1]) / "Annotations").glob("train_*.xml"))[0]
    for name in ("../../secret.jpg", str(secret)):
        text = xml.read_text()
        xml.write_text(text.replace(text.split("<filename>")[1].split("</filename>")[0], name))
        assert_user_error(_validate(recipe, sets["voc"]), str(xml), OUTSIDE)


def test_openimages_image_id_outside_the_dataset_is_refused(formats: tuple) -> None:
    sets, recipe, _ = formats
    labels = Path(sets["openimages"][1].split('"')[1]) / "train-annotations-human-imagelabels.csv"
    with labels.open("a") as f:
        f.write("../../secret,verification,/m/circle,1\n")
    assert_user_error(_validate(recipe, sets["openimages"]), "ImageID '../../secret'", OUTSIDE)


@pytest.mark.parametrize("name", ["../../secret.jpg", "ABSOLUTE", None, 7])
def test_imagefolder_file_name_outside_or_not_a_name_is_refused(formats: tuple, name: object) -> None:
    sets, recipe, secret = formats
    meta = Path(sets["imagefolder"][1].split('"')[1]) / "train" / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    first = json.loads(lines[0])
    first["file_name"] = str(secret) if name == "ABSOLUTE" else name
    meta.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    needle = OUTSIDE if isinstance(name, str) else f"file_name is {name!r}"
    assert_user_error(_validate(recipe, sets["imagefolder"]), f"{meta}:1", needle)


@pytest.mark.parametrize("how", ["absolute", "climbs"])
def test_coco_file_name_outside_the_dataset_is_refused(tiny_coco: Path, tmp_path: Path, how: str) -> None:
    root = tmp_path / "coco"
    shutil.copytree(tiny_coco, root)
    shutil.copy(next((tiny_coco / "train").glob("*.jpg")), tmp_path / "secret.jpg")
    ann = root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    doc["images"][0]["file_name"] = str(tmp_path / "secret.jpg") if how == "absolute" else "../../secret.jpg"
    ann.write_text(json.dumps(doc))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nroot = "{root}"\n[output]\ndir = "{tmp_path / "runs"}"\n')
    assert_user_error(run_cli("validate", str(recipe)), f"{ann}: image id {doc['images'][0]['id']}", OUTSIDE)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.annotations", "annotations/instances_{split}_{foo}.json"),
        ("data.annotations", "annotations/{}instances_{split}.json"),
        ("data.annotations", "annotations/{{split}.json"),
        ("data.images", "{split.__class__.__mro__}"),
        ("data.images", "{split}}"),
    ],
)
def test_a_path_template_takes_split_only(tiny_coco: Path, tmp_path: Path, key: str, value: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nroot = "{tiny_coco}"\n[output]\ndir = "{tmp_path / "runs"}"\n')
    proc = run_cli("validate", str(recipe), "--set", f'{key}="{value}"')
    assert_user_error(proc, key, "the only placeholder is {split}")


def test_csv_and_openimages_templates_take_split_only(formats: tuple) -> None:
    sets, recipe, _ = formats
    assert_user_error(_validate(recipe, [*sets["csv"], 'data.csv="{nope}.csv"']), "data.csv", "{split}")
    oi = [*sets["openimages"], 'data.openimages_labels="{0}.csv"']
    assert_user_error(_validate(recipe, oi), "data.openimages_labels", "{split}")


@pytest.mark.parametrize("key", ["data.root", "output.name", "output.dir"])
def test_a_name_longer_than_the_file_system_allows_is_one_line(tiny_coco: Path, tmp_path: Path, key: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nroot = "{tiny_coco}"\n[output]\ndir = "{tmp_path / "runs"}"\n')
    long = str(tmp_path / ("n" * 300)) if key != "output.name" else "n" * 300
    proc = run_cli("validate", str(recipe), "--set", f'{key}="{long}"')
    assert_user_error(proc, key if key == "output.name" else "longer than the file system allows")


def test_voc_annotations_that_do_not_hold_are_refused(formats: tuple) -> None:
    sets, recipe, _ = formats
    voc = Path(sets["voc"][1].split('"')[1])
    xmls = sorted((voc / "Annotations").glob("train_*.xml"))
    original = xmls[0].read_text()
    for text, needle in (
        ('<?xml version="1.0" encoding="klingon"?>' + original, "not readable XML"),
        (re.sub(r"<xmin>[^<]*</xmin>", "<xmin>nan</xmin>", original, count=1), "not a finite number"),
        (original.replace(original.split("<filename>")[1].split("<")[0], f"{xmls[1].stem}.jpg"), "one file per image"),
    ):
        xmls[0].write_text(text)
        assert_user_error(_validate(recipe, sets["voc"]), needle)
    xmls[0].write_text(original)
    ids = voc / "ImageSets" / "Main" / "train.txt"
    ids.write_text(ids.read_text() + xmls[0].stem + "\n")
    assert_user_error(_validate(recipe, sets["voc"]), f"image id {xmls[0].stem!r} again")


@pytest.mark.parametrize(
    ("negatives", "needle"),
    [([[1, 2]], "holds [1, 2]"), ([{"id": 1}], "holds {'id': 1}"), ([True], "holds True"), ("POSITIVE", "annotated")],
)
def test_lvis_negative_lists_that_do_not_hold_are_refused(
    tiny_coco: Path, tmp_path: Path, negatives: object, needle: str
) -> None:
    root = tmp_path / "lvis"
    shutil.copytree(tiny_coco, root)
    ann = root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    first = doc["annotations"][0]
    image = next(im for im in doc["images"] if im["id"] == first["image_id"])
    image["neg_category_ids"] = [first["category_id"]] if negatives == "POSITIVE" else negatives
    ann.write_text(json.dumps(doc))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nroot = "{root}"\n[output]\ndir = "{tmp_path / "runs"}"\n')
    assert_user_error(run_cli("validate", str(recipe)), f"image {image['id']}", needle)


@pytest.mark.parametrize(
    "override", ["train.seed=18446744073709551616", "train.seed=-1", "data.holdout.seed=-3", "data.holdout.seed=2**40"]
)
def test_seeds_out_of_range_are_one_line(tiny_recipe: Path, override: str) -> None:
    value = str(2**40) if "2**40" in override else override.split("=")[1]
    key = override.split("=")[0]
    assert_user_error(run_cli("validate", str(tiny_recipe), "--set", f"{key}={value}"), key)


def test_compare_seeds_out_of_range_and_a_recipe_nested_too_deep(tiny_recipe: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli("compare", str(tiny_recipe), "--seeds", f"0,{2**32}"), "seeds are 0 to")
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert_user_error(run_cli("validate", str(deep)), "nested too deeply")


def _csv(sets: dict[str, list], with_classes: bool = True) -> tuple[list[str], Path]:
    keys = sets["csv"] if with_classes else [s for s in sets["csv"] if not s.startswith("data.classes=")]
    return keys, Path(sets["csv"][1].split('"')[1]) / "data.csv"


def test_csv_labels_that_do_not_hold_are_refused(formats: tuple) -> None:
    sets, recipe, _ = formats
    keys, table = _csv(sets)
    original = table.read_text()
    lines = original.splitlines()
    first = lines[1].split(",")
    for text, needle, declared in (
        ("\n".join([lines[0], ",".join([first[0], first[1] + "|-", first[2]]), *lines[2:]]), "a bare '-'", True),
        ("\n".join([lines[0], ",".join([first[0], first[1] + "|-nosuch", first[2]]), *lines[2:]]), "undeclared", False),
    ):
        table.write_text(text + "\n")
        assert_user_error(_validate(recipe, keys if declared else _csv(sets, False)[0]), str(table), needle)
    columns = [k for k in _csv(sets, False)[0] if not k.startswith("data.label_column")]  # class-column form
    rows = [r.split(",") for r in lines[1:]]
    table.write_text("\n".join(["image,part,circle,", *(f"{r[0]},{r[2]},1,0" for r in rows)]) + "\n")
    assert_user_error(_validate(recipe, columns), f"{table}:1: column 4 of the header has no name")


def test_a_train_class_unknown_on_every_image_is_refused(formats: tuple) -> None:
    sets, recipe, _ = formats
    keys, table = _csv(sets)
    rows = [r.split(",") for r in table.read_text().splitlines()]
    rows = [rows[0]] + [[p, "-circle" if part == "train" else tags, part] for p, tags, part in rows[1:]]
    table.write_text("\n".join(",".join(r) for r in rows) + "\n")
    assert_user_error(_validate(recipe, keys), "class 'circle'", "unknown on every image")


def test_single_label_data_with_one_class_is_refused(formats: tuple) -> None:
    sets, recipe, _ = formats
    keys, table = _csv(sets, with_classes=False)
    rows = [r.split(",") for r in table.read_text().splitlines()]
    table.write_text("\n".join(",".join(r if i == 0 else [r[0], "circle", r[2]]) for i, r in enumerate(rows)) + "\n")
    single = [*keys, 'data.task="single_label"', 'loss.name="ce"']
    assert_user_error(_validate(recipe, single), "has one class ('circle')")


@pytest.mark.parametrize("where", ["file", "/dev/null"])
def test_validate_refuses_an_output_dir_that_is_not_a_folder(tiny_recipe: Path, tmp_path: Path, where: str) -> None:
    target = tmp_path / "a-file" if where == "file" else Path(where)
    if where == "file":
        target.write_text("the user's")
    assert_user_error(run_cli("validate", str(tiny_recipe), "--set", f'output.dir="{target}"'), "is not a folder")


def test_single_label_temperature_alone_is_accepted(tiny_recipe: Path, folder_data: Path) -> None:
    single = ['data.format="folder"', 'loss.name="ce"', "data.image_size=24", f'data.root="{folder_data.as_posix()}"']
    sets = [*single, 'calibrate.probabilities="temperature"']
    proc = run_cli("validate", str(tiny_recipe), *(x for s in sets for x in ("--set", s)))
    assert proc.returncode == 0, proc.stderr


def test_compare_refuses_a_recipe_with_a_holdout_and_a_test_split(tiny_recipe: Path, tmp_path: Path) -> None:
    proc = run_cli("compare", str(tiny_recipe), "--set", "data.holdout.seed=1", "--out", str(tmp_path / "c"))
    assert_user_error(proc, "holdout draws the test role from data.val; leave data.test empty")
