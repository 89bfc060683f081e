"""Which images to show: each class's worst mistakes at its threshold, and single-label confident mistakes.

Arrays in, indices out; then thumbnails as small embedded JPEGs (``data:`` URIs), so a report is one file. Every
selection is capped (classes shown, images per class), so what a report embeds does not grow with the dataset.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from finetune.eval.metrics import average_precision
from finetune.labels import negatives_of, positives_of


@dataclass
class Mistakes:
    """One class's worst mistakes on a split: row indices into the split's predictions, worst first."""

    cls: int
    threshold: float
    false_positives: list[int] = field(default_factory=list)  # negatives scored highest, at or above the threshold
    false_negatives: list[int] = field(default_factory=list)  # positives scored lowest, below the threshold
    counts: tuple[int, int] = (0, 0)  # all false positives and false negatives, shown or not


def class_mistakes(targets: np.ndarray, probs: np.ndarray, cls: int, threshold: float, k: int) -> Mistakes:
    """The ``k`` most confident false positives and the ``k`` least confident false negatives of class ``cls``.

    An image whose label of ``cls`` is unknown is neither.
    """
    p, t, neg = probs[:, cls], positives_of(targets[:, cls]), negatives_of(targets[:, cls])
    fp = np.flatnonzero(neg & (p >= threshold))
    fn = np.flatnonzero(t & (p < threshold))
    counts = (len(fp), len(fn))
    fp = fp[np.argsort(-p[fp], kind="stable")][:k]
    fn = fn[np.argsort(p[fn], kind="stable")][:k]
    return Mistakes(cls, float(threshold), fp.tolist(), fn.tolist(), counts)


def classes_to_show(targets: np.ndarray, probs: np.ndarray, worst: int, requested: list[int]) -> list[int]:
    """The requested classes, then the ``worst`` classes by AP among those with a positive (lowest AP first)."""
    ap = average_precision(targets, probs)
    scored = np.flatnonzero(~np.isnan(ap))
    order = scored[np.argsort(ap[scored], kind="stable")]
    shown = list(dict.fromkeys(requested))
    for c in order.tolist():
        if len(shown) >= len(requested) + worst:
            break
        if c not in shown:
            shown.append(c)
    return shown


def confident_mistakes(targets: np.ndarray, probs: np.ndarray, k: int) -> list[int]:
    """Single-label: the ``k`` wrong top-1 predictions with the highest predicted probability."""
    pred, true = probs.argmax(1), targets.argmax(1)
    wrong = np.flatnonzero(pred != true)
    conf = probs[wrong, pred[wrong]]
    return wrong[np.argsort(-conf, kind="stable")][:k].tolist()


def confused_pairs(targets: np.ndarray, probs: np.ndarray, k: int) -> list[tuple[int, int, int]]:
    """Single-label: the ``k`` most frequent (true, predicted, count) confusions, from the mistakes alone."""
    pred, true = probs.argmax(1), targets.argmax(1)
    wrong = pred != true
    pairs, counts = np.unique(np.stack([true[wrong], pred[wrong]], 1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:k]
    return [(int(pairs[i, 0]), int(pairs[i, 1]), int(counts[i])) for i in order]


def thumbnail_uri(pixels: np.ndarray, side: int = 128, quality: int = 80) -> str:
    """A ``data:image/jpeg;base64`` URI of ``pixels`` (``[h, w, 3]`` uint8) fitted into ``side`` x ``side``."""
    img = Image.fromarray(pixels)
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(data: bytes) -> str:
    """A ``data:image/png;base64`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
