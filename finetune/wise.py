"""WiSE-FT: the selected weights mixed with the weights training started from, the mix chosen on val.

Wortsman et al. (CVPR 2022, "Robust fine-tuning of zero-shot models") interpolate every weight between the model
before fine-tuning and after it, ``(1 - a) * start + a * tuned``; a mix is often better than either end, in and out
of distribution. Here "start" is the model as the first epoch found it: after a solver stage, the linear probe on
the pretrained backbone. At the end of the run each ``a`` of ``train.wise`` is scored on the val split with the run's
selection metric, and ``best.pt`` gets the best mix (``a = 0`` is the probe itself, ``a = 1`` the tuned weights). So
a fine-tune that did not help on val falls back toward the probe, and one that did keeps what helped.

The start weights are written once to ``start.pt`` in the run directory, so a resumed run mixes with the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from finetune import checkpoint as ckpt
from finetune.ema import detached_copy
from finetune.loop import Hook, Loop
from finetune.trainer import predict, selected_weights

START_FILE = "start.pt"


def mix(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * tuned`` for floating-point tensors; others (BN step counts) from ``tuned``."""
    out = {}
    for name, t in tuned.items():
        s = start[name].to(t.device)
        out[name] = torch.lerp(s.float(), t.float(), alpha).to(t.dtype) if t.is_floating_point() else t.clone()
    return out


class WiseHook(Hook):
    """Keeps the weights training started from; at the end, puts the best val-scored mix into ``best.pt``.

    Args:
        alphas: The mixing weights to try (0 = start, 1 = the tuned weights).
        run_dir: The run directory (``start.pt`` and ``best.pt`` live there).
    """

    def __init__(self, alphas: list[float], run_dir: Path) -> None:
        self.alphas = sorted(set(alphas))
        self.run_dir = Path(run_dir)
        self.start: dict[str, torch.Tensor] | None = None
        self.result: dict[str, Any] = {}

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        path = self.run_dir / START_FILE
        if loop.state.epoch == 0:  # after the solver hook: the probe, if there is one
            self.start = {k: v.detach().cpu().clone() for k, v in loop.model.state_dict().items()}
            if loop.is_main:
                ckpt.save_checkpoint(path, {"model": self.start})
        else:
            self.start = ckpt.load_checkpoint(path)["model"]

    @torch.no_grad()
    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        best_path = self.run_dir / "best.pt"
        finished = loop.state.epoch >= loop.settings.epochs or bool(loop.state.stop_reason)  # not an exception
        if self.start is None or not finished or not best_path.is_file():
            return
        best = ckpt.load_checkpoint(best_path)
        tuned = selected_weights(best)
        model = detached_copy(loop.eval_model or loop.model)
        s = loop.settings
        scores: dict[float, float] = {}
        for alpha in self.alphas:
            model.load_state_dict(mix(self.start, tuned, alpha))
            out = predict(model, loop.val_loader, s, loss_fn=loop.loss_fn if s.select == "loss" else None)
            if loop.gather is not None:
                out = loop.gather(out)
            if s.select == "loss":
                scores[alpha] = out["loss"]
            else:
                scores[alpha] = s.task.metrics(out["targets"], out["probs"], s.threshold)[s.select]
        sign = -1 if s.select == "loss" else 1
        valid = {a: v for a, v in scores.items() if v == v}  # NaN (no positive in val) cannot choose
        chosen = max(valid, key=lambda a: (sign * valid[a], a)) if valid else 1.0  # ties: the more tuned
        self.result = {"alpha": chosen, "select": s.select, "val": {str(a): scores[a] for a in self.alphas}}
        if loop.is_main:
            key = "eval_model" if "eval_model" in best else "model"
            best[key] = mix(self.start, tuned, chosen)
            best["wise"] = self.result
            ckpt.save_checkpoint(best_path, best)
            ckpt.atomic_write_json(self.run_dir / "wise.json", self.result)
            scale = 1 if s.select == "loss" else 100
            shown = ", ".join(f"{a:g}: {scale * v:.4g}" for a, v in scores.items())
            msg = f"WiSE-FT: val {s.select} by mix (0 = start, 1 = tuned) {shown}; best.pt holds {chosen:g}"
            loop.console.print(escape(msg))
