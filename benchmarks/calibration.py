"""Time to calibrate 80 classes x 40,000 samples (COCO val2014 size), vs scikit-learn's precision_recall_curve.

    python benchmarks/calibration.py [--classes 80] [--samples 40000] [--repeats 3]

The reference is what a hand-rolled script does: per class, ``precision_recall_curve`` then the arg-max of F1.
Both give the same best F1 per class (checked here); the ratio is reference time / ours (higher = ours faster).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import precision_recall_curve

from finetune.eval.thresholds import best_thresholds, fit_thresholds


def sklearn_per_class(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    best = np.zeros(y.shape[1])
    for c in range(y.shape[1]):
        prec, rec, _ = precision_recall_curve(y[:, c], p[:, c])
        with np.errstate(invalid="ignore", divide="ignore"):
            best[c] = np.nan_to_num(2 * prec * rec / (prec + rec)).max()
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prevalence = np.clip(rng.lognormal(-4.0, 1.0, args.classes), 0.002, 0.5)  # COCO-like: a few common, many rare
    y = rng.random((args.samples, args.classes)) < prevalence
    logits = rng.normal(-2.5, 1.2, y.shape) + 2.5 * y
    p = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)  # float32 scores, as a model gives
    times = {"ours: best_thresholds": [], "ours: fit_thresholds (+global)": [], "sklearn per class": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        _, ours = best_thresholds(y, p)
        times["ours: best_thresholds"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fit_thresholds(y, p, min_positives=5)
        times["ours: fit_thresholds (+global)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = sklearn_per_class(y, p)
        times["sklearn per class"].append(time.perf_counter() - t)
    assert np.allclose(ours, ref, atol=1e-12), "best F1 differs from scikit-learn's"
    ref_t = min(times["sklearn per class"])
    print(f"{args.classes} classes x {args.samples:,} samples, best of {args.repeats}; best F1 equal to sklearn's")
    for name, ts in times.items():
        print(f"  {name:32s} {min(ts):7.3f} s   ratio sklearn/this {ref_t / min(ts):5.2f}")


if __name__ == "__main__":
    main()
