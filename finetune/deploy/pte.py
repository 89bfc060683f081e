"""ExecuTorch (``.pte``) export and runtime, from the optional extra ``executorch``: PyTorch's own on-device runtime.

The export is ExecuTorch's documented route: ``torch.export`` of the uint8 NHWC -> probabilities graph (the batch
dynamic, 1 to :data:`MAX_BATCH`), lowered to the XNNPACK delegate (``to_edge_transform_and_lower`` with the
``XnnpackPartitioner``), then ``to_executorch``. INT8 is XNNPACK's own quantizer through PT2E
(``prepare_pt2e`` -> the calibration images -> ``convert_pt2e``; symmetric int8, per-channel weights), lowered the
same way, with the thresholds re-fitted on the ``.pte``'s own probabilities as for the other INT8 files. A ``.pte``
has no key-value metadata, so classes and thresholds travel in the sidecar JSON, as for LiteRT.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune.deploy.exported import Exported, int8_name, record_int8
from finetune.errors import UserError
from finetune.io import atomic_write_bytes

if TYPE_CHECKING:
    from finetune.assembly import RunParts
    from finetune.deploy.exported import Backend

MAX_BATCH = 64  # the batch's upper bound at export; the runtime wrapper splits a larger batch


def require() -> None:
    """One line naming the ``pip install`` to run when ExecuTorch is missing."""
    if importlib.util.find_spec("executorch") is None:
        raise UserError(
            "executorch needs the executorch package, which is not installed: pip install 'finetune[executorch]'"
        )


def _lower(program: torch.export.ExportedProgram) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _export(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch; the model is put in eval mode first (an exported graph is already)."""
    if not isinstance(model, torch.fx.GraphModule):  # a converted PT2E graph refuses .eval(): export fixed its mode
        model.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _int8_bytes(model: torch.nn.Module, example: torch.Tensor, batches: list[np.ndarray]) -> bytes:
    """XNNPACK's quantizer (PT2E): observers calibrated on ``batches``, then converted and lowered."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(_export(model, example).module(), quantizer)
    with torch.no_grad():
        for images in batches:
            for start in range(0, len(images), MAX_BATCH):
                prepared(torch.from_numpy(images[start : start + MAX_BATCH]))
    return _lower(_export(convert_pt2e(prepared), example))


def export_executorch(
    model: torch.nn.Module,
    info: dict[str, Any],
    out: Path,
    parts: RunParts,
    cal_loader: torch.utils.data.DataLoader | None,
) -> Exported:
    """``model.pte`` and, with a calibration loader, ``model.int8.pte`` with re-fitted thresholds."""
    from finetune.deploy.quantize import check_int8, nhwc_batches

    example = torch.zeros(2, model.size, model.size, 3, dtype=torch.uint8)
    # Flip TTA as one call of the network on [image; mirror]: with two calls, PT2E's INT8 model of efficientnet_lite0
    # was 0.040 off the fp32 probabilities on average (held-out mAP 9.2 against 48.6); with one, 0.008.
    model.one_pass = True
    try:
        atomic_write_bytes(out, _lower(_export(model, example)))
        if cal_loader is not None:
            batches = [images for images, _ in nhwc_batches(cal_loader)]
            atomic_write_bytes(int8_name(out), _int8_bytes(model, example, batches))
    finally:
        model.one_pass = False
    result, path = Exported(out, [out]), int8_name(out)
    if cal_loader is None:
        return result
    int8_info, comparison = check_int8(parts, info, pte_backend(out), pte_backend(path), len(cal_loader.dataset))
    int8_info["quantization"] = {
        "tool": "ExecuTorch XNNPACKQuantizer (PT2E)",
        "weights": "int8, per channel, symmetric",
        "activations": "int8, per tensor",
        "calibration_images": len(cal_loader.dataset),
    }
    return record_int8(result, info, path, int8_info, comparison)


def pte_backend(path: Path) -> Backend:
    """ExecuTorch's Python runtime on a ``.pte`` file as a uint8 NHWC -> probabilities function."""
    require()
    from executorch.runtime import Runtime

    try:
        method = Runtime.get().load_program(Path(path)).load_method("forward")
    except Exception as err:  # noqa: BLE001 - the runtime raises its own types for a bad file
        raise UserError(f"{path}: not an ExecuTorch program ({(str(err).splitlines() or [''])[0][:120]})") from None

    # The input's planned size: the largest batch one call takes (torch.export may bound it below MAX_BATCH: 15 on
    # an 80-px model), then height, width and channels, which the export fixes.
    capacity, *shape = method.metadata.input_tensor_meta(0).sizes()

    def invoke(images: np.ndarray) -> np.ndarray:
        if list(images.shape[1:]) != shape:
            raise UserError(f"{path}: takes uint8 images of {shape[0]}x{shape[1]}x3, got {images.shape[1:]}")
        parts = [
            method.execute([torch.from_numpy(np.ascontiguousarray(images[i : i + capacity]))])[0].numpy()
            for i in range(0, len(images), capacity)
        ]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)

    return invoke
