"""Quantization-aware training: the INT8 exports' rounding simulated in the float network while it trains.

The simulation follows what ``finetune export --int8`` does to the graph (onnxruntime's ``quantize_static`` in
:mod:`finetune.deploy.quantize`; LiteRT's and ExecuTorch's quantizers use the same scheme), so the weights learn to
survive exactly the rounding they will meet:

- **weights**: each convolution's BatchNorm is folded into it (``w * gamma / sqrt(var + eps)``, what
  ``quant_pre_process`` does before quantizing) and the folded weight is rounded per output channel, symmetric int8
  in [-127, 127] with scale ``max|w| / 127`` (onnxruntime's per-channel QInt8); the classifier's weight likewise;
- **activations**: uint8, per tensor, affine (torch's ``FakeQuantize``) at every tensor the INT8 graph rounds: each
  BatchNorm's output (after its activation), every convolution's or linear layer's input that is not one of those
  already (the network's input, the sums of residual blocks, the pooled features), the output of a convolution with
  no BatchNorm, and the logits. The ranges are what onnxruntime's MinMax calibration takes (the float network's
  min and max over the calibration images, 0 included), set by :meth:`QuantSim.calibrate`; they do not move while
  training (the loop's hook calibrates them again after every epoch).

Gradients pass through the rounding unchanged (the straight-through estimator of torch's ``fake_quantize_*`` ops).
BatchNorm must keep its running statistics (``freeze.bn = "all"``): folding is then exact, and the rounding is applied
to ``w * k`` and divided back by ``k`` before BatchNorm scales by ``k`` again, so the module tree and its
``state_dict`` keys stay the plain network's: checkpoints load into a model without the simulation, and the INT8
exports quantize the trained weights as they are.

Own code rather than torchao's ``prepare_qat_pt2e``: PT2E turns the network into an exported graph whose module
names and BatchNorm modes are gone, so the run's layer groups, freezing, EMA, checkpoints and resume would not apply;
here the network stays the same ``nn.Module`` and only the rounding (torch's own ops and observers) is added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, MinMaxObserver

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.Hardtanh)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded per output channel to int8 in [-127, 127], scale ``max|w| / 127`` (gradient: the identity)."""
    flat = w.detach().float().flatten(1)
    scale = (flat.abs().amax(1) / 127).clamp_min(1e-12)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -127, 127).to(w.dtype)


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm's per-channel multiplier ``gamma / sqrt(var + eps)`` (never exactly 0: it is divided by)."""
    k = bn.running_var.add(bn.eps).rsqrt()
    k = k * bn.weight if bn.weight is not None else k
    return torch.where(k.abs() < 1e-12, torch.full_like(k, 1e-12), k)


class _FoldedConv2d(nn.Conv2d):
    """A convolution whose weight, folded with the BatchNorm after it, is rounded as the INT8 file rounds it."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k = _bn_scale(self.__dict__["_qat_bn"]).view(-1, 1, 1, 1)
        return super()._conv_forward(input, fake_quant_weight(weight * k) / k, bias)


class _QuantConv2d(nn.Conv2d):
    """A convolution with no BatchNorm after it: its own weight rounded per output channel."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(input, fake_quant_weight(weight), bias)


class _QuantLinear(nn.Linear):
    """A linear layer (the classifier) with its weight rounded per output row."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, fake_quant_weight(self.weight), self.bias)


def activation_quantizer() -> FakeQuantize:
    """uint8, per tensor, affine (onnxruntime's activation type); its range is set by :meth:`QuantSim.calibrate`."""
    fq = FakeQuantize(
        observer=MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine
    )
    fq.disable_observer()
    return fq


class QuantSim:
    """Where a network is rounded, found once by tracing it, and the activation quantizers, shared by every copy.

    Args:
        model: The network (BatchNorm in eval mode: its statistics are frozen).
        example: An input batch for the trace (its values do not matter, its shape does).

    Raises:
        ValueError: For a network with no convolution or linear layer.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.folds: dict[str, str] = {}  # convolution -> the BatchNorm folded into it
        self.weights: list[str] = []  # convolutions without BatchNorm, linear layers
        self.outputs: list[str] = []  # modules whose output is rounded
        self.inputs: list[str] = []  # modules whose input is rounded
        self._trace(model, example)
        if not (self.folds or self.weights):
            raise ValueError("the network has no convolution or linear layer to quantize")
        names = [f"out:{n}" for n in self.outputs] + [f"in:{n}" for n in self.inputs]
        self.quantizers = nn.ModuleDict({n.replace(".", "/"): activation_quantizer() for n in names})

    def _trace(self, model: nn.Module, example: torch.Tensor) -> None:
        produced: dict[int, tuple[str, str]] = {}  # id(output tensor) -> (module, kind)
        keep: list[torch.Tensor] = []  # holds the traced tensors so their ids stay unique
        order: list[tuple[str, str, int]] = []  # (module, kind, id(input))
        handles = []

        def hook(name: str, kind: str) -> Callable:
            def record(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
                x = args[0] if args else None
                order.append((name, kind, id(x)))
                keep.extend([out] + ([x] if isinstance(x, torch.Tensor) else []))
                produced[id(out)] = (name, kind)

            return record

        for name, mod in model.named_modules():
            kind = _kind(mod)
            if kind:
                handles.append(mod.register_forward_hook(hook(name, kind)))
        was = model.training
        try:
            with torch.no_grad():
                model.eval()(example)
        finally:
            model.train(was)
            for h in handles:
                h.remove()
        self._place(order, produced)

    def _place(self, order: list[tuple[str, str, int]], produced: dict[int, tuple[str, str]]) -> None:
        """Decide, from the traced order, which weights fold and which tensors are rounded."""
        rounded: set[str] = set()  # modules whose output is rounded
        source = {name: produced.get(x) for name, _, x in order}
        for name, kind, _ in order:
            src = source[name]
            if kind == "bn" and src and src[1] == "conv" and src[0] not in self.folds:
                self.folds[src[0]] = name
            if kind == "act" and src and src[1] == "bn" and src[0] in rounded:  # BN then its activation
                rounded.discard(src[0])
                rounded.add(name)
            elif kind == "bn":
                rounded.add(name)
            if kind in ("conv", "linear") and not (src and src[0] in rounded):
                self.inputs.append(name)
        convs = [n for n, k, _ in order if k in ("conv", "linear")]
        self.weights = [n for n in dict.fromkeys(convs) if n not in self.folds]  # their output is rounded too
        self.outputs = list(dict.fromkeys([n for n, _, _ in order if n in rounded] + self.weights))
        self.inputs = list(dict.fromkeys(self.inputs))

    def attach(self, model: nn.Module) -> None:
        """Simulate the rounding in ``model`` (the traced network or a copy of its architecture), in place.

        Only plain ``nn.Conv2d`` and ``nn.Linear`` weights are rounded (a subclass with its own forward, such as timm's
        ``Conv2dSame``, keeps float weights); every rounded activation is, whatever module produced it.
        """
        for conv, bn in self.folds.items():
            mod = model.get_submodule(conv)
            if type(mod) is nn.Conv2d:
                mod.__class__ = _FoldedConv2d
                object.__setattr__(mod, "_qat_bn", model.get_submodule(bn))
        for name in self.weights:
            mod = model.get_submodule(name)
            if type(mod) is nn.Conv2d:
                mod.__class__ = _QuantConv2d
            elif type(mod) is nn.Linear:
                mod.__class__ = _QuantLinear
        handles = []
        for name in self.outputs:
            fq = self.quantizers[f"out:{name}".replace(".", "/")]
            handles.append(model.get_submodule(name).register_forward_hook(_output_hook(fq)))
        for name in self.inputs:
            fq = self.quantizers[f"in:{name}".replace(".", "/")]
            handles.append(model.get_submodule(name).register_forward_pre_hook(_input_hook(fq)))
        object.__setattr__(model, "_qat_handles", handles)

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Take the simulation out of ``model``: plain convolutions and linear layers, no rounding hooks."""
        for mod in model.modules():
            if type(mod) in (_FoldedConv2d, _QuantConv2d):
                mod.__class__ = nn.Conv2d
                mod.__dict__.pop("_qat_bn", None)
            elif type(mod) is _QuantLinear:
                mod.__class__ = nn.Linear
        for h in model.__dict__.pop("_qat_handles", []):
            h.remove()

    def calibrate(
        self, model: nn.Module, batches: Iterable[torch.Tensor], forward: Callable[[torch.Tensor], Any] | None = None
    ) -> int:
        """Set the activation ranges to the min/max over ``batches`` of the plain network (not yet attached).

        The ranges onnxruntime's MinMax calibration takes: the float network's, over every image. ``forward`` runs a
        batch (default ``model``; e.g. an export wrapper around it). Returns the images seen.
        """
        lo: dict[str, torch.Tensor] = {}
        hi: dict[str, torch.Tensor] = {}

        def seen(key: str, x: torch.Tensor) -> None:
            x = x.detach().float()
            lo[key] = torch.minimum(lo[key], x.min()) if key in lo else x.min()
            hi[key] = torch.maximum(hi[key], x.max()) if key in hi else x.max()

        handles = [
            model.get_submodule(n).register_forward_hook(lambda m, a, o, k=f"out:{n}": seen(k, o)) for n in self.outputs
        ]
        handles += [
            model.get_submodule(n).register_forward_pre_hook(lambda m, a, k=f"in:{n}": seen(k, a[0]))
            for n in self.inputs
        ]
        count, was = 0, model.training
        try:
            model.eval()
            with torch.no_grad():
                for x in batches:
                    (forward or model)(x)
                    count += len(x)
        finally:
            model.train(was)
            for h in handles:
                h.remove()
        for key in lo:
            fq = self.quantizers[key.replace(".", "/")]
            obs = fq.activation_post_process
            obs.min_val, obs.max_val = lo[key].to(obs.min_val.device), hi[key].to(obs.max_val.device)
            scale, zero = obs.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero.shape).copy_(zero)
        return count


def _round(fq: FakeQuantize, x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to ``fq``'s uint8 grid (computed in float32 whatever the autocast dtype)."""
    if fq.scale.device != x.device:
        fq.to(x.device)
    return fq(x.float()).to(x.dtype)


def _output_hook(fq: FakeQuantize) -> Callable:
    return lambda mod, args, out: _round(fq, out)


def _input_hook(fq: FakeQuantize) -> Callable:
    return lambda mod, args: (_round(fq, args[0]), *args[1:])


def _kind(mod: nn.Module) -> str:
    """What the trace records a module as: conv, linear, bn, act or nothing."""
    if isinstance(mod, nn.Conv2d):
        return "conv"
    if isinstance(mod, nn.Linear):
        return "linear"
    if isinstance(mod, nn.BatchNorm2d):
        return "bn"
    return "act" if isinstance(mod, _ACTIVATIONS) else ""
