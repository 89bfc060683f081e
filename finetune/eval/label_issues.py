"""Suspected label errors from out-of-fold probabilities, with cleanlab (the ``finetune[inspect]`` extra).

Arrays in, ranked rows out. The probabilities must be out-of-fold (no image scored by a model that saw its label);
:func:`finetune.runs.report_page.out_of_fold` makes them with a k-fold linear probe on the run's pooled features.

Multi-label: cleanlab's ``find_label_issues`` (confident learning, one-vs-rest per class) flags images; they are
ranked by cleanlab's ``get_label_quality_scores`` (lowest first), and each flagged image names its suspected
**missing** labels (not given, but the class looks present) and **extra** labels (given, but the class looks absent)
from ``find_multilabel_issues_per_class``. A class with fewer than ``min_positives`` positives is left out of the
analysis: confident learning cannot estimate its noise. Single-label: ``cleanlab.filter.find_label_issues`` and the
suggested label is the predicted class.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from finetune.errors import UserError
from finetune.labels import negatives_of, positives_of

INSTALL = "pip install 'finetune[inspect]'"


@dataclass
class Issue:
    """One image whose labels look wrong."""

    row: int  # index into the arrays given
    quality: float  # cleanlab's label quality score, 0 (surely wrong) .. 1
    missing: list[int]  # classes not labelled that look present
    extra: list[int]  # classes labelled that look absent


def cleanlab_missing() -> str | None:
    """Why the label-issue pass cannot run here (cleanlab is not installed), or None."""
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        return f"suspected label errors need cleanlab: {INSTALL}"
    return None


def _multi_label(targets: np.ndarray, probs: np.ndarray, min_positives: int) -> list[Issue]:
    from cleanlab.multilabel_classification.filter import find_label_issues, find_multilabel_issues_per_class
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    pos, neg = positives_of(targets), negatives_of(targets)
    keep = np.flatnonzero((pos.sum(0) >= min_positives) & (neg.sum(0) >= min_positives))
    if len(keep) < 2:
        raise UserError(f"label issues: fewer than 2 classes with {min_positives}+ positives and negatives")
    p = np.clip(probs[:, keep], 1e-6, 1 - 1e-6)
    known = pos[:, keep] | neg[:, keep]
    # cleanlab needs every entry labelled: an unknown one gets the model's own guess, so it does not count against
    # its image, and no suspect is ever named on it
    t = np.where(known, pos[:, keep], p >= 0.5)
    labels = [np.flatnonzero(row).tolist() for row in t]
    flagged = np.flatnonzero(find_label_issues(labels, p, n_jobs=1))
    quality = get_label_quality_scores(labels, p)
    per_class = np.asarray(find_multilabel_issues_per_class(labels, p, n_jobs=1)) & known  # [n, kept classes]
    out = []
    for i in flagged[np.argsort(quality[flagged], kind="stable")]:
        suspects = np.flatnonzero(per_class[i])
        if not len(suspects) and known[i].any():  # flagged as a whole: the least likely given (known) label
            suspects = [int(np.argmax(np.where(known[i], np.where(t[i], 1 - p[i], p[i]), -1.0)))]
        if not len(suspects):
            continue
        missing = [int(keep[k]) for k in suspects if not t[i, k]]
        extra = [int(keep[k]) for k in suspects if t[i, k]]
        out.append(Issue(int(i), float(quality[i]), missing, extra))
    return out


def _single_label(targets: np.ndarray, probs: np.ndarray) -> list[Issue]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = targets.argmax(1)
    p = probs / probs.sum(1, keepdims=True)
    flagged = find_label_issues(labels, p, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(labels, p)
    return [Issue(int(i), float(quality[i]), [int(p[i].argmax())], [int(labels[i])]) for i in flagged]


def find_issues(targets: np.ndarray, probs: np.ndarray, multi_label: bool, min_positives: int = 3) -> list[Issue]:
    """Images whose labels look wrong, most suspicious first.

    Args:
        targets: Given labels, ``[n, classes]`` multi-hot (or one-hot).
        probs: Out-of-fold probabilities, same shape.
        multi_label: Multi-label (sigmoid per class) or single-label (softmax).
        min_positives: Multi-label: classes with fewer positives (or negatives) are left out.
    """
    if cleanlab_missing():
        raise UserError(cleanlab_missing())
    if multi_label:
        return _multi_label(np.asarray(targets), np.asarray(probs, dtype=np.float64), min_positives)
    return _single_label(np.asarray(targets), np.asarray(probs, dtype=np.float64))


HEADER = ["rank", "split", "image", "quality", "suspected missing", "suspected extra", "given labels", "top predicted"]


def issue_rows(
    issues: list[Issue], targets: np.ndarray, probs: np.ndarray, names: list[str], where: list[tuple[str, str]]
) -> list[list[str]]:
    """Rows for ``label_issues.csv`` and the report: ``where[row]`` is the image's (split, path)."""
    rows = []
    for rank, s in enumerate(issues, 1):
        top = np.argsort(-probs[s.row], kind="stable")[:3]
        given = "; ".join(names[c] for c in np.flatnonzero(positives_of(targets[s.row])))
        predicted = "; ".join(f"{names[c]} {probs[s.row, c]:.2f}" for c in top)
        missing = "; ".join(f"{names[c]} {probs[s.row, c]:.2f}" for c in s.missing)
        extra = "; ".join(f"{names[c]} {probs[s.row, c]:.2f}" for c in s.extra)
        rows.append([str(rank), *where[s.row], f"{s.quality:.4f}", missing, extra, given, predicted])
    return rows


def csv_text(rows: list[list[str]]) -> str:
    """``label_issues.csv``: a header row, then one row per suspected image."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    return buf.getvalue()
