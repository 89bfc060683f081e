"""L2-SP (Li, Grandvalet and Davoine, ICML 2018): decay the backbone toward its starting weights, not toward zero.

Decoupled, like AdamW's weight decay: after each optimizer step every trainable backbone weight moves by
``-lr * strength * (w - w0)``, where ``w0`` is the weight when training started (the pretrained one) and ``lr`` its
group's current learning rate. The backbone's ordinary weight decay is switched off; the classifier keeps it (the
paper's L2 on the new layer). ``w0`` is kept in checkpoints, so a resumed run decays toward the same anchor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from finetune.train.loop import Hook, Loop


class L2SPHook(Hook):
    """Decoupled L2-SP on the named parameters (the assembly passes the backbone's weights, never the classifier's).

    Args:
        strength: The L2-SP coefficient (as AdamW's ``weight_decay``: multiplied by the LR).
        params: Names of the parameters pulled toward their starting values. Their optimizer groups' ordinary weight
            decay is switched off; a group holding both named and other parameters is refused (it would take the
            others' decay away too).
    """

    def __init__(self, strength: float, params: Sequence[str]) -> None:
        self.strength, self.params = strength, list(params)
        self.anchor: dict[str, torch.Tensor] = {}
        self._groups: list[tuple[dict, list[str]]] = []

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        names = {id(p): n for n, p in loop.model.named_parameters()}
        wanted = set(self.params)
        self._groups = []
        for group in loop.optimizer.param_groups:
            members = [names[id(p)] for p in group["params"]]
            anchored = [n for n in members if n in wanted]
            if not anchored:
                continue
            if len(anchored) != len(members):
                raise ValueError(
                    f"L2-SP: optimizer group {group.get('group_name', '?')!r} mixes anchored and other parameters"
                )
            group["weight_decay"] = 0.0  # replaced by the pull toward w0
            self._groups.append((group, members))
        if not self.anchor:
            self.anchor = {n: loop.model.get_parameter(n).detach().clone() for _, ns in self._groups for n in ns}

    @torch.no_grad()
    def on_step_end(self, loop: Loop) -> None:  # noqa: D102
        for group, names in self._groups:
            for name, p in zip(names, group["params"]):
                if p.requires_grad:
                    p.sub_(p - self.anchor[name], alpha=group["lr"] * self.strength)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.anchor = state["anchor"]
