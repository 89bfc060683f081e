"""Build the backbone with timm, replace the head for the dataset's classes, load local weights safely."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from finetune.errors import UserError

_NESTED_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


@dataclass
class LoadReport:
    """What happened when a weights file met a model."""

    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # present in both but with another shape (e.g. the old head)

    def summary(self) -> str:
        """One line for the console."""
        parts = [f"loaded {self.loaded} tensors from {self.path}"]
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} with another shape ({', '.join(self.dropped[:4])})")
        if self.missing:
            parts.append(
                f"{len(self.missing)} missing ({', '.join(self.missing[:4])}{', ...' * (len(self.missing) > 4)})"
            )
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({', '.join(self.unexpected[:4])})")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only=True``), unwrapping common nestings.

    Accepts timm files, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers (this toolkit's run checkpoints
    included) and DataParallel ``module.`` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found; check model.checkpoint")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is the user's file, not our bug
        raise UserError(
            f"{path}: cannot read weights ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    for key in _NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load matching tensors into ``model``; tensors whose shape differs (a head for other classes) are dropped.

    Raises:
        UserError: When nothing in the file matches the model (most likely the wrong ``model.name``).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    report = LoadReport(str(path))
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.dropped.append(key)
        else:
            usable[key] = value
    if not usable:
        raise UserError(f"{path}: no tensor matches the model's parameters; is model.name the architecture it holds?")
    # BN's num_batches_tracked counters are bookkeeping, not weights: older files lack them and that is fine.
    report.missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def create_model(
    name: str, num_classes: int, pretrained: bool = False, checkpoint: str = "", drop_rate: float = 0.0
) -> tuple[nn.Module, LoadReport | None]:
    """Create a timm model with a fresh ``num_classes`` head, from scratch, the hub, or a local file.

    Args:
        name: Any timm model name (``mobilenetv2_100``, ``mobilenetv2_140``, ``efficientnet_lite0``...).
        num_classes: Outputs of the new classifier.
        pretrained: Use timm's own hub download (needs internet).
        checkpoint: A local weights file (safetensors, or a torch file loaded with ``weights_only=True``).
        drop_rate: Dropout before the classifier.

    Returns:
        The model, and what loading the checkpoint did (None without one).
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UserError(f"model.name: unknown timm model {name!r}{hint}")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate)
    except Exception as err:  # noqa: BLE001
        if not pretrained:
            raise
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(
            f"model.pretrained: could not fetch {name} weights from the hub ({first}); offline, download them "
            'elsewhere and set model.pretrained = false, model.checkpoint = "path/to/weights.safetensors"'
        ) from None
    report = load_weights(model, checkpoint) if checkpoint else None
    return model, report
