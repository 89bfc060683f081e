"""Single-label datasets: image folders (one folder per class inside each split folder) and CIFAR-10 batches.

Both produce the same :class:`~finetune.data.coco.Split` as the COCO reader, with one-hot targets, so the
dataset, loaders and trainer are shared; the loss (cross-entropy) and the metrics (top-k accuracy) differ.

CIFAR-10 is read from the "python version" batches as torchvision stores them (``cifar-10-batches-py/``:
``data_batch_1`` ... ``data_batch_5``, ``test_batch``, ``batches.meta``), from disk only, never downloaded. The
batches are pickles; they are read with an unpickler that only accepts the built-in and NumPy types such a batch
holds, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from finetune.data.split import ClassMap, Split
from finetune.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((len(labels), n), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def read_folder_split(root: str | Path, split: str, classes: ClassMap | None = None) -> Split:
    """``root/<split>/<class>/<image>``; classes are the train split's folder names in sorted order.

    Args:
        root: Dataset root.
        split: Split folder name.
        classes: The training split's classes (for val/test); None to read them from this split.

    Returns:
        The split, with one-hot targets.
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"{folder}: split folder not found; check data.root and the split names")
    dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        if len(dirs) < 2:
            raise UserError(f"{folder}: expected one folder per class (at least 2), found {len(dirs)}")
        classes = ClassMap(tuple(range(len(dirs))), tuple(dirs))
    unknown = [d for d in dirs if d not in classes.names]
    if unknown:
        raise UserError(f"{folder / unknown[0]}: class folder not in the training split's classes")
    paths, labels = [], []
    for index, name in enumerate(classes.names):
        files = (
            sorted(f for f in (folder / name).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if (folder / name).is_dir()
            else []
        )
        paths += files
        labels += [index] * len(files)
    if not paths:
        raise UserError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    targets = _one_hot(np.array(labels), len(classes))
    return Split(split, folder, folder, list(range(len(paths))), paths, targets, classes)


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: not a CIFAR batch")


def _load_batch(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: CIFAR-10 batch file not found; data.root should be the cifar-10-batches-py folder")
    try:
        with path.open("rb") as f:
            doc = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in doc.items()}


def read_cifar10_split(root: str | Path, split: str, classes: ClassMap | None = None) -> Split:
    """CIFAR-10 ``train`` (data_batch_1..5), ``test`` (test_batch), or one named batch, as in-memory images."""
    root = Path(root)
    files = CIFAR_SPLITS.get(split, [split])
    meta = _load_batch(root / "batches.meta")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta["label_names"])
    classes = classes or ClassMap(tuple(range(len(names))), names)
    images, labels = [], []
    for name in files:
        batch = _load_batch(root / name)
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{root / name}: data is {data.shape}, expected [n, 3072] (3 x 32 x 32, channel-major)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    image_array, label_array = np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    if label_array.min() < 0 or label_array.max() >= len(classes):
        raise UserError(f"{root}: labels outside 0..{len(classes) - 1}")
    targets = _one_hot(label_array, len(classes))
    return Split(split, root / files[0], root, list(range(len(label_array))), image_array, targets, classes)
