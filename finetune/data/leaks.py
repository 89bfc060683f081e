"""Duplicate and leaked images: the same picture twice in a split, or in two splits (train and test, say).

A leak across splits silently inflates every number a report prints: the model has seen the test image. Two kinds:

- **exact**: the same decoded pixels (SHA-256 of them: a file re-saved losslessly is the same picture);
- **near**: the same picture re-encoded, resized or lightly edited: perceptual hashes (imagehash's DCT ``phash``,
  64 bits) at most ``max_distance`` bits apart. Hashes are compared in vectorised chunks (n x n / 2 XOR-popcounts:
  about a second for 10,000 images), not in a Python double loop.

``finetune validate --check-images`` reports both, within and across splits; a leak across splits is a warning
unless ``data.on_leak = "error"``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from finetune.data.split import Split, check_images

NEAR_DISTANCE = 6  # bits of 64: a JPEG re-encode or a resize moves a phash by 0-4 bits; unrelated photos by ~32
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass(frozen=True)
class Duplicate:
    """Two images that are the same picture."""

    kind: str  # "exact", "near" (phash) or "similar" (backbone features)
    a: tuple[str, str]  # (split role, path)
    b: tuple[str, str]
    distance: int  # phash bits apart (0 for exact)
    cosine: float | None = None  # "similar": the cosine of the two images' pooled features

    @property
    def leak(self) -> bool:
        """The pair spans two splits."""
        return self.a[0] != self.b[0]

    def line(self) -> str:
        """One readable line."""
        where = f"{self.a[0]}<->{self.b[0]}" if self.leak else f"within {self.a[0]}"
        how = f"cosine {self.cosine:.3f}" if self.cosine is not None else f"{self.distance} bits"
        return f"{self.kind} duplicate ({where}, {how}): {self.a[1]} and {self.b[1]}"


def _fingerprints(split: Split) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """Per readable image: its name, a digest of its pixels and its 64-bit phash as 8 bytes; and the problems.

    The images are decoded once, by :func:`~finetune.data.split.check_images` (which reports the unreadable ones).
    """
    import imagehash

    names, digests, hashes = [], [], []

    def fingerprint(i: int, pixels: np.ndarray) -> None:
        in_memory = isinstance(split.image_paths, np.ndarray)
        names.append(f"#{i}" if in_memory else str(split.image_paths[i]))
        digests.append(hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest())
        hashes.append(np.packbits(imagehash.phash(Image.fromarray(pixels)).hash.flatten()))

    problems = check_images(split.image_paths, decode=True, each=fingerprint)
    return names, digests, np.array(hashes, dtype=np.uint8).reshape(-1, 8), problems


def _near_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 512) -> list[tuple[int, int, int]]:
    """Index pairs ``i < j`` whose hashes are at most ``max_distance`` bits apart, with the distance."""
    pairs = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        dist = _POPCOUNT[block[:, None, :] ^ hashes[None, :, :]].sum(-1, dtype=np.int32)
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if start + r < c:
                pairs.append((start + r, c, int(dist[r, c])))
    return pairs


def scan_images(splits: dict[str, Split], max_distance: int = NEAR_DISTANCE) -> tuple[list[str], list[Duplicate]]:
    """Decode every image of ``splits`` (role -> split) once: the unreadable ones, and the duplicates among the rest.

    Returns:
        ``check_images``' problems, and the exact and near duplicates within and across splits (leaks first).
    """
    roles, names, digests, hashes, problems = [], [], [], [], []
    for role, split in splits.items():
        n, d, h, p = _fingerprints(split)
        roles += [role] * len(n)
        names += n
        digests += d
        hashes.append(h)
        problems += p
    if not names:
        return problems, []
    found = []
    for i, j, dist in _near_pairs(np.concatenate(hashes), max_distance):
        kind = "exact" if digests[i] == digests[j] else "near"
        found.append(Duplicate(kind, (roles[i], names[i]), (roles[j], names[j]), 0 if kind == "exact" else dist))
    return problems, sorted(found, key=lambda d: (not d.leak, d.kind != "exact", d.distance))


def find_duplicates(splits: dict[str, Split], max_distance: int = NEAR_DISTANCE) -> list[Duplicate]:
    """Exact and near duplicates within and across ``splits``; leaks across splits first."""
    return scan_images(splits, max_distance)[1]


# Cosine of pooled efficientnet_lite0 (ImageNet) features: on coco-small the most alike different pictures reach
# 0.82, planted crops / flips / re-encodes have a 10th percentile of 0.82 (benchmarks/near_duplicates.py).
MIN_COSINE = 0.85  # the default of validate --min-cosine


def similar_pairs(
    feats: np.ndarray, where: list[tuple[str, str]], min_cosine: float = MIN_COSINE, chunk: int = 1024
) -> list[Duplicate]:
    """Pairs of images whose L2-normalised features have a cosine of at least ``min_cosine`` (chunked, vectorised).

    Phash misses a cropped or mirrored copy (15% and 0% found on coco-small at no false pair); backbone features
    find 88% and 82% of them there (``benchmarks/near_duplicates.py``).

    Args:
        feats: ``[n, d]`` pooled features.
        where: ``(split role, path)`` of each row.
        min_cosine: The similarity from which a pair is listed.
        chunk: Rows compared at a time (memory is ``chunk x n``).
    """
    f = np.asarray(feats, dtype=np.float32)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    found = []
    for start in range(0, len(f), chunk):
        sims = f[start : start + chunk] @ f.T
        for r, c in zip(*np.nonzero(sims >= min_cosine)):
            i, j = start + int(r), int(c)
            if i < j:
                found.append(Duplicate("similar", where[i], where[j], -1, float(sims[r, c])))
    return found


def merge(found: list[Duplicate], similar: list[Duplicate]) -> list[Duplicate]:
    """``found`` (hash pairs) plus the feature pairs they do not already hold; leaks first."""
    seen = {frozenset((d.a, d.b)) for d in found}
    extra = [d for d in similar if frozenset((d.a, d.b)) not in seen]
    return sorted([*found, *extra], key=lambda d: (not d.leak, ("exact", "near", "similar").index(d.kind), d.distance))
