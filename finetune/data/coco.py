"""COCO-format multi-label classification data, read with pycocotools.

``instances_*.json`` -> one multi-hot target per image over the file's categories, in category-id order
(contiguous index <-> COCO id <-> name). Images without annotations are all-negative samples.

Unknown labels, as LVIS's federated annotation has them: an image entry that carries ``neg_category_ids`` lists
the classes verified absent; every class neither annotated nor listed there is unknown for that image (not
checked, left out of the loss and the metrics). A class in ``not_exhaustive_category_ids`` without an annotation
that counts is unknown too. An image entry without ``neg_category_ids`` is exhaustively labelled, as in COCO.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from finetune.data.split import ClassMap, Split, inside, split_template
from finetune.errors import UserError


def load_coco(annotation_file: str | Path) -> COCO:
    """Read an ``instances_*.json`` file, with one-line errors for a missing or malformed file."""
    path = Path(annotation_file)
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found; check data.root, data.annotations and the split names")
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid COCO annotation file ({err})") from None
    problem = coco_problem(doc)
    if problem:
        raise UserError(f"{path}: {problem}")
    coco = COCO()
    coco.dataset, coco.source = doc, str(path)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco


def _is_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entries_problem(doc: dict, key: str, fields: dict[str, type | str]) -> str:
    """What is wrong with ``doc[key]`` as a list of objects with ``fields`` ("id": an integer), or ""."""
    items = doc.get(key)
    if not isinstance(items, list):
        return f"'{key}' is {type(items).__name__ if items is not None else 'null'}, not a list"
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return f"{key}[{i}] is {type(item).__name__}, not an object"
        for name, kind in fields.items():
            value = item.get(name)
            if name not in item:
                return f"{key}[{i}] has no '{name}'"
            if (kind == "id" and not _is_id(value)) or (kind is str and not (isinstance(value, str) and value)):
                return f"{key}[{i}]: '{name}' is {value!r}, not {'an integer' if kind == 'id' else 'a name'}"
    return ""


def _duplicate(items: list[dict], key: str) -> object | None:
    seen: set = set()
    for item in items:
        if item[key] in seen:
            return item[key]
        seen.add(item[key])
    return None


def coco_problem(doc: object) -> str:
    """The first structural problem of a COCO instances document, in words ("" when there is none).

    Checked: the top level is an object with ``images`` and ``categories`` lists (``annotations`` a list, or left
    out); integer ids; names; each annotation's ``bbox`` (when given) four numbers; no repeated image id,
    ``file_name``, category id or category name (pycocotools would keep one of each silently).
    """
    if not isinstance(doc, dict):
        return f"the top level is a {type(doc).__name__}, not an object with 'images' and 'categories'"
    if "images" not in doc or "categories" not in doc:
        return "not a COCO instances file (needs 'images' and 'categories')"
    fields = {"images": {"id": "id", "file_name": str}, "categories": {"id": "id", "name": str}}
    if "annotations" in doc:
        fields["annotations"] = {"id": "id", "image_id": "id", "category_id": "id"}
    for key, wanted in fields.items():
        problem = _entries_problem(doc, key, wanted)
        if problem:
            return problem
    for key, field in (("images", "id"), ("images", "file_name"), ("categories", "id"), ("categories", "name")):
        again = _duplicate(doc[key], field)
        if again is not None:
            return f"{key}: {field} {again!r} appears more than once; each must be unique"
    for i, ann in enumerate(doc.get("annotations", [])):
        box = ann.get("bbox")
        if box is not None and not (
            isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
        ):
            return f"annotations[{i}]: 'bbox' is {box!r}, not [x, y, width, height]"
    return ""


def class_map_of(coco: COCO) -> ClassMap:
    """The categories of a COCO file, sorted by id (so index order matches the usual COCO 80-class order)."""
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    return ClassMap(tuple(c["id"] for c in cats), tuple(c["name"] for c in cats))


def multi_hot_targets(
    coco: COCO, image_ids: list[int], classes: ClassMap, include_crowd: bool = True, min_box_area: float = 0.0
) -> np.ndarray:
    """Multi-hot targets ``[len(image_ids), len(classes)]`` (float32).

    Args:
        coco: The annotations.
        image_ids: The images, in row order.
        classes: Column order.
        include_crowd: Whether ``iscrowd=1`` annotations (a crowd of people, say) make their class positive.
        min_box_area: Objects whose box (w*h, pixels) is smaller do not count as a label.

    Returns:
        The target matrix.
    """
    where = getattr(coco, "source", "the annotations")
    column = {cid: i for i, cid in enumerate(classes.ids)}
    row = {img_id: i for i, img_id in enumerate(image_ids)}
    targets = np.zeros((len(image_ids), len(classes)), dtype=np.float32)
    for ann in coco.dataset.get("annotations", []):
        r = row.get(ann["image_id"])
        if r is None or (ann.get("iscrowd", 0) and not include_crowd):
            continue
        if min_box_area > 0:
            if "bbox" not in ann:
                raise UserError(f"{where}: annotation {ann.get('id')} has no 'bbox'; data.min_box_area needs one")
            if ann["bbox"][2] * ann["bbox"][3] < min_box_area:
                continue
        c = column.get(ann["category_id"])
        if c is None:
            raise UserError(
                f"{where}: annotation {ann.get('id')} has category_id {ann['category_id']} not in 'categories'"
            )
        targets[r, c] = 1.0
    _mark_unknown(coco, image_ids, column, targets)
    return targets


def _mark_unknown(coco: COCO, image_ids: list[int], column: dict[int, int], targets: np.ndarray) -> None:
    """Set the unknown entries (NaN) of images with LVIS's ``neg_category_ids`` / ``not_exhaustive_category_ids``."""
    column_ids = {c: cid for cid, c in column.items()}
    for r, img_id in enumerate(image_ids):
        entry = coco.imgs[img_id]
        lists = {}
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            ids = entry.get(key)
            if ids is None:
                continue
            # an id is an integer of 'categories' (not a list, an object, or true, which would pass for 1)
            if not isinstance(ids, list) or not all(_is_id(i) and i in column for i in ids):
                bad = ids if not isinstance(ids, list) else next(i for i in ids if not (_is_id(i) and i in column))
                raise UserError(f"image {img_id}: {key} holds {bad!r}, not a list of ids in 'categories'")
            lists[key] = [column[i] for i in ids]
        both = [c for c in lists.get("neg_category_ids", []) if targets[r, c] == 1]
        if both:
            raise UserError(
                f"image {img_id}: category {column_ids[both[0]]} is annotated on it and listed in neg_category_ids "
                "(verified absent); fix one of the two"
            )
        if "neg_category_ids" in lists:
            unchecked = np.ones(targets.shape[1], dtype=bool)
            unchecked[lists["neg_category_ids"]] = False
            unchecked &= targets[r] == 0
            targets[r, unchecked] = np.nan
        for c in lists.get("not_exhaustive_category_ids", []):
            if targets[r, c] == 0:
                targets[r, c] = np.nan


def read_coco_split(
    root: str | Path,
    split: str,
    annotations: str = "annotations/instances_{split}.json",
    images: str = "{split}",
    include_crowd: bool = True,
    min_box_area: float = 0.0,
    classes: ClassMap | None = None,
) -> Split:
    """Read one split's annotations into image paths and multi-hot targets.

    Args:
        root: Dataset root.
        split: Split name, substituted for ``{split}`` in ``annotations`` and ``images``.
        annotations: Annotation file template, relative to ``root``.
        images: Image folder template, relative to ``root``.
        include_crowd: See :func:`multi_hot_targets`.
        min_box_area: See :func:`multi_hot_targets`.
        classes: The training split's classes; this split's categories must match them.

    Returns:
        The split.
    """
    root = Path(root)
    ann_file = root / split_template(annotations, split, "data.annotations")
    coco = load_coco(ann_file)
    own = class_map_of(coco)
    if classes is not None and (own.ids, own.names) != (classes.ids, classes.names):  # ids, and what they name
        pairs = zip(own.names, classes.names)
        diff = next((f"{a!r} vs {b!r}" for a, b in pairs if a != b), f"{len(own)} vs {len(classes)}")
        raise UserError(f"{ann_file}: categories differ from the training split's (or the run's classes.json): {diff}")
    classes = classes or own
    if not len(classes):
        raise UserError(f"{ann_file}: no categories; a multi-label dataset needs at least one")
    image_dir = root / split_template(images, split, "data.images")
    image_ids = sorted(coco.getImgIds())
    paths = [inside(image_dir, coco.imgs[i]["file_name"], f"{ann_file}: image id {i}") for i in image_ids]
    targets = multi_hot_targets(coco, image_ids, classes, include_crowd, min_box_area)
    boxes = object_boxes(coco, image_ids, classes, include_crowd, min_box_area)
    return Split(split, ann_file, image_dir, image_ids, paths, targets, classes, boxes)


def object_boxes(
    coco: COCO, image_ids: list[int], classes: ClassMap, include_crowd: bool = True, min_box_area: float = 0.0
) -> list[np.ndarray]:
    """Per image, the boxes of the objects that make a label, by :func:`multi_hot_targets`' rules.

    Each is ``[k, 5]``: rows of class index, x0, y0, x1, y1 in pixels (for ``cutmix_labels = "area"``).
    """
    column = {cid: i for i, cid in enumerate(classes.ids)}
    row = {img_id: i for i, img_id in enumerate(image_ids)}
    rows: list[list[tuple[float, ...]]] = [[] for _ in image_ids]
    for ann in coco.dataset.get("annotations", []):
        r, box = row.get(ann["image_id"]), ann.get("bbox")
        if r is None or box is None or (ann.get("iscrowd", 0) and not include_crowd) or box[2] * box[3] < min_box_area:
            continue
        x, y, w, h = box
        rows[r].append((column[ann["category_id"]], x, y, x + w, y + h))
    return [np.asarray(b, dtype=np.float32).reshape(-1, 5) for b in rows]
