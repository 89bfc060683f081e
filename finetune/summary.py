"""Per-layer model summary: output shape, parameters, multiply-accumulates (MACs) and activation memory.

Counted by forward hooks on one real forward pass. MACs are counted for convolutions and linear layers (what
``torch.utils.flop_counter.FlopCounterMode`` counts as FLOPs = 2 x MACs; the tests check they agree): a convolution
costs ``H_out x W_out x C_out x (C_in / groups) x k_h x k_w`` per image, so a depthwise convolution is counted as
depthwise (``groups = C_in``). The seed paper's Table A2 counts its 3x3 depthwise layers as full convolutions
(``3x3x960x960``), which overstates them by the channel count; that is not copied here.

Memory, in bytes at the given batch size and dtype:
- ``activations_forward``: every layer output kept for the backward pass (in-place outputs counted once);
- ``activations_forward_backward``: twice that, an estimate: the backward pass holds one gradient per saved output
  at its peak;
- ``activations_inference_peak``: the largest input + output of one layer (the paper's "largest feature map");
- ``parameters``, ``gradients`` (trainable parameters only) and ``optimizer_state`` (AdamW: 2 tensors per trainable
  parameter, SGD with momentum: 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LayerRow:
    """One module with parameters of its own, or a leaf module."""

    name: str
    kind: str
    output_shape: list[int]
    params: int
    macs: int
    activation_bytes: int
    io_bytes: int  # this layer's input + output: what an inference pass must hold at once here


def _macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_out = (module.in_channels // module.groups) * kh * kw
        return out[0].numel() * per_out
    if isinstance(module, nn.Linear):
        return out[0].numel() * module.in_features
    return 0


def summarize_layers(
    model: nn.Module, input_size: tuple[int, int, int], batch: int = 1, bytes_per: int = 4
) -> list[LayerRow]:
    """Run one forward pass of a ``[batch, *input_size]`` zero tensor and collect a row per counted module.

    MACs are per image; activation bytes are for the whole batch.
    """
    rows: list[LayerRow] = []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            key = (out.data_ptr(), tuple(out.shape))
            act = 0 if key in seen else out.numel() * bytes_per  # in-place (ReLU6 after BN) shares its input
            seen.add(key)
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else out
            own = sum(p.numel() for p in module.parameters(recurse=False))
            io = (inp.numel() + out.numel()) * bytes_per
            shape = list(out.shape[1:])
            rows.append(LayerRow(name, type(module).__name__, shape, own, _macs(module, inp, out), act, io))

        return fn

    for name, module in model.named_modules():
        has_own = any(True for _ in module.parameters(recurse=False))
        if name and (has_own or not any(True for _ in module.children())):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(batch, *input_size)
            seen.add((x.data_ptr(), tuple(x.shape)))
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


def summarize_model(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int = 1,
    optimizer: str = "adamw",
    bytes_per: int = 4,
) -> dict[str, Any]:
    """Per-layer rows and totals (parameters trainable/frozen by ``requires_grad``, MACs, memory).

    Returns:
        ``{"layers": [...], "totals": {...}}``, JSON-ready.
    """
    rows = summarize_layers(model, input_size, batch, bytes_per)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    acts = sum(r.activation_bytes for r in rows)
    peak = max((r.io_bytes for r in rows), default=0)
    states = {"adamw": 2, "sgd": 1}.get(optimizer, 2)
    totals = {
        "input": [batch, *input_size],
        "parameters": total,
        "trainable": trainable,
        "frozen": total - trainable,
        "macs_per_image": sum(r.macs for r in rows),
        "bytes_per_value": bytes_per,
        "memory": {
            "activations_forward": acts,
            "activations_forward_backward": 2 * acts,
            "activations_inference_peak": peak,
            "parameters": total * bytes_per,
            "gradients": trainable * bytes_per,
            "optimizer_state": states * trainable * bytes_per,
        },
    }
    totals["memory"]["training_total"] = (
        totals["memory"]["activations_forward_backward"]
        + totals["memory"]["parameters"]
        + totals["memory"]["gradients"]
        + totals["memory"]["optimizer_state"]
    )
    return {"layers": [asdict(r) for r in rows], "totals": totals}


def flop_counter_macs(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """MACs per image from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2): the independent reference."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size))
    model.train(was_training)
    return counter.get_total_flops() / 2


def training_memory(model: nn.Module, image_size: int, batch: int, optimizer: str = "adamw", probe: int = 224) -> int:
    """About how many bytes training takes: :func:`summarize_model`'s count at ``probe`` px, scaled to ``image_size``.

    Activations grow with the pixels and the batch; parameters, gradients and optimizer state do not. Counting at a
    small side keeps the estimate cheap (and possible) for a side that would itself run out of memory.
    """
    side = min(image_size, probe)
    mem = summarize_model(model, (3, side, side), 1, optimizer)["totals"]["memory"]
    scale = (image_size / side) ** 2 * batch
    fixed = mem["parameters"] + mem["gradients"] + mem["optimizer_state"]
    return int(mem["activations_forward_backward"] * scale + fixed)
