"""The linear-probe stage: the classifier solved to its optimum on frozen features (the "LP" of LP-FT).

Kumar et al. (ICLR 2022, "Fine-Tuning can Distort Pretrained Features") show that fine-tuning from a probed head
beats fine-tuning from a random one, in and out of distribution. An epoch-based optimizer rarely reaches the probe's
optimum in a few epochs; a full-batch convex solver does. The objective is scikit-learn's ``LogisticRegression``
(one binary problem per class for multi-label, multinomial for single-label): the task's loss averaged over the
images plus ``||W||^2 / (2 C n)`` (the intercept is not penalized), minimized by L-BFGS in float64. ``C`` is picked
from a list by k-fold cross-validation on the training features or by mAP on the validation split.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from safetensors.torch import save
from sklearn.model_selection import KFold
from torch import nn

from finetune import runfiles
from finetune.eval.predict import EvalSettings
from finetune.eval.tasks import Task
from finetune.hooks.feature_cache import extract_features
from finetune.hooks.freezing import FreezePolicy
from finetune.io import atomic_write_bytes
from finetune.train.loop import Hook, Loop


def solve_linear_head(
    feats: torch.Tensor,
    targets: torch.Tensor,
    task: Task,
    c: float,
    max_iter: int = 500,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[classes, dim]`` and bias ``[classes]`` minimizing the task's loss + ``||W||^2 / (2 C n)``.

    A multi-label class with no positive (or no negative) in ``targets`` has no finite optimum; scikit-learn refuses
    it. Here it gets zero weights and the smoothed log-odds of its frequency as bias, and is left out of the solve.
    An unknown label (NaN) leaves its image out of that class's problem: each class is scikit-learn's logistic
    regression on the images where it is known (its loss and penalty averaged over those ``n_c``, not ``n``).
    ``init`` (a solution for another ``C``) warm-starts the solver.
    """
    x, y = feats.double(), targets.double()
    n, d = x.shape
    known = ~torch.isnan(y)
    per_class = known.sum(0).double() if task.calibrates else torch.full((y.shape[1],), float(n), dtype=torch.float64)
    count = torch.where(known, y, torch.zeros_like(y)).sum(0)
    active = (count > 0) & (count < per_class) if task.calibrates else torch.ones_like(count, dtype=torch.bool)
    prior = (count + 0.5) / (per_class + 1.0)
    weight = torch.zeros(y.shape[1], d, dtype=torch.float64)
    bias = torch.log(prior / (1 - prior)) if task.calibrates else torch.zeros(y.shape[1], dtype=torch.float64)
    w = torch.zeros(int(active.sum()), d, dtype=torch.float64)
    b = torch.zeros(int(active.sum()), dtype=torch.float64)
    if init is not None:
        w, b = init[0][active].clone(), init[1][active].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    lbfgs = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    ya, na = y[:, active], per_class[active]

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = task.head_loss(x @ w.T + b, ya) + ((w**2).sum(1) / na).sum() / (2 * c)
        loss.backward()
        return loss

    if active.any():
        with torch.enable_grad():
            lbfgs.step(closure)
        weight[active], bias[active] = w.detach(), b.detach()
    return weight, bias


def _map(task: Task, feats: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    probs = task.activation(feats.double() @ weight.T + bias).numpy()
    return task.metrics(targets.numpy(), probs, 0.5)["map"]


def out_of_fold_probs(
    task: Task, x: torch.Tensor, y: torch.Tensor, cs: list[float], folds: int = 5, seed: int = 0, max_iter: int = 500
) -> dict[float, torch.Tensor]:
    """Per ``C``: every row scored by the head solved on the other folds (each fold warm-started through the Cs)."""
    order = sorted(cs)  # increasing C, each solve warm-started from the last
    probs = {c: torch.zeros_like(y, dtype=torch.float64) for c in order}
    for fit_idx, score_idx in KFold(min(folds, len(x)), shuffle=True, random_state=seed).split(x):
        init = None
        for c in order:
            init = solve_linear_head(x[fit_idx], y[fit_idx], task, c, max_iter, init=init)
            probs[c][score_idx] = task.activation(x[score_idx].double() @ init[0].T + init[1])
    return probs


def best_c(cs: list[float], scores: dict[float, float]) -> float:
    """The ``C`` with the best score (NaN counts as worst); ties: the stronger regularization."""
    return max(cs, key=lambda c: (np.nan_to_num(scores[c], nan=-1.0), -c))


def choose_c(
    task: Task,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    cs: list[float],
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 500,
) -> tuple[float, dict[float, float], dict[float, tuple[torch.Tensor, torch.Tensor]]]:
    """The ``C`` with the best mAP: on ``val`` when given, else on out-of-fold predictions of ``train``.

    Returns:
        The chosen C, the mAP of every C, and the solutions on all of ``train`` computed on the way (val mode).
    """
    scores: dict[float, float] = {}
    solved: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    x, y = train
    order = sorted(cs)  # increasing C, each solve warm-started from the last
    if val is not None:
        init = None
        for c in order:
            init = solved[c] = solve_linear_head(x, y, task, c, max_iter, init=init)
            scores[c] = _map(task, *val, *init)
    else:
        probs = out_of_fold_probs(task, x, y, cs, folds, seed, max_iter)
        scores = {c: task.metrics(y.numpy(), probs[c].numpy(), 0.5)["map"] for c in order}
    return best_c(cs, scores), scores, solved


class ProbeHook(Hook):
    """Before the first epoch of a fresh run, set the classifier to the solved linear probe.

    Args:
        policy: The freeze policy (its frozen network computes the features, BN in eval mode).
        train_loader: The training split with the eval transform, in order.
        val_loader: The validation split, used when ``select = "val"``.
        cs: The ``C`` values to try.
        select: ``kfold`` (on train) or ``val``.
        seed: For the fold split.
        max_iter: L-BFGS iterations per solve (each C).
        train_features: Gives the training split's pooled features and targets ``(settings, console)`` instead of
            extracting them from ``train_loader`` (the next stage's cached maps, :meth:`FeatureCache.pooled`).
    """

    def __init__(
        self,
        policy: FreezePolicy,
        train_loader: Any,
        val_loader: Any,
        *,
        cs: list[float],
        select: str = "kfold",
        seed: int = 0,
        train_features: Any = None,
        max_iter: int = 500,
    ) -> None:
        self.policy, self.train_loader, self.val_loader = policy, train_loader, val_loader
        self.train_features, self.max_iter = train_features, max_iter
        self.cs, self.select, self.seed = cs, select, seed
        self.result: dict[str, Any] = {}
        self.head: dict[str, torch.Tensor] = {}  # the solved classifier, saved as RUN/probe.safetensors

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        if loop.state.epoch == 0 and loop.state.step == 0:  # resumed: the solved, since trained, head is saved
            self.fit(loop.model, loop.settings, loop.console)

    def fit(self, model: nn.Module, settings: EvalSettings, console: Any) -> None:
        """Extract features, pick C, and set ``model``'s classifier to the solution."""
        start = time.perf_counter()
        opts = {"device": settings.device, "precision": settings.precision, "channels_last": settings.channels_last}
        opts = {**opts, "console": console}
        if self.train_features is not None:
            train = tuple(t.cpu() for t in self.train_features(settings, console))
        else:
            train = tuple(
                t.cpu() for t in extract_features(self.policy, self.train_loader, **opts, label="probe (train)")
            )
        val = None
        if self.select == "val":
            val = tuple(t.cpu() for t in extract_features(self.policy, self.val_loader, **opts, label="probe (val)"))
        c, scores, solved = choose_c(settings.task, train, val, self.cs, seed=self.seed, max_iter=self.max_iter)
        weight, bias = solved[c] if c in solved else solve_linear_head(*train, settings.task, c, self.max_iter)
        head = model.get_classifier()
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))
        self.head = {"weight": head.weight.detach().float().cpu().clone(), "bias": head.bias.detach().float().cpu()}
        how = "val mAP" if val is not None else "5-fold mAP on train"
        self.result = {
            "c": c,
            "scores": {str(k): v for k, v in scores.items()},
            "selected_by": how,
            "time_s": time.perf_counter() - start,
        }
        shown = ", ".join(f"C={k:g}: {100 * v:.1f}" for k, v in scores.items())
        console.print(f"linear probe (L-BFGS): {how} {shown}; C = {c:g} ({self.result['time_s']:.1f}s)")

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        if self.result and record["epoch"] == 1:
            record["probe"] = self.result
            if loop.is_main and self.head:  # the probe alone stays scorable after later stages change the network
                atomic_write_bytes(loop.run_dir / runfiles.PROBE, save(self.head))
