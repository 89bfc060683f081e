"""Open Images image-level labels: ``ImageID,LabelName,Confidence`` rows (Open Images' ``Source`` column ignored).

    ImageID,Source,LabelName,Confidence         # {split}-annotations-human-imagelabels.csv (data.openimages_labels)
    000002b66c9c498e,verification,/m/014j1m,1
    000002b66c9c498e,verification,/m/0cmf2,0

Confidence 1 is a verified positive and 0 a verified negative (Open Images' human verification). A class an image
has no row for was never checked: unknown (NaN, left out of the loss, the metrics and calibration) by default, or a
negative with ``data.openimages_absent = "negative"``. Images are ``<images>/<ImageID>.jpg``.

Class names are ``LabelName`` s, or with ``data.openimages_classes`` (a ``LabelName,DisplayName`` CSV, with or without
its header line) their display names (with the LabelName added where two share one). The classes are
``data.classes`` (names as shown) when given, else every class of the train split, sorted; a row of another class
is left out, as Open Images' 20,000 classes are usually cut down.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from finetune.data.csvfile import read_records, read_table
from finetune.data.split import ClassMap, Split, inside, split_template
from finetune.errors import UserError
from finetune.labels import UNKNOWN

COLUMNS = ("ImageID", "LabelName", "Confidence")


def read_class_names(path: Path) -> dict[str, str]:
    """``LabelName`` -> display name from a class description CSV (a first line ``LabelName,DisplayName`` skipped)."""
    header, body = read_table(path, "data.openimages_classes")
    rows = ([(1, header)] if header[:1] != ["LabelName"] else []) + body
    names: dict[str, str] = {}
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"{path}:{line}: expected LabelName,DisplayName")
        names[row[0].strip()] = row[1].strip()
    shared = {n for n, k in Counter(names.values()).items() if k > 1}  # two LabelNames, one DisplayName
    return {label: f"{name} ({label})" if name in shared else name for label, name in names.items()}


def _labels(path: Path) -> tuple[list[str], list[tuple[int, str, str, float]]]:
    """Image ids in first-seen order and ``(line, image, label, 0 or 1)`` rows of an image-level label CSV."""
    header, body = read_records(path, "data.openimages_labels", skip_blank=True)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}:1: no {missing[0]!r} column; Open Images label files have {', '.join(COLUMNS)}")
    images: dict[str, None] = {}
    rows = []
    for line, row in body:
        image, label, conf = (row[c] for c in COLUMNS)
        if conf not in ("0", "1"):
            raise UserError(
                f"{path}:{line}: Confidence is {conf!r}; Open Images labels are 1 (positive) or 0 (negative)"
            )
        if not image or not label:
            raise UserError(f"{path}:{line}: empty ImageID or LabelName")
        images.setdefault(image)
        rows.append((line, image, label, float(conf)))
    return list(images), rows


def read_openimages_split(
    root: str | Path,
    split: str,
    labels_file: str,
    images: str = "{split}",
    class_file: str = "",
    absent: str = "unknown",
    class_names: list[str] | None = None,
    classes: ClassMap | None = None,
) -> Split:
    """Read one split of Open Images image-level labels into image paths and targets (unchecked pairs unknown).

    Args:
        root: Dataset root.
        split: Substituted for ``{split}`` in ``labels_file`` and ``images``.
        labels_file: The label CSV relative to ``root`` (``data.openimages_labels``).
        images: The image folder relative to ``root``.
        class_file: A class description CSV relative to ``root`` ("" for none).
        absent: ``unknown`` or ``negative``: an (image, class) pair with no row.
        class_names: ``data.classes``; None to take the train split's classes, sorted.
        classes: The training split's classes (for val/test).

    Returns:
        The split.
    """
    root = Path(root)
    path = root / split_template(labels_file, split, "data.openimages_labels")
    image_ids, rows = _labels(path)
    shown = read_class_names(root / class_file) if class_file else {}
    name_of = lambda label: shown.get(label, label)  # noqa: E731
    if classes is None:
        names = class_names or sorted({name_of(label) for _, _, label, _ in rows})
        classes = ClassMap.of_names(names)
    column = {name: i for i, name in enumerate(classes.names)}
    row_of = {image: r for r, image in enumerate(image_ids)}
    targets = np.full((len(image_ids), len(classes)), UNKNOWN if absent == "unknown" else 0.0, dtype=np.float32)
    given: dict[tuple[int, int], tuple[int, float]] = {}
    for line, image, label, value in rows:
        c = column.get(name_of(label))
        if c is None:
            continue
        r = row_of[image]
        if (r, c) in given and given[(r, c)][1] != value:
            raise UserError(
                f"{path}:{line}: {image} {label} is {int(value)} here and {int(given[(r, c)][1])} at line "
                f"{given[(r, c)][0]}; keep one"
            )
        given[(r, c)] = (line, value)
        targets[r, c] = value
    folder = root / split_template(images, split, "data.images")
    paths = [inside(folder, f"{image}.jpg", f"{path}: ImageID {image!r}") for image in image_ids]
    return Split(split, path, folder, list(range(len(paths))), paths, targets, classes)
