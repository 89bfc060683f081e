"""Exporting a run: an ONNX, TorchScript, LiteRT or OpenVINO file that takes the image, its sidecar JSON, a card.

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
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune import __version__, runfiles
from finetune.assembly import RunParts, build_from_run
from finetune.deploy import mobile, pte
from finetune.deploy.exported import (
    Exported,
    int8_name,
    is_export_file,
    onnx_backend,
    planned_files,
    record_int8,
    sidecar,
    with_metadata,
)
from finetune.deploy.quantize import calibration_loader, check_int8, nhwc_batches, quantize_onnx
from finetune.errors import UserError
from finetune.eval.reject import load_reject
from finetune.eval.report import load_thresholds
from finetune.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_output
from finetune.models import hflip_average
from finetune.rundir.directory import RunDir
from finetune.rundir.lock import locking

FORMATS = {
    "onnx": ".onnx",
    "torchscript": ".pt",
    "litert": ".tflite",
    "openvino": ".xml",
    "executorch": ".pte",
    "hf": ".safetensors",
}
FOLDERS = ("litert", "openvino", "executorch", "hf")  # formats exported into a folder of their own
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
        self.one_pass = False  # flip TTA as one call on [image; mirror] (the ExecuTorch export sets it)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image``: uint8 ``[n, h, w, 3]``; returns ``[n, classes]`` probabilities."""
        x = image.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        x = (x - self.mean) / self.std
        logits = (hflip_average(self.model, x, self.one_pass) if self.hflip else self.model(x)).float()
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def run_classifier(run: RunDir, parts: RunParts | None = None) -> tuple[ImageClassifier, dict[str, Any]]:
    """The run's best (EMA when kept) weights wrapped as an :class:`ImageClassifier`, and its ``model.json`` fields."""
    parts = parts or build_from_run(run)
    task, classes, checkpoint = parts.task, parts.classes, parts.checkpoint
    model = parts.model.eval()
    (mean, std), size = parts.normalization, parts.image_size
    thresholds, how = load_thresholds(run.path, None, parts.fixed_threshold)
    per_class = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), len(classes)).tolist()
    reject = None if task.calibrates else load_reject(run.path)
    top = "the highest-scoring class" + (f"; none below {reject:.4g} (reject.json)" if reject is not None else "")
    info = {
        "format_version": 1,
        "finetune_version": __version__,
        "task": "multilabel" if task.calibrates else "singlelabel",
        "classes": list(classes.names),
        "category_ids": list(classes.ids),
        "thresholds": per_class if task.calibrates else None,
        "thresholds_from": how if task.calibrates else top,
        "reject_below": reject,  # single-label: no class is answered when the top probability is lower
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
        "precision": "fp32",
        "tta": parts.tta,
        "model_name": parts.model_name,
        "recipe_sha256": hashlib.sha256((run / runfiles.RECIPE).read_bytes()).hexdigest(),
    }
    hflip = parts.tta == "hflip"
    wrapped = ImageClassifier(model, size, tuple(mean), tuple(std), task.calibrates, hflip).eval()
    return wrapped, info


def _example(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _onnx_bytes(model: ImageClassifier, info: dict[str, Any]) -> bytes:
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
    return with_metadata(buf.getvalue(), info)


def _torchscript_bytes(model: ImageClassifier, info: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(model, (_example(model.size),), check_trace=False)
        torch.jit.save(traced, buf, _extra_files={"model.json": json.dumps(info)})
    return buf.getvalue()


def _default_out(run: RunDir, fmt: str) -> Path:
    """``RUN/export/model.onnx`` or ``.pt``; LiteRT, OpenVINO, ExecuTorch and timm's folder in folders of their own."""
    name = f"model{FORMATS[fmt]}"
    return run / "export" / (f"{fmt}/{name}" if fmt in FOLDERS else name)


def _check_request(fmt: str, int8: bool, out: Path | None) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if int8 and fmt in ("torchscript", "hf"):
        name = {"torchscript": "TorchScript", "hf": "timm's folder (hf)"}[fmt]
        raise UserError(f"--int8: {name} has no INT8 export here; use --format onnx, openvino, litert or executorch")
    if out is not None and (out.suffix != FORMATS[fmt] or out.stem.endswith(".int8")):
        raise UserError(f"--out {out}: a {fmt} file is named like model{FORMATS[fmt]}")
    if fmt == "hf" and out is not None and out.name != runfiles.HF_WEIGHTS:
        raise UserError(f"--out {out}: timm reads {runfiles.HF_WEIGHTS} by name; give FOLDER/{runfiles.HF_WEIGHTS}")
    if out is not None and out.exists() and out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name for the exported model")
    if fmt in ("litert", "openvino"):
        mobile.require(fmt)
    if fmt == "executorch":
        pte.require()


@locking("finetune export")
def export_run(
    run_dir: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    *,
    int8: bool = False,
    calibration_images: int | None = None,
    card: bool = True,
    force: bool = False,
) -> Exported:
    """Export a run's model to ``out`` (default ``<run>/export/model.<ext>``), its JSON sidecar and a model card.

    Args:
        run_dir: The run directory.
        fmt: ``onnx``, ``torchscript``, ``hf`` (timm's folder), ``litert`` (``.tflite``), ``openvino`` (IR ``.xml`` +
            ``.bin``) or ``executorch`` (``.pte``).
        out: The model file to write.
        int8: Also write an INT8 model (``model.int8.<ext>``) with thresholds re-fitted on its probabilities.
        calibration_images: Train images the INT8 ranges are collected on (default 300, or all when fewer).
        card: Write ``README.md`` (the model card) beside the model.
        force: Replace existing files at ``out`` and beside it that an earlier export did not write (never the
            run's own files).

    Returns:
        The files written and, with ``int8``, the fp32/INT8 comparison.

    Raises:
        UserError: For an unknown format, ``--int8`` with TorchScript, an ``out`` of another suffix, a missing extra,
            a bad calibration count, or a folder whose ``README.md`` is not a finetune model card.
    """
    _check_request(fmt, int8, Path(out) if out else None)
    run = RunDir.open(run_dir)
    out = Path(out) if out else _default_out(run, fmt)
    for path in planned_files(out, fmt, int8):
        check_output(path, "--out", ours=is_export_file, force=force, run_dir=run.path)
    if card:
        from finetune.deploy.card import is_card

        fix = "export to another folder or pass --no-card"  # a repository's README: not even --force replaces it
        check_output(out.parent / "README.md", "the card", ours=is_card, run_dir=run.path, fix=fix)
    # No DataLoader workers: a fork after the LiteRT converter (JAX, TensorFlow) has started its threads, in this
    # export or an earlier one in the same process, crashed (a segfault). Decoding a few hundred images costs seconds.
    parts = build_from_run(run, ("train", "val", "test") if int8 else (), ["data.num_workers=0"])
    cal_loader = calibration_loader(parts, calibration_images) if int8 else None  # a bad count fails before work
    model, info = run_classifier(run, parts)
    result = _write_model(fmt, model, info, out, parts, cal_loader)
    atomic_write_json(sidecar(out), info)
    result.files.insert(1, sidecar(out))
    if card:
        from finetune.deploy.card import write_card

        result.files.append(write_card(run, parts, info, result, out.parent))
    return result


def _write_model(
    fmt: str,
    model: ImageClassifier,
    info: dict[str, Any],
    out: Path,
    parts: RunParts,
    cal_loader: torch.utils.data.DataLoader | None,
) -> Exported:
    """The model file(s) of one format (the sidecar and the card come after)."""
    if fmt == "torchscript":
        atomic_write_bytes(out, _torchscript_bytes(model, info))
        return Exported(out, [out])
    if fmt == "hf":
        return _export_timm_folder(parts, info, out)
    if fmt == "litert":
        return mobile.export_litert(model, info, out, parts, cal_loader)
    if fmt == "executorch":
        return pte.export_executorch(model, info, out, parts, cal_loader)
    result = _export_onnx(model, info, out.with_suffix(".onnx"), parts, cal_loader)
    return mobile.export_openvino(result, out, info, parts) if fmt == "openvino" else result


def _export_onnx(
    model: ImageClassifier,
    info: dict[str, Any],
    out: Path,
    parts: RunParts,
    cal_loader: torch.utils.data.DataLoader | None,
) -> Exported:
    """``model.onnx`` and, with a calibration loader, ``model.int8.onnx`` (QDQ) with re-fitted thresholds."""
    fp32 = _onnx_bytes(model, info)
    atomic_write_bytes(out, fp32)
    result = Exported(out, [out])
    if cal_loader is None:
        return result
    batches = (images for images, _ in nhwc_batches(cal_loader))
    int8 = with_metadata(quantize_onnx(fp32, batches, INPUT_NAME), {})
    int8_info, comparison = check_int8(parts, info, onnx_backend(fp32), onnx_backend(int8), len(cal_loader.dataset))
    path = int8_name(out)
    atomic_write_bytes(path, with_metadata(int8, int8_info))
    return record_int8(result, info, path, int8_info, comparison)


def _export_timm_folder(parts: RunParts, info: dict[str, Any], out: Path) -> Exported:
    """``model.safetensors`` and timm's ``config.json`` in ``out``'s folder, written by timm's own ``save_for_hf``.

    ``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds the network with these weights (logits out:
    the folder holds the network, not the uint8 preprocessing or the activation), and ``huggingface_hub``'s
    ``upload_folder`` publishes it as it is.
    """
    from timm.models import save_for_hf

    model = parts.model.eval()
    if parts.recipe.model.head != "linear" or not hasattr(model, "pretrained_cfg"):
        why = f"model.head = {parts.recipe.model.head!r}" if hasattr(model, "pretrained_cfg") else "no timm config"
        raise UserError(
            f"--format hf: timm rebuilds its own {parts.recipe.model.name} with a linear classifier, and this run has "
            f"{why}; export it as onnx or torchscript"
        )
    (mean, std), size = parts.normalization, parts.image_size
    data = {
        "input_size": (3, size, size),
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": 1.0,
        "crop_mode": "squash",  # the whole image resized to size x size, as the toolkit does: no centre crop
        "interpolation": "bilinear",
    }
    info["input"] = {
        "dtype": "float32",
        "layout": "NCHW",
        "channels": "RGB",
        "size": [size, size],
        "resize": "by the caller: timm's resolve_data_config + create_transform read config.json",
    }
    info["normalization"] = {"mean": list(mean), "std": list(std), "scale": "0..1, then mean/std, by the caller"}
    info["output"] = {"name": "logits", "activation": info["output"]["activation"], "applied": False}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # timm writes here; each file then replaced atomically
        save_for_hf(model, tmp, {"label_names": info["classes"]}, safe_serialization=True, data_config=data)
        config = out.with_name(runfiles.HF_CONFIG)
        for name, dst in ((runfiles.HF_WEIGHTS, out), (runfiles.HF_CONFIG, config)):
            atomic_write_bytes(dst, (Path(tmp) / name).read_bytes())
    return Exported(out, [out, config])


@locking("finetune card")
def card_run(run_dir: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """``finetune card RUN``: the card of a run directory, written to ``out`` (default ``RUN/README.md``).

    An existing file at ``out`` is replaced only when it is a finetune model card, or with ``force``; never one of
    the run's own files.
    """
    from finetune.deploy.card import card_text, is_card

    run = RunDir.open(run_dir)
    path = Path(out) if out else run / "README.md"
    check_output(path, "--out", ours=is_card, force=force, run_dir=run.path)
    parts = build_from_run(run)
    _, info = run_classifier(run, parts)
    atomic_write_text(path, card_text(run, parts, info))
    return path
