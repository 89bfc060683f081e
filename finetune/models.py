"""Build the backbone with timm, replace the head for the dataset's classes, load local weights safely."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from finetune import runfiles
from finetune.errors import UserError
from finetune.io import load_error
from finetune.mobilenet import MODEL_NAMES, mobilenetv2

_NESTED_KEYS = ("state_dict_ema", "model_ema", "eval_model", "state_dict", "model")


@dataclass
class LoadReport:
    """What happened when a weights file met a model."""

    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # present in both but with another shape (e.g. the old head)
    remapped: str = ""  # the key layout translated from ("torchvision"), if any
    head_note: str = ""  # set when the file's classifier was for another class count

    def summary(self) -> str:
        """One line for the console."""
        layout = f" ({self.remapped} layout)" if self.remapped else ""
        parts = [f"loaded {self.loaded} tensors from {self.path}{layout}"]
        if self.head_note:
            parts.append(self.head_note)
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} with another shape ({', '.join(self.dropped[:4])})")
        if self.missing:
            parts.append(
                f"{len(self.missing)} missing ({', '.join(self.missing[:4])}{', ...' * (len(self.missing) > 4)})"
            )
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({', '.join(self.unexpected[:4])})")
        return "; ".join(parts)


# A file must fill at least this share of the backbone's weight tensors: a partial match is another architecture.
MIN_MATCHED = 0.5
_HEAD_PREFIXES = ("classifier.", "head.", "fc.")


def weights_path(path: str | Path) -> Path:
    """The file to read: ``path``, or ``best.pt`` in a run directory, or ``model.safetensors`` in a timm folder.

    A timm folder is what timm and the Hugging Face Hub read (``finetune export --format hf``, timm's ``save_for_hf``).
    """
    path = Path(path)
    for inside in (runfiles.BEST, runfiles.HF_WEIGHTS):
        if path.is_dir() and (path / inside).is_file():
            return path / inside
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only=True``), unwrapping common nestings.

    Accepts timm files, ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers (this toolkit's run checkpoints
    included) and DataParallel ``module.`` prefixes.
    """
    path = weights_path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found; check model.checkpoint")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is the user's file, not our bug
        raise load_error(path, err) from None
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
    report = LoadReport(str(weights_path(path)))
    if "features.0.0.weight" in state and hasattr(model, "conv_stem"):
        state, report.remapped = torchvision_to_timm(state, model), "torchvision"
    own = model.state_dict()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.dropped.append(key)
        else:
            usable[key] = value
    # Count weights only: BN's num_batches_tracked scalars match any network with BatchNorm, and the head may be new.
    weights = [k for k in own if not k.endswith("num_batches_tracked") and not k.startswith(_HEAD_PREFIXES)]
    matched = sum(k in usable for k in weights)
    if matched < MIN_MATCHED * len(weights):
        raise UserError(
            f"{path}: only {matched} of the model's {len(weights)} weight tensors match the file; "
            "is model.name the architecture it holds?"
        )
    # BN's num_batches_tracked counters are bookkeeping, not weights: older files lack them and that is fine.
    report.missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    head = [k for k in report.dropped + report.unexpected + report.missing if k.startswith("classifier.")]
    if head and hasattr(model, "classifier"):
        theirs = [v.shape[0] for k, v in state.items() if k.startswith("classifier.") and k.endswith("weight")]
        ours = [v.shape[0] for k, v in own.items() if k.startswith("classifier.") and k.endswith("weight")][-1]
        shape = f"{theirs[-1]} outputs" if theirs else "no classifier"
        report.head_note = f"head dropped (the file's classifier has {shape}, this model's {ours}): it starts fresh"
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def hflip_average(model: nn.Module, x: torch.Tensor, one_pass: bool = False) -> torch.Tensor:
    """Flip test-time augmentation: the mean of the logits of NCHW ``x`` and of its mirror (``train.tta = "hflip"``).

    ``one_pass``: one call of the network on ``[x; mirror]`` instead of two (the same logits; what PT2E quantizes
    correctly, see :mod:`finetune.deploy.pte`). ``unflatten`` keeps an exported graph's batch dimension symbolic.
    """
    if one_pass:
        return model(torch.cat([x, x.flip(3)])).unflatten(0, (2, -1)).mean(0)
    return (model(x) + model(x.flip(3))) / 2


def torchvision_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a torchvision ``mobilenet_v2`` state dict to timm's ``mobilenetv2_*`` layout.

    torchvision numbers its layers ``features.0`` (stem conv + BN) ... ``features.18`` (1x1 head conv + BN) and
    ``classifier.1``; timm nests the same layers as ``blocks.<stage>.<block>``. The k-th timm block (flattened, in
    order) is ``features.<k>``; the first block has no expansion conv (timm's ``DepthwiseSeparableConv``).
    """
    names = {"features.0.0": "conv_stem", "features.0.1": "bn1", "classifier.1": "classifier"}
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    for k, block in enumerate(flat, start=1):
        if hasattr(model.get_submodule(block), "conv_pwl"):  # inverted residual: expand, depthwise, project
            parts = {
                "conv.0.0": "conv_pw",
                "conv.0.1": "bn1",
                "conv.1.0": "conv_dw",
                "conv.1.1": "bn2",
                "conv.2": "conv_pwl",
                "conv.3": "bn3",
            }
        else:  # depthwise separable: depthwise, project
            parts = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
        names.update({f"features.{k}.{a}": f"{block}.{b}" for a, b in parts.items()})
    names.update({f"features.{len(flat) + 1}.0": "conv_head", f"features.{len(flat) + 1}.1": "bn2"})
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        out[f"{names.get(module, module)}.{leaf}"] = value
    return out


def blog_init(model: nn.Module) -> None:
    """The seed blog's initialisation: He (fan-out) for convolutions, normal for linear layers, BN weight 1 / bias 0.

    The blog says std 1.0 for linear layers; on a 1280-wide feature that gives logits with std ~36 and a saturated
    sigmoid at step 0, so this uses std 0.01 (torchvision's MobileNetV2 choice) and keeps the rest as written.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def replace_head(model: nn.Module, num_classes: int, head: str = "linear", hidden: int = 512) -> None:
    """Swap the classifier for ``num_classes`` outputs: timm's linear one (dropout = drop_rate before it) or an MLP.

    The MLP is Linear(features, hidden) -> ReLU -> Dropout(drop_rate) -> Linear(hidden, classes); timm's own dropout
    before it stays.
    """
    if head == "linear":
        return
    in_features = model.get_classifier().in_features
    model.classifier = nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(getattr(model, "drop_rate", 0.0)),
        nn.Linear(hidden, num_classes),
    )


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection within ``timeout`` seconds."""
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline_unless_reachable(pretrained: bool) -> Iterator[None]:
    """For a hub download: when the hub cannot be reached, run huggingface_hub offline (its cache, or a fast error).

    Without this, ``huggingface_hub`` retries an unreachable hub for about a minute before timm gives up.
    """
    if not pretrained or hub_reachable():
        yield
        return
    import huggingface_hub.constants as hf

    saved, hf.HF_HUB_OFFLINE = hf.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        hf.HF_HUB_OFFLINE = saved


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str = "",
    drop_rate: float = 0.0,
    head: str = "linear",
    head_hidden: int = 512,
    init: str = "timm",
    arch: dict | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, LoadReport | None]:
    """Create a timm model with a fresh ``num_classes`` head, from scratch, the hub, or a local file.

    Args:
        name: Any timm model name (``mobilenetv2_100``, ``mobilenetv2_140``, ``efficientnet_lite0``...).
        num_classes: Outputs of the new classifier.
        pretrained: Use timm's own hub download (needs internet).
        checkpoint: A local weights file (safetensors, or a torch file loaded with ``weights_only=True``).
        drop_rate: Dropout before the classifier.
        head: ``linear`` or ``mlp`` (see :func:`replace_head`).
        head_hidden: Hidden width of the MLP head.
        init: ``timm`` (timm's own) or ``blog`` (:func:`blog_init`), applied before any weights are loaded.
        arch: Settings for ``mobilenetv2_standard`` / ``mobilenetv2_reduced`` (:func:`finetune.mobilenet.mobilenetv2`).
        drop_path_rate: Stochastic depth (timm's ``drop_path_rate``: residual branches dropped per sample in
            training, at a rate growing linearly with depth up to this value); 0 = off.

    Returns:
        The model, and what loading the checkpoint did (None without one).
    """
    if name in MODEL_NAMES:
        if pretrained:
            raise UserError(f"model.pretrained: {name} is built from its block table; there are no hub weights")
        model = build_mobilenetv2(name, num_classes, drop_rate, {**(arch or {}), "drop_path_rate": drop_path_rate})
        return _finish(model, num_classes, head, head_hidden, init, False, checkpoint)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UserError(f"model.name: unknown timm model {name!r}{hint}")
    try:
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {}  # not every timm model takes it
        with _offline_unless_reachable(pretrained):
            model = timm.create_model(
                name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **extra
            )
    except TypeError as err:
        if "drop_path_rate" not in str(err):
            raise
        raise UserError(f"model.drop_path_rate: {name} has no stochastic depth in timm; set it to 0") from None
    except Exception as err:  # noqa: BLE001
        if not pretrained:
            raise
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(
            f"model.pretrained: could not fetch {name} weights from the hub ({first}); offline, download them "
            'elsewhere and set model.pretrained = false, model.checkpoint = "path/to/weights.safetensors"'
        ) from None
    return _finish(model, num_classes, head, head_hidden, init, pretrained, checkpoint)


def build_mobilenetv2(name: str, num_classes: int, drop_rate: float, arch: dict) -> nn.Module:
    """A ``mobilenetv2_standard`` / ``_reduced`` model from ``[model.arch]`` settings (0 / empty = the preset's)."""
    kwargs = {k: v for k, v in arch.items() if v not in (0, [], None)}
    if "blocks" in kwargs:
        kwargs["blocks"] = [(t, int(c), int(n), int(s)) for t, c, n, s in kwargs["blocks"]]
    try:
        return mobilenetv2(num_classes, MODEL_NAMES[name], drop_rate=drop_rate, **kwargs)
    except (ValueError, KeyError) as err:
        raise UserError(f"model.arch: {err}") from None


def _finish(
    model: nn.Module, num_classes: int, head: str, head_hidden: int, init: str, pretrained: bool, checkpoint: str
) -> tuple[nn.Module, LoadReport | None]:
    replace_head(model, num_classes, head, head_hidden)
    if init == "blog":
        if pretrained:  # the hub weights are already in: re-initialise only the new head
            blog_init(model.get_classifier())
        else:
            blog_init(model)
    report = load_weights(model, checkpoint) if checkpoint else None
    return model, report
