"""INT8 post-training quantization of an exported ONNX model, thresholds re-fitted on its probabilities, and a check.

The quantizer is onnxruntime's (``quantize_static``): QDQ format, per-channel int8 weights, uint8 activations (the
combination onnxruntime recommends on x86-64), MinMax ranges collected on a seeded random subset of the run's train
images through the evaluation pipeline (no augmentation). The network's ops are quantized (:data:`QUANTIZED_OPS`:
convolutions, the classifier, the ReLU6 clips and the pooling, so onnxruntime fuses them); the graph's
preprocessing (cast, resize, normalisation), the residual Adds and the sigmoid/softmax stay in float, so the
probabilities the thresholds cut are not rounded to 256 levels.

On efficientnet_lite0 / coco-small (224 px, test split; fp32 test mAP 49.6, batch-1 17.6 ms) the variants measured:
these ops 48.8 (17.0 ms); with the Adds too 48.2 (14.9 ms); Conv + Gemm only 47.8; every op onnxruntime can
quantize (the sigmoid included) was fastest on mobilenetv2_100 (0.67x fp32) but rounds the probabilities; Percentile
ranges 46.0; Entropy 47.2; int8 activations 47.2; reduce_range 46.4; uint8 weights 45.6; depthwise convs kept in
float 47.0 and twice slower. The one kept is the most accurate.

Quantization moves the probabilities, so per-class thresholds fitted on the fp32 model are no longer the F1-optimal
ones for the INT8 model. :func:`refit` fits them again on the INT8 model's probabilities, with the run's own
calibration settings and split; :func:`compare` scores fp32 and INT8 side by side on data neither was fitted on
(the test split, else cross-fitting on the calibration split, as the run's report does).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import runfiles
from finetune.assembly import RunParts
from finetune.deploy.exported import Backend
from finetune.errors import UserError
from finetune.eval.metrics import summarize, summarize_single
from finetune.eval.predict import handle_bad_images
from finetune.eval.report import fit_calibration, resolve_shrink
from finetune.eval.thresholds import cross_fit
from finetune.predictions import Predictions

DEFAULT_CALIBRATION_IMAGES = 300
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Clip", "Relu", "GlobalAveragePool", "Flatten"]


def nhwc_batches(loader: torch.utils.data.DataLoader, policy: str = "skip") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """uint8 NHWC images (resized by the evaluation pipeline) and targets, batch by batch; unreadable images skipped."""
    seen: list[str] = []
    from rich.console import Console

    console = Console(stderr=True)
    for batch in loader:
        handle_bad_images(batch["errors"], policy, seen, console)
        if "image" in batch:
            yield batch["image"].permute(0, 2, 3, 1).contiguous().numpy(), batch["target"].numpy()


def calibration_loader(parts: RunParts, count: int | None = None) -> torch.utils.data.DataLoader:
    """``count`` train images (default 300, or all when fewer): a subset seeded by the run's seed, unaugmented.

    The images :meth:`~finetune.assembly.RunParts.calibration_subset` picks, which quantization-aware training
    calibrates on too.

    Raises:
        UserError: For a count below 1 or above the train split's size.
    """
    n = len(parts.splits["train"].image_paths)
    count = min(DEFAULT_CALIBRATION_IMAGES, n) if count is None else count
    if not 1 <= count <= n:
        raise UserError(f"--calibration-images {count}: the run's train split has {n} images; give 1 to {n}")
    return parts.calibration_subset(count)


def quantize_onnx(fp32: bytes, batches: Iterator[np.ndarray], input_name: str) -> bytes:
    """Static INT8 (QDQ, per-channel weights) quantization of an fp32 ONNX model; returns the INT8 model's bytes.

    ``quant_pre_process`` (shape inference and onnxruntime's graph optimisations, BatchNorm folding included) runs
    first, as onnxruntime's quantization guide asks.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        """The uint8 NHWC batches as onnxruntime's calibration feeds."""

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {input_name: batch}

    reader = Reader()
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS,
        )
        return dst.read_bytes()


def backend_outputs(backend: Backend, parts: RunParts, roles: list[str]) -> dict[str, Predictions]:
    """A backend's probabilities and the targets on each of ``roles`` (evaluation pipeline, dataset order)."""
    outs = {}
    for role in roles:
        probs, targets = [], []
        for images, target in nhwc_batches(parts.loader(role), parts.recipe.data.on_bad_image):
            probs.append(np.asarray(backend(images), dtype=np.float64))
            targets.append(target)
        outs[role] = Predictions(probs=np.concatenate(probs), targets=np.concatenate(targets))
    return outs


def refit(parts: RunParts, outs: dict[str, Predictions]) -> tuple[np.ndarray, str]:
    """Thresholds fitted on ``outs`` with the run's calibration settings and split, and where they came from."""
    cs = parts.calibration
    cs, _ = resolve_shrink(cs, outs[cs.split])
    cal = fit_calibration(cs, outs[cs.split], parts.classes, cs.split)
    return cal.thresholds, f"re-fitted on the INT8 model's probabilities of {cs.split} (the run's calibration)"


def held_out(parts: RunParts, outs: dict, thresholds: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """The data to score on and the thresholds that apply there: the test split, else out-of-fold thresholds."""
    if "test" in outs:
        return outs["test"], thresholds, "test split"
    cs = parts.calibration
    out = outs[cs.split]
    cs, _ = resolve_shrink(cs, out)
    try:
        per_row, _ = cross_fit(out.targets, out.probs, cs.folds, cs.seed, **cs.options)
    except ValueError as err:
        raise UserError(f"INT8 check on {cs.split}: {err}") from None
    return out, per_row, f"{min(cs.folds, len(per_row))}-fold cross-fitting on {cs.split}"


def _row(name: str, targets: np.ndarray, probs: np.ndarray, thr: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    s = summarize(targets, probs, thr)
    pred = probs >= thr
    return {
        "model": name,
        "map": s["map"],
        "macro_f1": s["macro_f1"],
        "micro_f1": s["micro_f1"],
        "labels_flipped": int((pred != labels).sum()),
        "images_changed": int((pred != labels).any(axis=1).sum()),
    }


def compare(parts: RunParts, fp32: dict, int8: dict, fp32_thr: np.ndarray | None, int8_thr: np.ndarray | None) -> dict:
    """fp32 and INT8 side by side on held-out data: mAP, macro/micro-F1 at the carried thresholds, labels flipped.

    Multi-label rows: fp32 at its thresholds; INT8 at the fp32 thresholds (carried over); INT8 at its re-fitted
    thresholds (what the INT8 file carries). A flip is one (image, class) decision that differs from fp32's.
    Single-label rows: top-1 accuracy and how many images' top class changed.
    """
    if fp32_thr is None or int8_thr is None:
        out32, out8 = (o["test"] if "test" in o else o["val"] for o in (fp32, int8))
        top32, top8 = out32.probs.argmax(1), out8.probs.argmax(1)
        rows = [
            {"model": m, "top1": summarize_single(o.targets, o.probs)["top1"], "images_changed": n}
            for m, o, n in (("fp32", out32, 0), ("int8", out8, int((top32 != top8).sum())))
        ]
        how = "test split" if "test" in fp32 else "val split"
    else:
        held32, thr32, how = held_out(parts, fp32, fp32_thr)
        held8, thr8, _ = held_out(parts, int8, int8_thr)
        y, p32, p8 = held32.targets, held32.probs, held8.probs
        ref = p32 >= thr32
        rows = [
            _row("fp32", y, p32, thr32, ref),
            _row("int8, fp32 thresholds", y, p8, thr32, ref),
            _row("int8, re-fitted thresholds", y, p8, thr8, ref),
        ]
    diff = np.abs(fp32[parts.calibration.split].probs - int8[parts.calibration.split].probs)
    return {
        "scored_on": how,
        "rows": rows,
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
    }


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a markdown table (percentages)."""
    rows = comparison["rows"]
    keys = [k for k in ("map", "macro_f1", "micro_f1", "top1") if k in rows[0]]
    counts = [k for k in ("labels_flipped", "images_changed") if k in rows[0]]
    head = ["model", *keys, *counts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], *(f"{100 * r[k]:.1f}" for k in keys), *(str(r[k]) for k in counts)]
        lines.append("| " + " | ".join(cells) + " |")
    diff = f"max |p_fp32 - p_int8| {comparison['max_abs_prob_diff']:.4f}"
    return "\n".join([f"Scored on: {comparison['scored_on']}; {diff}.", "", *lines])


def check_int8(
    parts: RunParts, info: dict[str, Any], fp32: Backend, int8: Backend, calibration_images: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The INT8 model's sidecar fields (re-fitted thresholds) and its comparison with fp32 on held-out data."""
    roles = [r for r in dict.fromkeys([parts.calibration.split, "val", "test"]) if r in parts.splits]
    outs32, outs8 = backend_outputs(fp32, parts, roles), backend_outputs(int8, parts, roles)
    int8_info = {**info, "precision": "int8"}
    fp32_thr = int8_thr = None
    if parts.task.calibrates:
        fp32_thr = np.asarray(info["thresholds"])
        int8_thr = fp32_thr
        if (parts.run / runfiles.THRESHOLDS).is_file() and parts.calibration.enabled:
            int8_thr, how = refit(parts, outs8)  # a run that never calibrated keeps its fixed threshold
            int8_info.update(thresholds=int8_thr.tolist(), thresholds_from=how)
    comparison = compare(parts, outs32, outs8, fp32_thr, int8_thr)
    int8_info["quantization"] = {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8, per channel",
        "activations": "uint8, per tensor, MinMax",
        "ops": QUANTIZED_OPS,
        "calibration_images": calibration_images,
    }
    int8_info["comparison"] = comparison
    return int8_info, comparison
