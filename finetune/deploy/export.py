"""Exporting a run: one ONNX or TorchScript file that takes the image, plus ``model.json`` beside it.

The exported graph takes **uint8 RGB images, NHWC** (``[batch, height, width, 3]``, as PIL or OpenCV decode them;
the batch axis is dynamic, and so are height and width) and returns **probabilities** ``[batch, classes]``. Inside
it: the cast to float, a bilinear resize to the run's input size (half-pixel centres, no antialiasing: what the
evaluation pipeline's resize does, and the identity for an image already at that size), the run's normalization,
the network and the task's activation (sigmoid for multi-label, softmax for single-label). The EMA weights are
exported when the run kept them (the weights it was selected and calibrated on).

``model.json`` (and, for ONNX, the model's ``metadata_props``, one key per field, JSON-encoded) carries what a
caller needs to turn probabilities into labels: class names, per-class thresholds, input size, normalization, the
task and the SHA-256 of the run's ``recipe.toml``.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune import __version__
from finetune.errors import UserError
from finetune.eval.run_report import load_thresholds
from finetune.io import atomic_write_bytes, atomic_write_json
from finetune.models import hflip_average
from finetune.train.assembly import build_from_run
from finetune.train.rundir import RunDir

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
OPSET = 17


class ImageClassifier(nn.Module):
    """A network with its preprocessing and activation: uint8 NHWC images in, probabilities out.

    Args:
        model: The trained network (NCHW float in, logits out).
        size: Input side length the network was trained at.
        mean: Per-channel mean, 0..1 scale.
        std: Per-channel std, 0..1 scale.
        multi_label: Sigmoid per class (True) or softmax over classes (False).
        hflip: Average the logits of the image and its mirror (the run's ``train.tta = "hflip"``).
    """

    def __init__(
        self,
        model: nn.Module,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        multi_label: bool,
        hflip: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.size, self.multi_label, self.hflip = model, size, multi_label, hflip
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: uint8 ``[n, h, w, 3]``; returns ``[n, classes]`` probabilities."""
        x = image.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        x = (x - self.mean) / self.std
        logits = (hflip_average(self.model, x) if self.hflip else self.model(x)).float()
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def run_classifier(run: RunDir) -> tuple[ImageClassifier, dict[str, Any]]:
    """The run's best (EMA when kept) weights wrapped as an :class:`ImageClassifier`, and its ``model.json`` fields."""
    parts = build_from_run(run)
    task, classes, checkpoint = parts.task, parts.classes, parts.checkpoint
    model = parts.model.eval()
    (mean, std), size = parts.normalization, parts.image_size
    thresholds, how = load_thresholds(run.path, None, parts.fixed_threshold)
    per_class = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), len(classes)).tolist()
    info = {
        "format_version": 1,
        "finetune_version": __version__,
        "task": "multilabel" if task.calibrates else "singlelabel",
        "classes": list(classes.names),
        "category_ids": list(classes.ids),
        "thresholds": per_class if task.calibrates else None,
        "thresholds_from": how if task.calibrates else "the highest-scoring class",
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "size": [size, size],
            "resize": "bilinear, half-pixel centres, no antialiasing (inside the graph)",
        },
        "normalization": {"mean": list(mean), "std": list(std), "scale": "0..1, applied inside the graph"},
        "output": {"name": OUTPUT_NAME, "activation": "sigmoid" if task.calibrates else "softmax"},
        "weights": "ema" if "eval_model" in checkpoint else "model",
        "tta": parts.tta,
        "model_name": parts.model_name,
        "recipe_sha256": hashlib.sha256((run / "recipe.toml").read_bytes()).hexdigest(),
    }
    hflip = parts.tta == "hflip"
    wrapped = ImageClassifier(model, size, tuple(mean), tuple(std), task.calibrates, hflip).eval()
    return wrapped, info


def _example(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _onnx_bytes(model: ImageClassifier, info: dict[str, Any]) -> bytes:
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated; it needs no onnxscript
        torch.onnx.export(
            model,
            (_example(model.size),),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "height", 2: "width"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString()


def _torchscript_bytes(model: ImageClassifier, info: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(model, (_example(model.size),), check_trace=False)
        torch.jit.save(traced, buf, _extra_files={"model.json": json.dumps(info)})
    return buf.getvalue()


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> Path:
    """Export a run's model to ``out`` (default ``<run>/export/model.onnx`` or ``model.pt``) and ``model.json``.

    Returns:
        The exported file; ``model.json`` is written beside it.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run = RunDir.open(run_dir)
    model, info = run_classifier(run)
    out = Path(out) if out else run / "export" / f"model{FORMATS[fmt]}"
    if out.exists() and out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name for the exported model")
    data = _onnx_bytes(model, info) if fmt == "onnx" else _torchscript_bytes(model, info)
    atomic_write_bytes(out, data)
    atomic_write_json(out.with_name("model.json"), info)
    return out
