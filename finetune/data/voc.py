"""Pascal VOC: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``, ``ImageSets/Main/<split>.txt`` (one id per line).

Every ``<object>`` of an image makes its ``<name>`` positive, except ``<difficult>1</difficult>`` objects, which
follow ``data.voc_difficult``:

- ``"unknown"`` (VOC07's protocol, the default): a class whose only objects in the image are difficult is unknown
  there (NaN: left out of the loss, the probe, the metrics and calibration);
- ``"positive"``: difficult objects count like any other;
- ``"ignore"``: they are dropped (the class is negative unless a normal object has it).

The classes are ``data.classes`` when given, else the train split's object names, sorted (for VOC's 20 classes,
that is VOC's own order). Each object's box is kept (0-based pixels) for ``cutmix_labels = "area"``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from finetune.data.split import ClassMap, Split, inside
from finetune.errors import UserError
from finetune.labels import UNKNOWN

Obj = tuple[str, bool, tuple[float, float, float, float] | None]  # name, difficult, box (x0, y0, x1, y1)


def _ids(path: Path) -> list[tuple[int, str]]:
    """``(line, image id)`` pairs of an ImageSets file (VOC's ``<split>.txt``; a second column is ignored)."""
    if not path.is_file():
        raise UserError(f"{path}: VOC image set not found; check data.root and the split names")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err})") from None
    out, seen = [], {}
    for line, text in enumerate(lines, 1):
        if text.strip():
            image_id = text.split()[0]
            if image_id in seen:
                raise UserError(f"{path}:{line}: image id {image_id!r} again (line {seen[image_id]}); list it once")
            seen[image_id] = line
            out.append((line, image_id))
    return out


def _number(obj: ET.Element, tag: str, where: str) -> float:
    text = obj.findtext(f"bndbox/{tag}")
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{where}: <bndbox><{tag}> is {text!r}, not a finite number")
    return value


def read_objects(xml_file: Path, where: str) -> tuple[str, list[Obj]]:
    """The image file name and the objects of one VOC annotation file; ``where`` names the image set line."""
    if not xml_file.is_file():
        raise UserError(f"{where}: no annotation file {xml_file}; remove the id from the image set or add the file")
    try:
        tree = ET.parse(xml_file).getroot()
    except (ET.ParseError, LookupError, ValueError) as err:  # an encoding unknown, or multi-byte (gbk)
        raise UserError(f"{xml_file}: not readable XML ({err})") from None
    objects: list[Obj] = []
    for k, obj in enumerate(tree.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise UserError(f"{xml_file}: <object> {k} has no <name>")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        box = None
        if obj.find("bndbox") is not None:  # VOC pixels are 1-based and inclusive
            x0, y0, x1, y1 = (_number(obj, t, f"{xml_file}: <object> {k}") for t in ("xmin", "ymin", "xmax", "ymax"))
            box = (x0 - 1.0, y0 - 1.0, x1, y1)
        objects.append((name, difficult, box))
    if not objects:
        raise UserError(f"{xml_file}: no <object>; VOC annotations list at least one object per image")
    return (tree.findtext("filename") or f"{xml_file.stem}.jpg").strip(), objects


def read_voc_split(
    root: str | Path,
    split: str,
    difficult: str = "unknown",
    class_names: list[str] | None = None,
    classes: ClassMap | None = None,
) -> Split:
    """Read one VOC split into image paths, multi-hot targets (difficult-only classes as ``difficult`` says) and boxes.

    Args:
        root: The VOC folder (``VOC2007/``: it holds ``Annotations``, ``JPEGImages``, ``ImageSets``).
        split: The image set (``train``, ``val``, ``trainval``, ``test``).
        difficult: ``unknown``, ``positive`` or ``ignore`` (``data.voc_difficult``).
        class_names: ``data.classes``; None to take the train split's object names, sorted.
        classes: The training split's classes (for val/test).

    Returns:
        The split.
    """
    root = Path(root)
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    read = [(i, read_objects(root / "Annotations" / f"{i}.xml", f"{ids_file}:{line}")) for line, i in _ids(ids_file)]
    if classes is None:
        names = class_names or sorted({o[0] for _, (_, objs) in read for o in objs})
        classes = ClassMap.of_names(names)
    index = {name: i for i, name in enumerate(classes.names)}
    targets = np.zeros((len(read), len(classes)), dtype=np.float32)
    paths, boxes, files = [], [], {}
    for r, (image_id, (file_name, objects)) in enumerate(read):
        xml = root / "Annotations" / f"{image_id}.xml"
        if file_name in files:
            raise UserError(f"{xml}: <filename> {file_name!r} is also {files[file_name]}'s image; one file per image")
        files[file_name] = xml.name
        paths.append(inside(root / "JPEGImages", file_name, str(xml)))
        kept = []
        for name, hard, box in objects:
            if name not in index:
                shown = ", ".join(classes.names[:10]) + (", ..." if len(classes) > 10 else "")
                xml_file = root / "Annotations" / f"{image_id}.xml"
                raise UserError(f"{xml_file}: <object> {name!r} is not a class of this data ({shown}; data.classes)")
            c = index[name]
            if hard and difficult == "ignore":
                continue
            if hard and difficult == "unknown":
                targets[r, c] = 1.0 if targets[r, c] == 1.0 else UNKNOWN
            else:
                targets[r, c] = 1.0
            if box is not None:
                kept.append((c, *box))
        boxes.append(np.asarray(kept, dtype=np.float32).reshape(-1, 5))
    return Split(split, ids_file, root / "JPEGImages", list(range(len(paths))), paths, targets, classes, boxes)
