"""Multi-label metrics as pure functions of arrays: mAP and per-class / macro / micro precision, recall, F1.

Definitions (the README repeats them):
- AP per class is scikit-learn's ``average_precision_score`` (step-wise area under the PR curve, ties grouped);
  mAP is the mean over classes with at least one positive. Pascal VOC's interpolated APs (VOC07 11-point, VOC10
  area) are :func:`voc_ap`, which a VOC run's report also prints.
- Unknown labels (NaN in the targets, "not checked") count nowhere: a class's AP, TP, FP, FN and support are over
  the rows where that class is known (a prediction on an unknown entry is neither right nor wrong).
- Per-class P = TP / (TP + FP) (0 when nothing is predicted), R = TP / (TP + FN), F1 = 2TP / (2TP + FP + FN).
- Macro-F1 is the mean per-class F1 over classes with at least one positive; micro-F1 pools TP/FP/FN of all classes.
- ML-GCN's (Chen et al., CVPR 2019) CP / CR are the macro precision / recall, and CF1 = 2 CP CR / (CP + CR) (the
  harmonic mean of the averages, not the average F1); OP / OR / OF1 are the micro precision / recall / F1.
Written with NumPy so one call scores every class at once; the tests check every number against scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune.labels import known_of, positives_of


def _check(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positives, known entries and float64 scores, with the shapes checked."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"expected two [samples, classes] arrays of one shape, got {y_true.shape} and {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    if y_true.dtype == bool:
        return y_true, np.ones_like(y_true), scores
    return positives_of(y_true), known_of(y_true), scores


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class average precision (NaN for a class with no positives), equal to scikit-learn's.

    Args:
        y_true: ``[n, c]`` multi-hot ground truth.
        scores: ``[n, c]`` scores or probabilities.

    Returns:
        ``[c]`` AP values.
    """
    y_true, known, scores = _check(y_true, scores)
    ap = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        rows = known[:, c]
        pos = y_true[rows, c]
        n_pos = pos.sum()
        if n_pos == 0:
            continue
        order = np.argsort(-scores[rows, c], kind="stable")
        s, t = scores[rows, c][order], pos[order]
        tp = np.cumsum(t)
        # Tied scores form one threshold: evaluate precision and recall only at the last sample of each tie group.
        ends = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
        tp_at = tp[ends]
        precision = tp_at / (ends + 1)
        recall_step = np.diff(np.r_[0, tp_at]) / n_pos
        ap[c] = float(np.sum(recall_step * precision))
    return ap


def voc_ap(y_true: np.ndarray, scores: np.ndarray, eleven_point: bool = True) -> np.ndarray:
    """Per-class Pascal VOC AP: VOC2007's 11-point interpolated AP, or VOC2010's area under the interpolated curve.

    ``eleven_point=False`` gives the area form. NaN for a class with no positives; unknown entries (VOC's difficult)
    are left out.

    Interpolated precision at recall r is the highest precision at any recall >= r, as the VOC devkit computes it;
    this differs from :func:`average_precision` (the report's mAP), which takes no maximum.
    """
    y_true, known, scores = _check(y_true, scores)
    ap = np.full(y_true.shape[1], np.nan)
    for c in range(y_true.shape[1]):
        pos, s = y_true[known[:, c], c], scores[known[:, c], c]
        if not pos.any():
            continue
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(pos[order])
        recall, precision = tp / pos.sum(), tp / np.arange(1, len(s) + 1)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
        if eleven_point:
            at = [envelope[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
            ap[c] = float(np.mean(at))
        else:
            ap[c] = float(np.sum(np.diff(np.r_[0.0, recall]) * envelope))
    return ap


def counts_at(y_true: np.ndarray, scores: np.ndarray, thresholds: float | np.ndarray = 0.5) -> dict[str, np.ndarray]:
    """Per-class TP, FP, FN and support when predicting ``score >= threshold``.

    ``thresholds`` is one value, one per class (``[c]``) or one per sample and class (``[n, c]``, cross-fitting).
    Unknown entries count in none of them.
    """
    y_true, known, scores = _check(y_true, scores)
    pred = scores >= np.broadcast_to(np.asarray(thresholds, dtype=np.float64), scores.shape)
    return {
        "tp": (pred & y_true).sum(0),
        "fp": (pred & ~y_true & known).sum(0),
        "fn": (~pred & y_true).sum(0),
        "support": y_true.sum(0),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def prf(y_true: np.ndarray, scores: np.ndarray, thresholds: float | np.ndarray = 0.5) -> dict[str, Any]:
    """Per-class and summary precision, recall and F1 at ``thresholds``.

    Returns:
        ``precision``, ``recall``, ``f1``, ``support`` (per class, arrays) and ``macro_precision``,
        ``macro_recall``, ``macro_f1``, ``micro_precision``, ``micro_recall``, ``micro_f1`` (floats).
    """
    k = counts_at(y_true, scores, thresholds)
    tp, fp, fn = k["tp"], k["fp"], k["fn"]
    out: dict[str, Any] = {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "support": k["support"],
    }
    has_pos = k["support"] > 0
    for name in ("precision", "recall", "f1"):
        out[f"macro_{name}"] = float(out[name][has_pos].mean()) if has_pos.any() else float("nan")
    TP, FP, FN = tp.sum(), fp.sum(), fn.sum()
    out["micro_precision"] = float(_ratio(TP, TP + FP))
    out["micro_recall"] = float(_ratio(TP, TP + FN))
    out["micro_f1"] = float(_ratio(2 * TP, 2 * TP + FP + FN))
    cp, cr = out["macro_precision"], out["macro_recall"]
    out["cf1"] = float(2 * cp * cr / (cp + cr)) if cp + cr > 0 else 0.0
    return out


def summarize(y_true: np.ndarray, scores: np.ndarray, thresholds: float | np.ndarray = 0.5) -> dict[str, float]:
    """The headline numbers: mAP and macro/micro P/R/F1 at ``thresholds``."""
    ap = average_precision(y_true, scores)
    m = prf(y_true, scores, thresholds)
    keys = [f"{a}_{b}" for a in ("macro", "micro") for b in ("precision", "recall", "f1")]
    out = {"map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"), **{k: m[k] for k in keys}}
    out.update(cp=m["macro_precision"], cr=m["macro_recall"], cf1=m["cf1"])
    out.update(op=m["micro_precision"], **{"or": m["micro_recall"]}, of1=m["micro_f1"])
    return out


def labels_of(targets: np.ndarray) -> np.ndarray:
    """Class indices from one-hot (or probability) targets."""
    return np.asarray(targets).argmax(axis=1)


def topk_accuracy(labels: np.ndarray, probs: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose label is among the ``k`` highest scores (ties broken by the lower class index)."""
    probs = np.asarray(probs, dtype=np.float64)
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


def confusion(labels: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``[n, n]`` counts: row = true class, column = predicted class."""
    out = np.zeros((n, n), dtype=np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(pred)), 1)
    return out


def summarize_single(targets: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Single-label headline numbers: top-1 / top-5 accuracy, mean per-class recall (balanced accuracy), mAP.

    Mean recall and mAP are over classes present in the split.
    """
    y = labels_of(targets)
    cm = confusion(y, np.asarray(probs).argmax(axis=1), probs.shape[1])
    support = cm.sum(1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(len(cm)), where=support > 0)
    ap = average_precision(np.asarray(targets) > 0.5, probs)
    return {
        "top1": topk_accuracy(y, probs, 1),
        "top5": topk_accuracy(y, probs, 5),
        "mean_recall": float(recall[support > 0].mean()),
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
    }
