"""TFLite metadata in the ``.tflite`` file itself, as MediaPipe Tasks' ``ImageClassifier`` reads it.

Written with MediaPipe's own ``metadata_writers`` (the ``litert`` extra installs ``mediapipe``): the image input
(RGB; the file takes uint8 pixels and normalises inside the graph, so the metadata's normalisation is the identity,
mean 0 and std 1, and the model's real mean/std are in its description), the labels file (the run's classes, in
output order), and the score handling the schema can carry: scores as the graph gives them (sigmoid or softmax
already applied, no calibration) and one global score threshold, the lowest class threshold for a multi-label
model (a class below it is below its own) or the reject threshold of a single-label one. The schema has no
per-class threshold, so the whole sidecar (classes, per-class thresholds, input contract) also travels inside the
file as custom metadata named ``finetune/model_json``, which :func:`read_model_json` reads back without MediaPipe,
so a ``.tflite`` needs no sidecar beside it.

One thing in MediaPipe's wheels is worked around, checked by the test that loads the file in MediaPipe: releases
from 0.10.30 on ship the metadata writers without their native ``_pywrap_metadata_version`` module, whose one use
is the minimum metadata-parser version; everything written here is in schema 1.0.0, which :func:`_writers` then
supplies. (Score calibration, whose file MediaPipe's writer ends with one newline too many, is not used.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from typing import Any

CUSTOM_NAME = "finetune/model_json"
_MARKER = b'{"finetune_model_json": '


def _writers() -> tuple[Any, Any]:
    """MediaPipe's ``metadata_writer`` and ``metadata_info`` modules (with the version shim where it is missing)."""
    native = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
    if native not in sys.modules and not _importable(native):
        shim = types.ModuleType(native)
        shim.GetMinimumMetadataParserVersion = lambda buffer: "1.0.0"  # type: ignore[attr-defined]
        for name in ("mediapipe.tasks.cc", "mediapipe.tasks.cc.metadata", "mediapipe.tasks.cc.metadata.python"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules[native] = shim
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info, metadata_writer

    return metadata_writer, metadata_info


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _global_threshold(info: dict[str, Any]) -> float | None:
    if info["task"] == "multilabel":
        return float(min(info["thresholds"])) if info.get("thresholds") else None
    return info.get("reject_below")


def with_metadata(model: bytes, info: dict[str, Any]) -> bytes:
    """``model`` (a ``.tflite``) with MediaPipe's image-classifier metadata and ``info`` as custom metadata."""
    writer_mod, info_mod = _writers()
    from mediapipe.tasks.metadata import metadata_schema_py_generated as schema

    class _Json(info_mod.CustomMetadataMd):  # the sidecar, byte for byte, under CUSTOM_NAME
        def create_metadata(self) -> Any:
            out = schema.CustomMetadataT()
            out.name = CUSTOM_NAME
            out.data = list(_MARKER + json.dumps(info).encode("utf-8") + b"}")
            return out

    mean, std = info["normalization"]["mean"], info["normalization"]["std"]
    about = (
        f"finetune {info['task']} classifier, {len(info['classes'])} classes: uint8 RGB NHWC in, resized and "
        f"normalised inside the graph (mean {mean}, std {std}, 0..1 scale); {info['output']['activation']} "
        f"probabilities out. Per-class thresholds: custom metadata {CUSTOM_NAME}."
    )
    threshold = _global_threshold(info)
    writer = writer_mod.MetadataWriter.create(_inlined(model))
    writer.add_general_info(info.get("model_name") or "finetune", about)
    writer.add_image_input([0.0], [1.0])  # the graph takes pixel values as they are
    writer.add_classification_output(
        writer_mod.Labels().add(list(info["classes"])),
        None,
        writer_mod.ScoreThresholding(threshold) if threshold is not None else None,
    )
    writer.add_custom_metadata(_Json(CUSTOM_NAME))
    content, _ = writer.populate()
    del writer  # its __del__ removes its temporary folder now, not at interpreter exit (where it fails noisily)
    return bytes(content)


def _inlined(model: bytes) -> bytearray:
    """The model with every weight buffer inside the flatbuffer.

    ai-edge-quantizer writes a model of more than 256 KiB of weights with its buffers after the flatbuffer, found by
    offset; MediaPipe's populator re-serialises the flatbuffer alone, which would leave those offsets pointing past
    its end ("Constant buffer 2 specified an out of range offset"). LiteRT's own reader resolves them into the tree.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    return flatbuffer_utils.convert_object_to_bytearray(tree)


def read_model_json(model: bytes) -> dict[str, Any] | None:
    """The sidecar fields a ``.tflite`` carries as custom metadata, or None when it has none.

    The custom metadata's bytes are a flatbuffer vector: a little-endian length, then the data, so they are read
    exactly, without the metadata schema.
    """
    at = model.find(_MARKER)
    if at < 4:
        return None
    length = int.from_bytes(model[at - 4 : at], "little")
    try:
        doc = json.loads(model[at : at + length])
    except ValueError:
        return None
    return doc.get("finetune_model_json") if isinstance(doc, dict) else None
