"""PNG plots for a run's calibration report: precision-recall curves with the chosen point, F1 before/after."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402

from finetune.io import atomic_write_bytes  # noqa: E402
from finetune.labels import known_of, positives_of  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def pr_curves(
    targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, names: list[str], path: Path, split: str, k: int = 3
) -> list[str]:
    """PR curves of the ``k`` most and ``k`` least frequent classes (with positives), chosen threshold marked.

    Returns:
        The names of the classes plotted.
    """
    pos, known = positives_of(targets), known_of(targets)
    support = pos.sum(0)
    order = [c for c in np.argsort(-support, kind="stable") if support[c] > 0]
    picked = order[:k] + [c for c in order[-k:] if c not in order[:k]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    groups = ((axes[0], order[:k], "most frequent"), (axes[1], picked[len(order[:k]) :], "least frequent"))
    for ax, group, title in groups:
        for c in group:
            rows = known[:, c]  # unknown labels are left out
            prec, rec, _ = precision_recall_curve(pos[rows, c], probs[rows, c])
            # The threshold goes in the legend: annotations at neighbouring operating points ran into one string.
            label = f"{names[c]} (n={int(support[c])}, t={thresholds[c]:.2f})"
            (line,) = ax.step(rec, prec, where="post", label=label)
            pred = (probs[:, c] >= thresholds[c]) & known[:, c]
            tp = (pred & pos[:, c]).sum()
            p_at = tp / max(pred.sum(), 1)
            r_at = tp / support[c]
            ax.plot([r_at], [p_at], "o", color=line.get_color(), markersize=8, markeredgecolor="black")
        ax.set(title=f"{title} classes ({split})", xlabel="recall", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        if group:
            ax.legend(loc="lower left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no class with positives", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("precision")
    _save(fig, path)
    return [names[c] for c in picked]


# A plot shows at most this many classes: figure size, and so memory and time, must not grow with the class count.
MAX_PLOTTED = 40


def f1_bars(f1_fixed: np.ndarray, f1_cal: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """Per-class F1 at the fixed threshold and at the calibrated thresholds, side by side.

    With more than :data:`MAX_PLOTTED` classes, the ones whose F1 changed most are shown.
    """
    f1_fixed, f1_cal = np.nan_to_num(f1_fixed), np.nan_to_num(f1_cal)
    keep = np.arange(len(names))
    if len(names) > MAX_PLOTTED:
        keep = np.sort(np.argsort(-np.abs(f1_cal - f1_fixed), kind="stable")[:MAX_PLOTTED])
        title = f"{title}\n({MAX_PLOTTED} of {len(names)} classes: the largest changes)"
    x = np.arange(len(keep))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(keep) + 2), 4.2))
    ax.bar(x - 0.2, f1_fixed[keep], 0.4, label="fixed threshold")
    ax.bar(x + 0.2, f1_cal[keep], 0.4, label="calibrated")
    ax.set_xticks(x, [names[i] for i in keep], rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="F1", ylim=(0, 1), title=title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    _save(fig, path)


def most_confused(cm: np.ndarray, k: int = MAX_PLOTTED) -> np.ndarray:
    """Indices (sorted) of the ``k`` classes with the most errors, as true or as predicted class."""
    cm = np.asarray(cm)
    if len(cm) <= k:
        return np.arange(len(cm))
    errors = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    return np.sort(np.argsort(-errors, kind="stable")[:k])


def confusion_png(cm: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """The confusion matrix (rows: true class, columns: predicted), row-normalised colours, counts written.

    With more than :data:`MAX_PLOTTED` classes, the most-confused ones are shown (rows still normalised over all
    predictions), so the figure's size stays bounded whatever the class count.
    """
    cm = np.asarray(cm)
    norm_all = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    keep = most_confused(cm)
    if len(keep) < len(cm):
        title = f"{title} ({len(keep)} most-confused of {len(cm)} classes)"
    cm, norm, names = cm[np.ix_(keep, keep)], norm_all[np.ix_(keep, keep)], [names[i] for i in keep]
    side = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    if len(names) <= 30:
        for i in range(len(names)):
            for j in range(len(names)):
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    _save(fig, path)


def lr_find_png(
    lrs: list[float], losses: list[float], smoothed: list[float], steep: float, path: Path, title: str
) -> None:
    """Loss vs learning rate (log scale) of an LR range test, the suggestion marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed")
    if np.isfinite(steep):
        ax.axvline(steep, color="red", linestyle="--", label=f"steepest descent {steep:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def _stage_starts(records: list[dict]) -> list[float]:
    """The epochs at which a new freeze stage began (drawn as dashed lines between epochs)."""
    stages = [r.get("stage") for r in records]
    return [records[i]["epoch"] - 0.5 for i in range(1, len(records)) if stages[i] != stages[i - 1]]


def training_curves(
    records: list[dict], path: Path, title: str, trained: dict[int, tuple[str, ...]] | None = None
) -> None:
    """Per epoch: train/val loss, the val metrics, each layer group's LR (log scale); stage starts dashed.

    ``records`` are ``metrics.jsonl`` rows. ``trained`` (freeze stage number -> the groups that train in it) leaves a
    frozen group's LR out of the epochs it is frozen: the optimizer keeps a rate for it, but nothing moves. At most
    :data:`MAX_PLOTTED` groups get a line of their own.
    """
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    panels = (
        (axes[0], ("train_loss", "val_loss"), "loss"),
        (axes[1], ("val_map", "val_macro_f1", "val_micro_f1", "val_top1", "val_mean_recall"), "val metric"),
    )
    for ax, keys, label in panels:
        for key in keys:
            pts = [(e, r[key]) for e, r in zip(epochs, records) if isinstance(r.get(key), int | float)]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=key)
        ax.set(xlabel="epoch", ylabel=label)
    groups = list(dict.fromkeys(g for r in records for g in r.get("lr_groups", {})))[:MAX_PLOTTED]
    for g in groups:
        pts = [
            (e, r["lr_groups"][g])
            for e, r in zip(epochs, records)
            if r.get("lr_groups", {}).get(g) and (trained is None or g in trained.get(r.get("stage"), (g,)))
        ]
        if pts:
            axes[2].plot(*zip(*pts), marker=".", label=g)
    if not groups:
        axes[2].plot(epochs, [r.get("lr", np.nan) for r in records], marker=".", label="lr")
    axes[2].set(xlabel="epoch", ylabel="LR of the groups that train (end of epoch)", yscale="log")
    for ax in axes:
        for x in _stage_starts(records):
            ax.axvline(x, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if ax is axes[2] else 1)
    fig.suptitle(title + ("; dashed: a new freeze stage begins" if _stage_starts(records) else ""))
    _save(fig, path)


def reliability_png(
    targets: np.ndarray, before: np.ndarray, after: np.ndarray, path: Path, title: str, bins: int = 15
) -> None:
    """Reliability diagram over every known (image, class) entry: observed frequency vs mean probability per bin."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    known = known_of(targets).ravel()
    y = positives_of(targets).ravel()[known]
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for probs, label in ((before, "before"), (after, "after")):
        p = np.asarray(probs, dtype=np.float64).ravel()[known]
        which = np.minimum((p * bins).astype(int), bins - 1)
        count = np.bincount(which, minlength=bins)
        filled = count > 0
        conf = np.bincount(which, weights=p, minlength=bins)[filled] / count[filled]
        freq = np.bincount(which, weights=y.astype(np.float64), minlength=bins)[filled] / count[filled]
        ax.plot(conf, freq, marker="o", label=label)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def coverage_accuracy_png(reject: dict, path: Path) -> None:
    """The held-out coverage/accuracy curve of the reject option, with its target and chosen point marked."""
    c, h = reject["curve"], reject["held_out"]
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.plot(c["coverage"], c["accuracy"], label="threshold on the top probability")
    ax.axhline(reject["target"], color="grey", linestyle="--", linewidth=1, label=f"target {reject['target']:g}")
    if h["accuracy"] is not None:
        label = f"chosen: t = {reject['threshold']:.3f}"
        ax.plot([h["coverage"]], [h["accuracy"]], "o", markersize=8, markeredgecolor="black", label=label)
    ax.set(xlabel="coverage (share of images answered)", ylabel="accuracy of the answered", xlim=(0, 1.02))
    ax.set_title(f"reject option, {h['how']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)
