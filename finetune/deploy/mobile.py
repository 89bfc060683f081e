"""LiteRT (``.tflite``) and OpenVINO (IR) exports and runtimes, from the optional extras ``litert`` and ``openvino``.

- **LiteRT** through litert-torch (Google's maintained PyTorch -> LiteRT converter, formerly ai-edge-torch), straight
  from the PyTorch graph: uint8 NHWC ``[1, size, size, 3]`` in (the batch can be resized), probabilities out. INT8:
  Google's ai-edge-quantizer (installed with litert-torch) on the fp32 file, int8 weights and activations, ranges
  from the same calibration images as the ONNX INT8, thresholds re-fitted on the LiteRT INT8 model's probabilities.
  Both files carry TFLite metadata that MediaPipe Tasks' ``ImageClassifier`` reads (labels, input, score
  threshold) and the sidecar's fields as custom metadata (:mod:`finetune.deploy.tflite_metadata`); the sidecar JSON
  (``model.json`` / ``model.int8.json``) is written beside them too.
- **OpenVINO** from the exported ONNX files (fp32, and the QDQ INT8 one, which OpenVINO runs as INT8), with the
  sidecar's fields in the IR's ``rt_info`` (``finetune/model_json``). The export checks OpenVINO's CPU runtime
  against onnxruntime on the calibration split and records the difference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune.deploy.exported import Exported, onnx_backend, record_int8, sidecar
from finetune.errors import UserError
from finetune.io import atomic_write_bytes

if TYPE_CHECKING:
    from finetune.assembly import RunParts
    from finetune.deploy.exported import Backend

EXTRAS = {  # format -> (modules to export with, module to run with)
    "litert": (("litert_torch", "ai_edge_quantizer", "ai_edge_litert", "mediapipe"), "ai_edge_litert"),
    "openvino": (("openvino",), "openvino"),
}
RT_INFO = ["finetune", "model_json"]


def require(fmt: str, runtime: bool = False) -> None:
    """One line naming the ``pip install`` to run when ``fmt``'s package is missing."""
    modules = (EXTRAS[fmt][1],) if runtime else EXTRAS[fmt][0]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{fmt} needs the {module} package, which is not installed: pip install 'finetune[{fmt}]'")


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the converter's TensorFlow logs every pass otherwise


def _litert_bytes(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    _quiet_tf()
    import litert_torch

    edge = litert_torch.convert(model.eval(), (example,))
    return edge.model_content()


def _litert_int8_bytes(fp32: bytes, batches: list[np.ndarray]) -> bytes:
    """Static INT8 (int8 weights and activations) by Google's ai-edge-quantizer, calibrated image by image.

    The last op (the sigmoid or softmax) stays in float, so the file's output is float
    probabilities: MediaPipe Tasks refuses an int8 output tensor, and the probabilities keep their resolution (as
    the ONNX INT8 file keeps its sigmoid in float). litert-torch's own PT2E route was tried first: with
    ``fold_quantize=True`` its converter fails on per-channel weights, and with ``fold_quantize=False`` the file kept
    its float weights and its outputs moved by 0.4.
    """
    _quiet_tf()
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe_manager

    everything = qtyping.TFLOperationName.ALL_SUPPORTED
    plan = recipe_manager.RecipeManager()
    plan.add_static_config(regex=".*", operation_name=everything, activation_num_bits=8, weight_num_bits=8)
    output = Interpreter(model_content=fp32).get_output_details()[0]["name"]
    no = algorithm_manager.AlgorithmName.NO_QUANTIZE
    plan.add_quantization_config(regex=re.escape(output), operation_name=everything, algorithm_key=no)
    q = quantizer.Quantizer(bytearray(fp32), plan.get_quantization_recipe())
    ((name, key),) = _signatures(fp32)
    data = {name: [{key: image[None]} for batch in batches for image in batch]}
    ranges = q.calibrate(data, num_threads=os.cpu_count() or 1)
    return bytes(q.quantize(ranges, enable_progress_report=False).quantized_model)


def _signatures(model: bytes) -> list[tuple[str, str]]:
    from ai_edge_litert.interpreter import Interpreter

    return [(name, sig["inputs"][0]) for name, sig in Interpreter(model_content=model).get_signature_list().items()]


def export_litert(
    model: torch.nn.Module,
    info: dict[str, Any],
    out: Path,
    parts: RunParts,
    cal_loader: torch.utils.data.DataLoader | None,
) -> Exported:
    """``model.tflite`` and, with a calibration loader, ``model.int8.tflite`` with re-fitted thresholds."""
    from finetune.deploy.quantize import check_int8, nhwc_batches
    from finetune.deploy.tflite_metadata import with_metadata

    example = torch.zeros(1, model.size, model.size, 3, dtype=torch.uint8)
    fp32 = _litert_bytes(model, example)
    atomic_write_bytes(out, with_metadata(fp32, info))
    result = Exported(out, [out])
    if cal_loader is None:
        return result
    batches = [images for images, _ in nhwc_batches(cal_loader)]
    path = out.with_name(f"{out.stem}.int8{out.suffix}")
    int8 = _litert_int8_bytes(fp32, batches)
    atomic_write_bytes(path, int8)
    int8_info, comparison = check_int8(parts, info, litert_backend(out), litert_backend(path), len(cal_loader.dataset))
    int8_info["quantization"] = {
        "tool": "ai_edge_quantizer, static int8 (static_wi8_ai8 with the last op in float)",
        "weights": "int8, per channel",
        "activations": "int8, per tensor, min/max; the last op (the probabilities) in float",
        "calibration_images": len(cal_loader.dataset),
    }
    atomic_write_bytes(path, with_metadata(int8, int8_info))  # the re-fitted thresholds inside the file too
    return record_int8(result, info, path, int8_info, comparison)


def litert_backend(path: Path) -> Backend:
    """The LiteRT interpreter (XNNPACK on the CPU) as a uint8 NHWC -> probabilities function.

    The input is resized to each batch's size; where the delegate cannot re-plan for a new batch size (seen with
    INT8 files), images run one at a time.
    """
    _quiet_tf()
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
    except ValueError as err:
        raise UserError(f"{path}: not a LiteRT model ({(str(err).splitlines() or [''])[0][:120]})") from None
    interpreter.allocate_tensors()
    output = interpreter.get_output_details()[0]
    src, dst = interpreter.get_input_details()[0]["index"], output["index"]
    scale, zero = output["quantization"]  # an INT8 file's int8 probabilities: p = scale * (q - zero)
    state = {"batch": 1, "resizable": True}

    def invoke(images: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(src, images)
        interpreter.invoke()
        out = interpreter.get_tensor(dst)
        return scale * (out.astype(np.float32) - zero) if output["dtype"] != np.float32 else out.copy()

    def run(images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n != state["batch"] and state["resizable"]:
            try:
                interpreter.resize_tensor_input(src, [n, *images.shape[1:]])
                interpreter.allocate_tensors()
                state["batch"] = n
            except RuntimeError:
                state["resizable"] = False
                interpreter.resize_tensor_input(src, [1, *images.shape[1:]])
                interpreter.allocate_tensors()
                state["batch"] = 1
        if n == state["batch"]:
            return invoke(images)
        return np.concatenate([invoke(images[i : i + 1]) for i in range(n)])

    return run


def _save_ir(onnx_path: Path, xml: Path, info: dict[str, Any]) -> None:
    """The IR pair written in a temporary folder beside ``xml``, then moved into place (``.bin`` first)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(info), RT_INFO)
    tmp = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", suffix=".tmp", dir=xml.parent))
    try:
        ov.save_model(model, str(tmp / xml.name), compress_to_fp16=False)
        os.replace(tmp / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(tmp / xml.name, xml)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_openvino(result: Exported, out: Path, info: dict[str, Any], parts: RunParts) -> Exported:
    """OpenVINO IR of the exported ONNX file(s), and a parity check of OpenVINO's CPU runtime against onnxruntime."""
    files = [out, out.with_suffix(".bin"), *result.files]
    pairs = [(result.path, out, info)]
    if result.comparison is not None:
        int8_onnx = result.path.with_name(f"{result.path.stem}.int8.onnx")
        int8_xml = out.with_name(f"{out.stem}.int8.xml")
        pairs.append((int8_onnx, int8_xml, json.loads(sidecar(int8_onnx).read_text())))
        files += [int8_xml, int8_xml.with_suffix(".bin")]
    for onnx_path, xml, fields in pairs:
        _save_ir(onnx_path, xml, fields)
    try:
        parity: dict[str, Any] = {xml.name: _parity(xml, onnx_path, fields, parts) for onnx_path, xml, fields in pairs}
    except UserError as err:  # the data is not on this machine: the export stands, the check is skipped
        parity = {"skipped": str(err)}
    info["openvino"] = {"parity_vs_onnxruntime": parity}
    return Exported(out, files, result.comparison)


def _parity(xml: Path, onnx_path: Path, fields: dict[str, Any], parts: RunParts) -> dict[str, Any]:
    """OpenVINO's CPU runtime vs onnxruntime on the val split: largest probability difference, decisions flipped."""
    from finetune.assembly import build_from_run
    from finetune.deploy.quantize import backend_outputs

    if "val" not in parts.splits:  # read only now, so that an export without the data still writes its files
        parts = build_from_run(parts.run, ("val",), ["data.num_workers=0"])
    ours = backend_outputs(openvino_backend(xml)[0], parts, ["val"])["val"].probs
    ref = backend_outputs(onnx_backend(onnx_path.read_bytes()), parts, ["val"])["val"].probs
    if fields["thresholds"]:
        thr = np.asarray(fields["thresholds"])
        flips = int(((ours >= thr) != (ref >= thr)).sum())
    else:
        flips = int((ours.argmax(1) != ref.argmax(1)).sum())
    return {"split": "val", "max_abs_prob_diff": float(np.abs(ours - ref).max()), "flips": flips}


def openvino_backend(path: Path, device: str = "CPU") -> tuple[Backend, dict[str, Any] | None]:
    """OpenVINO's runtime on an IR file, and the sidecar fields from its ``rt_info`` (None when it has none)."""
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except RuntimeError as err:
        raise UserError(f"{path}: not an OpenVINO IR file ({(str(err).splitlines() or [''])[0][:120]})") from None
    info = json.loads(model.get_rt_info(RT_INFO).astype(str)) if model.has_rt_info(RT_INFO) else None
    # OpenVINO's CPU plugin runs float ops in bf16 where the CPU has it (avx512_bf16, AMX): 0.008 off onnxruntime on
    # this project's CI machine, and the thresholds were fitted on fp32 probabilities. The INT8 file's ops stay int8.
    config = {"INFERENCE_PRECISION_HINT": "f32"} if device.upper() == "CPU" else {}
    try:
        compiled = core.compile_model(model, device, config)
    except RuntimeError as err:
        raise UserError(f"OpenVINO device {device!r}: {(str(err).splitlines() or [''])[0][:120]}") from None
    output = compiled.output(0)
    return (lambda x: compiled([x])[output]), info
