"""Probabilities that mean what they say: per-class temperature or Platt scaling, ECE and Brier score.

A sigmoid trained on rare positives is rarely calibrated: a score of 0.8 is not right 80% of the time. Per class,
on the calibration split's logits ``z`` (recovered from the probabilities), the scaled probability is
``sigmoid(a * z + b)``:

- ``temperature``: ``b = 0``, ``a = 1 / T``;
- ``platt``: ``a`` and ``b`` both fitted (Platt 1999).

Both minimise the binary cross-entropy against Platt's smoothed targets (``(N+ + 1) / (N+ + 2)`` for a positive,
``1 / (N- + 2)`` for a negative), which keeps the optimum finite when a class is separable, with ``a > 0`` so the
ranking (AP) is unchanged; L-BFGS in float64 over every class at once (the losses are separable). A class without a
positive or without a negative keeps ``a = 1, b = 0``. The tests check Platt against scikit-learn's
``LogisticRegression`` on the logit, temperature against a brute-force 1-D search, and ECE / Brier against
``calibration_curve`` / ``brier_score_loss``.

Single-label runs (softmax) take ``temperature`` only: one ``T`` for every class, ``softmax(z / T)``, fitted by the
cross-entropy of the labels (smoothed as Platt's) on the calibration split (Guo et al., 2017); ECE there is the
top-label ECE (confidence = the top probability, hit = the top class is right) and Brier the multi-class one
(summed over classes).

The scaling is linear in the logit, so it folds into the classifier layer (``W' = a W``, ``b' = a b0 + b``): every
consumer of the run's model (``eval``, ``predict``, every export) gives the scaled probabilities. Unknown labels
(NaN targets) take no part in a fit, in ECE or in the Brier score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from finetune.labels import known_of, negatives_of, positives_of

METHODS = ("none", "temperature", "platt")
# float32 probabilities resolve 1 - p down to ~6e-8 (a logit of ~16.6) but p itself down to ~1e-38 (-87): the clip
# keeps what float32 can tell apart, so a low threshold sees the scaled score the folded model gives
_LOW, _HIGH = 1e-37, 1 - 6e-8


def logits_of(probs: np.ndarray) -> np.ndarray:
    """The logits behind sigmoid probabilities (clipped to what float32 resolves: about -85 .. +16.6)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _LOW, _HIGH)
    return np.log(p) - np.log1p(-p)


def smoothed_targets(targets: np.ndarray) -> np.ndarray:
    """Platt's targets: ``(N+ + 1) / (N+ + 2)`` for a positive, ``1 / (N- + 2)`` for a negative, per class.

    Unknown entries get 0 (their weight in a fit is 0).
    """
    y, n = positives_of(targets), negatives_of(targets)
    pos, neg = y.sum(0), n.sum(0)
    return np.where(y, (pos + 1.0) / (pos + 2.0), np.where(n, 1.0 / (neg + 2.0), 0.0))


@dataclass
class Scaling:
    """Per-class ``sigmoid(a * logit + b)``, or (``softmax``) ``softmax(a * logits + b)`` over the classes."""

    method: str
    a: np.ndarray
    b: np.ndarray
    names: list[str] = field(default_factory=list)
    split: str = ""
    softmax: bool = False

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Scaled probabilities of ``[n, classes]`` sigmoid (or softmax) probabilities."""
        if self.softmax:
            z = self.a * np.log(np.clip(np.asarray(probs, dtype=np.float64), _LOW, None)) + self.b
            e = np.exp(z - z.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        z = self.a * logits_of(probs) + self.b
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for ``probabilities.json``."""
        names = self.names or [str(i) for i in range(len(self.a))]
        rows = [{"name": n, "a": float(a), "b": float(b)} for n, a, b in zip(names, self.a, self.b)]
        activation = "softmax" if self.softmax else "sigmoid"
        return {"method": self.method, "activation": activation, "split": self.split, "classes": rows}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Scaling:
        """Read what :meth:`to_json` wrote."""
        rows = doc["classes"]
        a, b = np.array([r["a"] for r in rows]), np.array([r["b"] for r in rows])
        softmax = doc.get("activation") == "softmax"
        return cls(doc["method"], a, b, [r["name"] for r in rows], doc.get("split", ""), softmax)


def fit_softmax_temperature(targets: np.ndarray, probs: np.ndarray, max_iter: int = 200) -> Scaling:
    """One temperature for a single-label run: ``softmax(log p / T)`` with the least cross-entropy.

    The targets are smoothed as Platt's are (the label ``(n + 1) / (n + 2)``, the other classes share ``1 / (n + 2)``):
    on a split the model gets all right the hard-label optimum is ``T -> 0``, every score saturated at 1.
    """
    c = np.asarray(probs).shape[1]
    n = len(probs)
    z = torch.from_numpy(np.log(np.clip(np.asarray(probs, dtype=np.float64), _LOW, None)))
    t = torch.from_numpy(softmax_targets(targets))
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_a], lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -(t * torch.log_softmax(torch.exp(log_a) * z, 1)).sum(1).mean()
        loss.backward()
        return loss

    if n and c > 1:
        opt.step(closure)
    return Scaling("temperature", np.full(c, float(torch.exp(log_a.detach()))), np.zeros(c), softmax=True)


def softmax_targets(targets: np.ndarray) -> np.ndarray:
    """Platt-smoothed one-hot targets of ``n`` rows: ``(n + 1) / (n + 2)`` on the label, ``1 / (n + 2)`` shared."""
    y = np.asarray(targets, dtype=np.float64)
    n, c = y.shape
    return np.where(y > 0.5, (n + 1.0) / (n + 2.0), 1.0 / ((n + 2.0) * max(c - 1, 1)))


def top_label(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-label: whether the top class is the label (0/1), and the top probability, each ``[n, 1]``."""
    probs = np.asarray(probs, dtype=np.float64)
    return (probs.argmax(1) == np.asarray(targets).argmax(1)).astype(np.float64)[:, None], probs.max(1)[:, None]


def fit_scaling(
    targets: np.ndarray,
    probs: np.ndarray,
    method: str,
    min_positives: int = 1,
    max_iter: int = 200,
    softmax: bool = False,
) -> Scaling:
    """Fit per-class temperature or Platt scaling on one split's probabilities (see the module docstring).

    ``softmax``: a single-label run's probabilities, one temperature for all classes.

    A class with fewer than ``min_positives`` positives (or negatives) keeps its probabilities (``a = 1, b = 0``):
    a fit on a handful of positives would pull its scores toward that handful's share, below the pooled threshold
    such a class takes (on coco-small Platt on every class cost 8 points of held-out macro-F1, see the README).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    c = np.asarray(probs).shape[1]
    if method == "none":
        return Scaling(method, np.ones(c), np.zeros(c))
    if softmax:
        if method != "temperature":
            raise ValueError(f"a softmax takes temperature scaling only, not {method!r}")
        return fit_softmax_temperature(targets, probs, max_iter)
    y, neg = positives_of(targets), negatives_of(targets)
    m = max(1, min_positives)
    active = torch.from_numpy((y.sum(0) >= m) & (neg.sum(0) >= m))
    z = torch.from_numpy(logits_of(probs))
    t = torch.from_numpy(smoothed_targets(targets))
    known = torch.from_numpy(known_of(targets).astype(np.float64))
    per_class = known.sum(0).clamp(min=1)
    log_a = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=(method == "platt"))
    params = [log_a, b] if method == "platt" else [log_a]
    opt = torch.optim.LBFGS(
        params, lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = torch.exp(log_a) * z + b
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, t, reduction="none")
        loss = (bce * known).sum(0) / per_class
        total = (loss * active).sum()
        total.backward()
        return total

    opt.step(closure)
    a = torch.where(active, torch.exp(log_a), torch.ones_like(log_a)).detach().numpy()
    bias = torch.where(active, b, torch.zeros_like(b)).detach().numpy()
    return Scaling(method, a, bias)


def ece(targets: np.ndarray, probs: np.ndarray, bins: int = 15, softmax: bool = False) -> float:
    """Expected calibration error over every known (image, class) entry pooled: equal-width bins, weighted by count.

    ``softmax``: the top-label ECE of single-label probabilities (one entry per image: its top probability).
    """
    if softmax:
        return ece(*top_label(targets, probs), bins)
    known = known_of(targets).ravel()
    y, p = positives_of(targets).ravel()[known], np.asarray(probs, dtype=np.float64).ravel()[known]
    which = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    conf = np.bincount(which, weights=p, minlength=bins)
    hits = np.bincount(which, weights=y.astype(np.float64), minlength=bins)
    filled = count > 0
    return float((np.abs(hits[filled] - conf[filled])).sum() / len(p))


def brier(targets: np.ndarray, probs: np.ndarray, softmax: bool = False) -> float:
    """Brier score over every known (image, class) entry pooled: the mean squared error of the probabilities.

    ``softmax``: the multi-class Brier score (squared errors summed over classes, averaged over images).
    """
    if softmax:
        return float(((np.asarray(probs, dtype=np.float64) - np.asarray(targets)) ** 2).sum(1).mean())
    known = known_of(targets)
    y, p = positives_of(targets)[known].astype(np.float64), np.asarray(probs, dtype=np.float64)[known]
    return float(((p - y) ** 2).mean())


def fold_into(linear: torch.nn.Linear, scaling: Scaling) -> None:
    """Fold ``sigmoid(a * z + b)`` into the classifier layer that computes ``z``, in place."""
    a = torch.as_tensor(scaling.a, dtype=linear.weight.dtype, device=linear.weight.device)
    b = torch.as_tensor(scaling.b, dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        linear.weight.mul_(a[:, None])
        if linear.bias is None:
            linear.bias = torch.nn.Parameter(b.clone())
        else:
            linear.bias.mul_(a).add_(b)
