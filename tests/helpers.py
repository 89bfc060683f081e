"""Test helpers that write data files (kept out of the library)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from finetune.data.folder import CIFAR_SPLITS


def write_fake_cifar10(root: str | Path, n_per_batch: int = 20, seed: int = 0) -> Path:
    """Write tiny batch files in the real CIFAR-10 python format (for tests and demos)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}, f)
    for name in [*CIFAR_SPLITS["train"], *CIFAR_SPLITS["test"]]:
        labels = rng.integers(0, 10, n_per_batch)
        data = (rng.integers(0, 60, (n_per_batch, 3072)) + labels[:, None] * 19).astype(np.uint8)
        doc = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": data,
            b"filenames": [f"{i}.png".encode() for i in range(n_per_batch)],
        }
        with (root / name).open("wb") as f:
            pickle.dump(doc, f)
    return root
