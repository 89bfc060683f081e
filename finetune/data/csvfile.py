"""Multi-label data as a CSV file: one image per row, its labels in one column or one 0/1 column per class.

    path,labels,split                      path,cat,dog,split
    img/001.jpg,cat|dog,train              img/001.jpg,1,1,train
    img/002.jpg,,val                       img/002.jpg,0,0,val

- ``path``: the image, relative to ``data.root`` (an absolute path is used as is).
- ``labels``: label names separated by ``data.label_sep`` (``|``); empty for an image with no label. Without a
  ``labels`` column, every column other than ``path`` and ``split`` is a class and holds 0 or 1.
- ``split``: the row's split (``data.train`` / ``data.val`` / ``data.test``). Instead of a split column, ``data.csv``
  may contain ``{split}`` to name one file per split (``"{split}.csv"``).

Unknown labels (a class not checked for an image: neither positive nor negative; Open Images' "not verified"):

    path,labels,split                      path,cat,dog,split
    img/003.jpg,cat|-dog,train             img/003.jpg,1,,train

- labels form: the class name with a ``-`` prefix (``-dog``), or a separate ``unknown`` column listing the unknown
  classes (``cat,dog``, separated like ``labels``): one syntax per file, a file using both is refused;
- class-column form: an empty cell.
So in labels form a class name cannot start with ``-``, and ``unknown`` is a reserved column name in both forms.
Unknown entries are left out of the loss, the linear probe, every metric and calibration (see the README).

The classes are ``data.classes`` when given, else the labels (or class columns) of the train split, sorted. An
undeclared label, an empty row, a duplicate path, a value other than 0/1/empty, a class both given and unknown, or
a file mixing the two unknown syntaxes is a one-line error naming the file and line.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from finetune.data.split import ClassMap, Split
from finetune.errors import UserError
from finetune.labels import UNKNOWN

RESERVED = ("path", "split", "labels", "unknown")


def _rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs of a CSV file, with one-line errors for its form."""
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found; check data.root and data.csv")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            body = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"{path}: not a readable UTF-8 CSV file ({err})") from None
    if "path" not in header:
        raise UserError(f"{path}: no 'path' column in the header {header}; the first line must name the columns")
    rows = []
    for line, row in body:
        if not any(cell.strip() for cell in row):
            raise UserError(f"{path}:{line}: empty row; remove it")
        if len(row) != len(header):
            raise UserError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        rows.append((line, {h: cell.strip() for h, cell in zip(header, row)}))
    return header, rows


def _names(cell: str, sep: str) -> list[str]:
    return [name.strip() for name in cell.split(sep) if name.strip()]


def _labels_of(path: Path, line: int, row: dict[str, str], header: list[str], sep: str) -> tuple[list[str], list[str]]:
    """The row's positive and unknown class names."""
    if "labels" in header:
        given = _names(row["labels"], sep)
        prefixed = [name[1:].strip() for name in given if name.startswith("-")]
        unknown = prefixed + (_names(row["unknown"], sep) if "unknown" in header else [])
        if prefixed and "unknown" in header:
            raise UserError(
                f"{path}:{line}: unknown labels given both as '-name' and in the 'unknown' column; use one syntax"
            )
        positive = [name for name in given if not name.startswith("-")]
        both = sorted(set(positive) & set(unknown))
        if both:
            raise UserError(f"{path}:{line}: {both[0]!r} is both a label and unknown; keep one")
        return positive, unknown
    names, unknown = [], []
    for column in header:
        if column in RESERVED:
            continue
        if row[column] not in ("0", "1", ""):
            raise UserError(
                f"{path}:{line}: column {column!r} holds {row[column]!r}; class columns hold 0, 1 or empty (unknown)"
            )
        if row[column] == "1":
            names.append(column)
        elif row[column] == "":
            unknown.append(column)
    return names, unknown


def read_csv_split(
    root: str | Path,
    split: str,
    csv_file: str,
    label_sep: str = "|",
    class_names: list[str] | None = None,
    classes: ClassMap | None = None,
) -> Split:
    """Read one split of a CSV dataset into image paths and multi-hot targets.

    Args:
        root: Dataset root; image paths are relative to it.
        split: The split name (a ``split`` column value, or substituted for ``{split}`` in ``csv_file``).
        csv_file: The CSV file relative to ``root``.
        label_sep: Separator inside the ``labels`` column.
        class_names: The classes, in order (``data.classes``); None to take the train split's labels, sorted.
        classes: The training split's classes (for val/test).

    Returns:
        The split.
    """
    root = Path(root)
    path = root / csv_file.format(split=split)
    header, rows = _rows(path)
    per_file = "{split}" in csv_file
    if not per_file and "split" not in header:
        raise UserError(f"{path}: no 'split' column; add one, or set data.csv to a name with {{split}} per split file")
    if "unknown" in header and "labels" not in header:
        raise UserError(f"{path}: an 'unknown' column needs a 'labels' column; in class-column form leave a cell empty")
    if "labels" not in header and not [h for h in header if h not in RESERVED]:
        raise UserError(f"{path}: no 'labels' column and no class columns")
    chosen = [(line, row) for line, row in rows if per_file or row["split"] == split]
    seen: dict[str, int] = {}
    paths, labels = [], []
    for line, row in chosen:
        if not row["path"]:
            raise UserError(f"{path}:{line}: empty path")
        if row["path"] in seen:
            raise UserError(f"{path}:{line}: duplicate path {row['path']!r} (first at line {seen[row['path']]})")
        seen[row["path"]] = line
        paths.append(root / row["path"])
        labels.append((line, _labels_of(path, line, row, header, label_sep)))
    if classes is None:
        names = class_names or sorted({name for _, (pos, unk) in labels for name in pos + unk})
        if not names:
            raise UserError(f"{path}: the {split!r} split has no labels; set data.classes or label its rows")
        classes = ClassMap(tuple(range(1, len(names) + 1)), tuple(names))
    index = {name: i for i, name in enumerate(classes.names)}
    targets = np.zeros((len(paths), len(classes)), dtype=np.float32)
    columns = "labels" not in header  # an empty cell of a column that is not a class is ignored, as a 0 there is
    for r, (line, (positive, unknown)) in enumerate(labels):
        unknown = [name for name in unknown if name in index] if columns else unknown
        for name, value in [(name, 1.0) for name in positive] + [(name, UNKNOWN) for name in unknown]:
            if name not in index:
                known = ", ".join(classes.names[:10]) + (", ..." if len(classes) > 10 else "")
                raise UserError(f"{path}:{line}: undeclared label {name!r}; the classes are {known} (data.classes)")
            targets[r, index[name]] = value
    return Split(split, path, root, list(range(len(paths))), paths, targets, classes)
