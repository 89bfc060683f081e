"""Hugging Face ``imagefolder``: a folder per split with ``metadata.csv`` or ``metadata.jsonl`` beside its images.

    train/metadata.jsonl                       train/metadata.csv
    {"file_name": "a.jpg", "labels": ["cat", "dog"]}     file_name,labels
    {"file_name": "b.jpg", "labels": []}                 a.jpg,cat|dog

- ``file_name``: the image, relative to the split folder (as ``datasets`` reads it);
- the label column (``data.label_column``; default ``labels``, else ``label``): for multi-label data a list (JSON
  Lines) or names joined by ``data.label_sep``; for ``data.task = "single_label"`` one value (a name or a number).
Without a metadata file, a split folder of class folders is single-label, as ``datasets`` reads it. This is read
directly, with no ``datasets`` dependency; a folder ``save_to_disk`` wrote is read with ``datasets`` when it is
installed (:mod:`finetune.data.hfdisk`). The classes are ``data.classes`` when given, else the train split's
labels, sorted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.data.classfolders import read_folder_split
from finetune.data.csvfile import Columns, read_records, same_path, targets_of
from finetune.data.hfdisk import is_saved_dataset, read_saved_split
from finetune.data.split import ClassMap, Split, inside
from finetune.errors import UserError

METADATA = ("metadata.csv", "metadata.jsonl")


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, record)`` of a metadata file: CSV rows as strings, JSON Lines objects as they are."""
    if path.suffix == ".csv":
        header, out = read_records(path, "the split folder", skip_blank=True)
        if "file_name" not in header:
            raise UserError(f"{path}:1: no 'file_name' column; imagefolder metadata names each image in file_name")
        return out
    out = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err})") from None
    for line, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict) or "file_name" not in record:
            raise UserError(f"{path}:{line}: no 'file_name'; each line is an object naming its image in file_name")
        out.append((line, record))
    return out


def _label_column(path: Path, records: list[tuple[int, dict[str, Any]]], column: str) -> str:
    """The label column: the one named, else ``labels`` or ``label``, whichever the records have."""
    keys = {k for _, r in records for k in r}
    if column:
        if records and column not in keys:
            raise UserError(f"{path}: data.label_column = {column!r} is not a column; it has {sorted(keys)}")
        return column
    found = next((c for c in ("labels", "label") if c in keys), None)
    if found is None and records:
        raise UserError(f"{path}: no 'labels' or 'label' column; name yours with data.label_column")
    return found or "labels"


def _names(path: Path, line: int, value: Any, sep: str, single: bool) -> list[str]:
    """The class names of one record's label value."""
    if value is None:
        names: list[str] = []
    elif isinstance(value, list):
        names = [str(v).strip() for v in value if str(v).strip()]
    elif isinstance(value, str):
        names = [v.strip() for v in ([value] if single else value.split(sep)) if v.strip()]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        names = [str(value)]
    else:
        raise UserError(f"{path}:{line}: the label is {value!r}; give a name, a number or a list of names")
    if single and len(names) != 1:
        raise UserError(f"{path}:{line}: single-label data has one label per image, this has {len(names)}")
    return names


def _image_paths(path: Path, folder: Path, records: list[tuple[int, dict]]) -> list[Path]:
    """The images the metadata names, each once and inside the split's folder."""
    seen: dict[str, int] = {}
    paths = []
    for line, record in records:
        if not isinstance(record["file_name"], str):
            raise UserError(f"{path}:{line}: file_name is {record['file_name']!r}; give the image's file name")
        name = record["file_name"].strip()
        if not name:
            raise UserError(f"{path}:{line}: empty file_name")
        if same_path(name) in seen:
            raise UserError(
                f"{path}:{line}: duplicate file_name {name!r} (the same image as line {seen[same_path(name)]})"
            )
        seen[same_path(name)] = line
        paths.append(inside(folder, name, f"{path}:{line}"))
    return paths


def read_imagefolder_split(
    root: str | Path,
    split: str,
    label_column: str = "",
    label_sep: str = "|",
    single: bool = False,
    class_names: list[str] | None = None,
    classes: ClassMap | None = None,
) -> Split:
    """Read one split of a Hugging Face imagefolder into image paths and multi-hot (or one-hot) targets.

    Args:
        root: The dataset folder (one folder per split).
        split: The split folder's name.
        label_column: The label column ("" for ``labels`` or ``label``).
        label_sep: Separator of names joined in one string (multi-label).
        single: One label per image (``data.task = "single_label"``).
        class_names: ``data.classes``; None to take the train split's labels, sorted.
        classes: The training split's classes (for val/test).

    Returns:
        The split.
    """
    if is_saved_dataset(Path(root), split):  # written by datasets' save_to_disk
        return read_saved_split(root, split, label_column, single, class_names, classes)
    folder = Path(root) / split
    found = [folder / m for m in METADATA if (folder / m).is_file()]
    if len(found) > 1:
        raise UserError(f"{folder}: both metadata.csv and metadata.jsonl; keep one")
    if not found:
        if not single:
            raise UserError(
                f"{folder}: no metadata.csv or metadata.jsonl; class folders are single-label: set "
                'data.task = "single_label" (or add metadata with a labels column)'
            )
        return read_folder_split(root, split, classes)
    path = found[0]
    records = _records(path)
    column = _label_column(path, records, label_column)
    paths = _image_paths(path, folder, records)
    labels = [(line, (_names(path, line, record.get(column), label_sep, single), [])) for line, record in records]
    if classes is None:
        names = class_names or sorted({n for _, (pos, _) in labels for n in pos})
        if not names:
            raise UserError(f"{path}: the {split!r} split has no labels; set data.classes or label its images")
        classes = ClassMap.of_names(names)
    targets = targets_of(path, labels, classes, [column], Columns(labels=column))
    return Split(split, path, folder, list(range(len(paths))), paths, targets, classes)
