"""COCO annotation files: every malformed file and every silent duplicate is one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.errors import UserError


# COCO annotations: every malformed file and every silent duplicate is one line naming the file.
def _doc() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _edit(change: str) -> object:
    doc = _doc()
    if change == "top-level list":
        return [doc]
    if change == "annotations null":
        return {**doc, "annotations": None}
    if change == "images a dict":
        return {**doc, "images": {"1": doc["images"][0]}}
    if change == "duplicate image id":
        doc["images"][1]["id"] = 1
    elif change == "duplicate file_name":
        doc["images"][1]["file_name"] = "a.jpg"
    elif change == "duplicate category name":
        doc["categories"][1]["name"] = "cat"
    elif change == "string image id":
        doc["images"][0]["id"] = "1"
    elif change == "no file_name":
        del doc["images"][0]["file_name"]
    elif change == "category without name":
        del doc["categories"][0]["name"]
    elif change == "string bbox":
        doc["annotations"][0]["bbox"] = "0 0 4 4"
    elif change == "annotation without id":
        del doc["annotations"][0]["id"]
    elif change == "unknown category_id":
        doc["annotations"][0]["category_id"] = 7
    return doc


COCO_CASES = {
    "top-level list": "the top level is a list, not an object",
    "annotations null": "'annotations' is null, not a list",
    "images a dict": "'images' is dict, not a list",
    "duplicate image id": "images: id 1 appears more than once",
    "duplicate file_name": "images: file_name 'a.jpg' appears more than once",
    "duplicate category name": "categories: name 'cat' appears more than once",
    "string image id": "images[0]: 'id' is '1', not an integer",
    "no file_name": "images[0] has no 'file_name'",
    "category without name": "categories[0] has no 'name'",
    "string bbox": "annotations[0]: 'bbox' is '0 0 4 4', not [x, y, width, height]",
    "unknown category_id": "annotation 1 has category_id 7 not in 'categories'",
    "annotation without id": "annotations[0] has no 'id'",
}


@pytest.mark.parametrize("change", sorted(COCO_CASES))
def test_a_malformed_or_ambiguous_coco_file_is_one_line_naming_it(change: str, tmp_path: Path) -> None:
    from finetune.data.coco import read_coco_split

    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_train.json"
    ann.write_text(json.dumps(_edit(change)))
    with pytest.raises(UserError) as err:
        read_coco_split(tmp_path, "train")
    assert str(err.value).startswith(f"{ann}: ") and COCO_CASES[change] in str(err.value), str(err.value)


def test_a_coco_file_without_bboxes_reads_unless_min_box_area_needs_them(tmp_path: Path) -> None:
    from finetune.data.coco import read_coco_split

    (tmp_path / "annotations").mkdir()
    doc = _doc()
    del doc["annotations"][0]["bbox"]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    assert read_coco_split(tmp_path, "train").targets.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    with pytest.raises(UserError, match="annotation 1 has no 'bbox'; data.min_box_area needs one"):
        read_coco_split(tmp_path, "train", min_box_area=4.0)
