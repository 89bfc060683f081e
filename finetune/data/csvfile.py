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

The column names are the user's own with ``data.path_column``, ``data.label_column`` and ``data.split_column``
(fastai's ``from_df``). With ``data.task = "single_label"`` the labels column holds one class name per row.
Unknown entries are left out of the loss, the linear probe, every metric and calibration (see the README).

The classes are ``data.classes`` when given, else the labels (or class columns) of the train split, sorted. An
undeclared label, an empty row, a duplicate path, a value other than 0/1/empty, a class both given and unknown, or
a file mixing the two unknown syntaxes is a one-line error naming the file and line.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.split import ClassMap, Split, split_template
from finetune.errors import UserError
from finetune.labels import UNKNOWN


@dataclass(frozen=True)
class Columns:
    """The CSV's column names (``data.path_column``, ``data.label_column``, ``data.split_column``)."""

    path: str = "path"
    labels: str = "labels"
    split: str = "split"
    unknown: str = "unknown"

    @property
    def reserved(self) -> tuple[str, ...]:
        """The columns that are not classes in class-column form."""
        return (self.path, self.split, self.labels, self.unknown)


def read_table(path: Path, what: str = "data.csv") -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, cells)`` of a UTF-8 CSV file; a malformed quote or repeated column is one line.

    ``csv`` is strict here: a stray quote (``a,"b"c``), a quote left open, or one closed on a later line (a cell
    holding a line break, which no path or label has) raises with its line, where the default dialect would silently
    join or split cells.
    """
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found; check data.root and {what}")
    line = 1
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = [h.strip() for h in next(reader, [])]
            line = reader.line_num + 1  # where the next row starts: the line an error names
            body = []
            for row in reader:
                if reader.line_num > line:  # a quote opened here and closed rows later: two rows read as one
                    raise csv.Error(f"a quoted cell runs on to line {reader.line_num}")
                body.append((line, row))
                line = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 CSV file ({err})") from None
    except csv.Error as err:
        raise UserError(f"{path}:{line}: malformed CSV ({err}); check the quotes on that line") from None
    repeated = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if repeated is not None:
        raise UserError(f"{path}:1: column {repeated!r} appears twice in the header; rename or remove one")
    return header, body


def same_path(cell: str) -> str:
    """The form two spellings of one image path share: ``./train/x.jpg`` and ``train//x.jpg`` are ``train/x.jpg``."""
    return os.path.normpath(cell).replace("\\", "/")


def read_records(
    path: Path, what: str = "data.csv", skip_blank: bool = False
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line, {column: stripped cell})`` of a CSV file (:func:`read_table`'s checks).

    A row with another number of fields than the header is one line; so is an empty row, unless ``skip_blank``.
    """
    header, body = read_table(path, what)
    rows = []
    for line, row in body:
        if not any(cell.strip() for cell in row):
            if skip_blank:
                continue
            raise UserError(f"{path}:{line}: empty row; remove it")
        if len(row) != len(header):
            raise UserError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        rows.append((line, {h: cell.strip() for h, cell in zip(header, row)}))
    return header, rows


def _rows(path: Path, columns: Columns) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs of a CSV dataset file, with one-line errors for its form."""
    header, rows = read_records(path)
    if columns.path not in header:
        key = "" if columns.path == "path" else " (data.path_column)"
        raise UserError(
            f"{path}: no {columns.path!r} column{key} in the header {header}; the first line names the columns"
        )
    return header, rows


def _names(cell: str, sep: str) -> list[str]:
    return [name.strip() for name in cell.split(sep) if name.strip()]


def _labels_of(path: Path, line: int, row: dict[str, str], header: list[str], sep: str, c: Columns) -> tuple:
    """The row's positive and unknown class names."""
    if c.labels in header:
        given = _names(row[c.labels], sep)
        prefixed = [name[1:].strip() for name in given if name.startswith("-")]
        if "" in prefixed:
            raise UserError(f"{path}:{line}: a bare '-'; an unknown label names its class, as in '-cat'")
        unknown = prefixed + (_names(row[c.unknown], sep) if c.unknown in header else [])
        if prefixed and c.unknown in header:
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
        if column in c.reserved:
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


def _check_header(path: Path, header: list[str], c: Columns, per_file: bool, named: bool, single: bool) -> None:
    """One line for a header the chosen form cannot read."""
    if c.labels not in header and "" in header:  # class columns: an unnamed one would be a class named ""
        raise UserError(f"{path}:1: column {header.index('') + 1} of the header has no name; name every class column")
    if not per_file and c.split not in header:
        key = " (data.split_column)" if c.split != "split" else ""
        raise UserError(
            f"{path}: no {c.split!r} column{key}; add one, or set data.csv to a name with {{split}} per split file"
        )
    if named and c.labels not in header:
        raise UserError(f"{path}: data.label_column = {c.labels!r} is not a column of the header {header}")
    if single and c.labels not in header:
        raise UserError(f"{path}: single-label data needs a {c.labels!r} column holding one class name per row")
    if c.unknown in header and c.labels not in header:
        raise UserError(f"{path}: an 'unknown' column needs a 'labels' column; in class-column form leave a cell empty")
    if c.labels not in header and not [h for h in header if h not in c.reserved]:
        raise UserError(f"{path}: no {c.labels!r} column and no class columns")


def read_csv_split(
    root: str | Path,
    split: str,
    csv_file: str,
    label_sep: str = "|",
    class_names: list[str] | None = None,
    classes: ClassMap | None = None,
    columns: Columns | None = None,
    single: bool = False,
    named: bool = False,
) -> Split:
    """Read one split of a CSV dataset into image paths and multi-hot (or, ``single``, one-hot) targets.

    Args:
        root: Dataset root; image paths are relative to it.
        split: The split name (a split column value, or substituted for ``{split}`` in ``csv_file``).
        csv_file: The CSV file relative to ``root``.
        label_sep: Separator inside the labels column.
        class_names: The classes, in order (``data.classes``); None to take the train split's labels, sorted.
        classes: The training split's classes (for val/test).
        columns: The column names (default ``path``, ``labels``, ``split``).
        single: One class name per row (``data.task = "single_label"``).
        named: The labels column was named by the user (``data.label_column``): it must exist.

    Returns:
        The split.
    """
    root, c = Path(root), columns or Columns()
    path = root / split_template(csv_file, split, "data.csv")
    header, rows = _rows(path, c)
    per_file = "{split}" in csv_file
    _check_header(path, header, c, per_file, named, single)
    chosen = [(line, row) for line, row in rows if per_file or row[c.split] == split]
    seen: dict[str, int] = {}
    paths, labels = [], []
    for line, row in chosen:
        if not row[c.path]:
            raise UserError(f"{path}:{line}: empty path")
        key = same_path(row[c.path])
        if key in seen:
            raise UserError(f"{path}:{line}: duplicate path {row[c.path]!r} (the same image as line {seen[key]})")
        seen[key] = line
        paths.append(root / row[c.path])
        if single:
            if not row[c.labels]:
                raise UserError(f"{path}:{line}: no label; single-label rows name one class")
            labels.append((line, ([row[c.labels]], [])))
        else:
            labels.append((line, _labels_of(path, line, row, header, label_sep, c)))
    if classes is None:
        names = class_names or sorted({name for _, (pos, _) in labels for name in pos})  # '-x' alone makes no class
        if not names:
            raise UserError(f"{path}: the {split!r} split has no labels; set data.classes or label its rows")
        classes = ClassMap.of_names(names)
    return Split(
        split, path, root, list(range(len(paths))), paths, targets_of(path, labels, classes, header, c), classes
    )


def targets_of(path: Path, labels: list, classes: ClassMap, header: list[str], c: Columns) -> np.ndarray:
    """The target matrix of ``(line, (positive, unknown))`` rows; an undeclared label is one line naming it."""
    index = {name: i for i, name in enumerate(classes.names)}
    targets = np.zeros((len(labels), len(classes)), dtype=np.float32)
    columns = c.labels not in header  # an empty cell of a column that is not a class is ignored, as a 0 there is
    for r, (line, (positive, unknown)) in enumerate(labels):
        unknown = [name for name in unknown if name in index] if columns else unknown
        for name, value in [(name, 1.0) for name in positive] + [(name, UNKNOWN) for name in unknown]:
            if name not in index:
                known = ", ".join(classes.names[:10]) + (", ..." if len(classes) > 10 else "")
                raise UserError(f"{path}:{line}: undeclared label {name!r}; the classes are {known} (data.classes)")
            targets[r, index[name]] = value
    return targets
