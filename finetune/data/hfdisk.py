"""A Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``DatasetDict``, or one ``Dataset`` per split).

Read with ``datasets.load_from_disk`` when ``datasets`` is installed (it is not a dependency). The image column is
the one whose feature is ``Image``; the label column is ``data.label_column`` (default ``labels``, else ``label``):
a ``ClassLabel`` (its names), a list of them (multi-label) or strings. Images stored as bytes in the Arrow files are
written once, by content hash, to ``$FINETUNE_CACHE_DIR/hf-images`` (``~/.cache/finetune``) so the loaders read
files like every other format; images stored as paths are read where they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from finetune.data.csvfile import Columns, targets_of
from finetune.data.split import ClassMap, Split
from finetune.errors import UserError
from finetune.io import atomic_write_bytes, cache_dir


def is_saved_dataset(root: Path, split: str) -> bool:
    """Whether ``root`` (a DatasetDict) or ``root/split`` (a Dataset) was written by ``save_to_disk``."""
    return (root / "dataset_dict.json").is_file() or (root / split / "state.json").is_file()


def _load(root: Path, split: str) -> tuple[Any, Any]:
    """The ``datasets`` module and the split's ``Dataset``."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{root}: a save_to_disk dataset needs Hugging Face datasets: pip install -e '.[hf]'") from None
    if (root / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(root))
        if split not in saved:
            raise UserError(f"{root}: no split {split!r} (it has {', '.join(saved)}); check data.train / val / test")
        return datasets, saved[split]
    return datasets, datasets.load_from_disk(str(root / split))


def _cached(data: bytes, name: str) -> Path:
    """Image bytes as a file in the cache, named by their hash (written once, atomically)."""
    path = cache_dir("hf-images") / (hashlib.sha256(data).hexdigest()[:32] + (Path(name).suffix or ".img"))
    if not path.is_file():
        atomic_write_bytes(path, data)
    return path


def _label_names(where: Path, feature: Any, values: list[Any]) -> tuple[list[list[str]], list[str] | None]:
    """Each row's label names, and the names a ``ClassLabel`` declares (None for plain strings)."""
    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) / List(ClassLabel)
    label = inner if inner is not None else feature
    names = list(label.names) if hasattr(label, "names") else None
    rows = []
    for r, v in enumerate(values):
        items = v if isinstance(v, list) else ([] if v is None else [v])
        if names is not None and any(not isinstance(i, int) or not 0 <= i < len(names) for i in items):
            bad = next(i for i in items if not isinstance(i, int) or not 0 <= i < len(names))
            raise UserError(
                f"{where}: row {r} has label {bad!r}, not one of the {len(names)} ClassLabel names (-1: none)"
            )
        rows.append([names[i] if names is not None else str(i) for i in items])
    return rows, names


def read_saved_split(
    root: str | Path,
    split: str,
    label_column: str = "",
    single: bool = False,
    class_names: list[str] | None = None,
    classes: ClassMap | None = None,
) -> Split:
    """One split of a ``save_to_disk`` folder as image paths and multi-hot (or one-hot) targets."""
    root = Path(root)
    datasets, ds = _load(root, split)
    images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not images:
        raise UserError(f"{root}: the {split!r} split has no Image column (its columns: {', '.join(ds.features)})")
    column = label_column or next((c for c in ("labels", "label") if c in ds.features), "")
    if column not in ds.features:
        raise UserError(f"{root}: no label column {column or 'labels'!r}; name it with data.label_column")
    rows, declared = _label_names(root, ds.features[column], ds[column])
    if single and any(len(r) != 1 for r in rows):
        bad = next(i for i, r in enumerate(rows) if len(r) != 1)
        raise UserError(f"{root}: {split!r} row {bad} has {len(rows[bad])} labels; single-label data has one")
    paths = []
    for i, item in enumerate(ds.cast_column(images[0], datasets.Image(decode=False))[images[0]]):
        if item.get("bytes"):
            paths.append(_cached(item["bytes"], item.get("path") or f"{i}.img"))
        elif item.get("path"):
            paths.append(Path(item["path"]))
        else:
            raise UserError(f"{root}: {split!r} row {i} has no image")
    if classes is None:
        names = class_names or declared or sorted({n for r in rows for n in r})
        classes = ClassMap.of_names(names)
    labels = [(i, (r, [])) for i, r in enumerate(rows)]
    targets = targets_of(root, labels, classes, [column], Columns(labels=column))
    return Split(split, root, root, list(range(len(paths))), paths, targets, classes)
