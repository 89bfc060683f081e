"""What an export produces and reads back, below every exporter: the result, sidecar names, ONNX metadata, a session.

Kept apart from :mod:`finetune.deploy.export` so that the exporters for other formats and the INT8 check, which
the export module calls, can use these without importing it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune import runfiles
from finetune.io import atomic_write_json

Backend = Callable[[np.ndarray], np.ndarray]  # uint8 NHWC images -> probabilities


@dataclass
class Exported:
    """What an export wrote: the model file, every file beside it, and the fp32/INT8 comparison (with ``int8``)."""

    path: Path
    files: list[Path] = field(default_factory=list)
    comparison: dict[str, Any] | None = None


def record_int8(
    result: Exported, info: dict[str, Any], path: Path, int8_info: dict[str, Any], comparison: dict[str, Any]
) -> Exported:
    """An INT8 file written: its sidecar, its name and comparison in the fp32 fields, and both in the result."""
    atomic_write_json(sidecar(path), int8_info)
    info["int8"] = {"file": path.name, "comparison": comparison}
    result.files += [path, sidecar(path)]
    result.comparison = comparison
    return result


def sidecar(path: Path) -> Path:
    """The JSON beside an export: ``model.onnx`` -> ``model.json``, ``model.int8.onnx`` -> ``model.int8.json``."""
    return path.with_suffix(".json")


def int8_name(path: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def planned_files(out: Path, fmt: str, int8: bool) -> list[Path]:
    """Every file an export to ``out`` writes besides the card: models, sidecars, OpenVINO's weights and ONNX."""
    models = [out, out.with_suffix(".onnx")] if fmt == "openvino" else [out]
    if fmt == "hf":  # timm's config.json beside the weights
        return [out, out.with_name(runfiles.HF_CONFIG), sidecar(out)]
    if int8:
        models += [int8_name(m) for m in models]
    extra = [m.with_suffix(".bin") for m in models if m.suffix == ".xml"]
    return list(dict.fromkeys([*models, *extra, *(sidecar(m) for m in models)]))


def is_export_file(path: Path) -> bool:
    """Whether ``path`` is a file an earlier export wrote: a sidecar of ours, or a file whose sidecar is one."""
    if path.name == runfiles.HF_CONFIG:  # timm's config.json: ours when the weights beside it are
        return is_export_file(path.with_name(runfiles.HF_WEIGHTS))
    try:
        info = json.loads(sidecar(path).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"format_version", "finetune_version", "classes", "input"} <= info.keys()


def with_metadata(data: bytes, info: dict[str, Any]) -> bytes:
    """An ONNX model's bytes with ``info`` as its ``metadata_props`` (one key per field, JSON-encoded)."""
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString()


def onnx_backend(data: bytes) -> Backend:
    """An onnxruntime CPU session over an ONNX model's bytes, as a uint8 NHWC -> probabilities function."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]
