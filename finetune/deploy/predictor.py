"""The Python API for prediction: ``Predictor.load(path)`` for a run directory or any exported file.

Every backend runs the same graph (:class:`finetune.deploy.export.ImageClassifier`: uint8 NHWC images in,
probabilities out): a run directory, its ONNX (fp32 or INT8), TorchScript, LiteRT and OpenVINO exports answer
through the same API, each where its runtime is installed (one line naming the ``pip install`` where not). Files
are decoded and resized to the model's input size in DataLoader workers (the evaluation pipeline's resize: OpenCV
bilinear), then batched.

    from finetune import Predictor
    p = Predictor.load("runs/coco_multilabel_focal")   # or .../export/model.int8.onnx, model.tflite, model.xml
    print(p("a.jpg").labels)                           # one image -> one Prediction
    for r in p(["b.jpg", "photos/"]):                  # a list, a folder or a glob -> a list
        print(r.source, r.labels, r.probabilities["dog"])
"""

from __future__ import annotations

import glob
import json
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from finetune.data.classfolders import IMAGE_SUFFIXES
from finetune.data.split import DECODE_ERRORS, pil_rgb, read_rgb
from finetune.errors import UserError
from finetune.io import read_json
from finetune.labels import label_indices


@dataclass
class Prediction:
    """One image's result: the labels (most probable first) and every class's probability (class order)."""

    source: str
    labels: list[str]
    probabilities: dict[str, float]
    thresholds: str = ""  # where the thresholds came from

    def top(self, k: int) -> list[tuple[str, float]]:
        """The ``k`` most probable classes with their probabilities, most probable first."""
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def to_json(self, top_k: int | None = None) -> dict[str, Any]:
        """A JSON-ready dict; with ``top_k``, also the ``top_k`` most probable classes (``label``, ``score``)."""
        out = {"image": self.source, "labels": self.labels, "probabilities": self.probabilities}
        if top_k:
            out["top_k"] = [{"label": c, "score": p} for c, p in self.top(top_k)]
        out["thresholds"] = self.thresholds
        return out


@dataclass
class Skipped:
    """The files that could not be read, each with its reason."""

    items: list[str] = field(default_factory=list)


def expand_paths(patterns: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Image files from files, folders (recursive, by image suffix) and globs, in order, without duplicates.

    Returns:
        The files and one message per pattern that matched nothing.
    """
    files: dict[Path, None] = {}
    seen: set[Path] = set()  # resolved: a symlink loop or a second glob does not predict one file twice
    missing: list[str] = []
    for pattern in map(str, patterns):
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            hits = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
            found = sorted(hits, key=lambda p: (len(p.parts), str(p)))  # shallow first: a symlink loop's copies last
        if not found:
            missing.append(f"{pattern}: no such file, folder or matching image")
        for p in found:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                files[p] = None
    return list(files), missing


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """HWC uint8 RGB resized to ``size`` x ``size`` exactly as the evaluation pipeline does (``A.Resize``)."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)


class _Files(torch.utils.data.Dataset):
    """Decoded and resized image files; an unreadable one gives its error message instead of pixels."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, resize_rgb(read_rgb(self.paths[i]), self.size), ""
        except DECODE_ERRORS as err:  # FileNotFoundError included (a file removed since it was listed)
            return i, None, f"{self.paths[i]}: {type(err).__name__}: {err}"


def _collate(items: list[tuple[int, np.ndarray | None, str]]) -> tuple[list[int], torch.Tensor | None, list[str]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    images = torch.from_numpy(np.stack([x for _, x in good])) if good else None
    return [i for i, _ in good], images, [e for _, _, e in items if e]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device {name!r}: expected auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    return torch.device(name)


TASK_NAMES = ("multilabel", "singlelabel")


def _probability(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0


MAX_INPUT_SIDE = 4096  # a classifier's input side; a tampered size of 10**6 would allocate terabytes per image


def _info_problem(info: object) -> str:
    """What makes exported metadata unusable ("" when nothing): the fields prediction relies on, checked."""
    if not isinstance(info, dict):
        return "is not an object"
    task, classes, inputs = info.get("task"), info.get("classes"), info.get("input")
    if task not in TASK_NAMES:
        return f"'task' is {task!r}, not one of {', '.join(TASK_NAMES)}"
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return "'classes' is not a list of class names"
    if len(set(classes)) != len(classes):
        again = next(c for i, c in enumerate(classes) if c in classes[:i])
        return f"'classes' names {again!r} twice"
    size = inputs.get("size") if isinstance(inputs, dict) else None
    if not (isinstance(size, list) and size and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        return "'input.size' is not a size in pixels"
    if min(size) < 1 or max(size) > MAX_INPUT_SIDE:
        return f"'input.size' is {size}, not a size from 1 to {MAX_INPUT_SIDE} pixels"
    thresholds, reject = info.get("thresholds"), info.get("reject_below")
    if task == "multilabel" and thresholds is not None:
        if not (isinstance(thresholds, list) and len(thresholds) == len(classes)):
            return f"'thresholds' is not one value per class ({len(classes)} classes)"
        if not all(_probability(t) for t in thresholds):
            return "'thresholds' holds a value that is not a probability (0..1)"
    if task == "singlelabel" and reject is not None and not _probability(reject):
        return f"'reject_below' is {reject!r}, not a probability (0..1)"
    return ""


def checked_info(info: object, where: Path) -> dict[str, Any]:
    """Exported metadata, refused in one line when tampered with or foreign (keys it does not use are ignored)."""
    problem = _info_problem(info)
    if problem:
        raise UserError(f"{where}: its model metadata {problem}; export the model again with `finetune export`")
    assert isinstance(info, dict)
    return info


def onnx_metadata(meta: dict[str, str]) -> dict[str, Any] | None:
    """The JSON fields of an ONNX file's ``metadata_props``; a key other tools added (not JSON) is left out."""
    if "classes" not in meta:
        return None
    parsed = {}
    for key, value in meta.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            continue
    return parsed


def _read_info(path: Path, embedded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's fields: its embedded metadata, else its sidecar (``model.int8.json``), else ``model.json``."""
    if embedded:
        return checked_info(embedded, path)
    # An INT8 file never falls back to model.json: those are the fp32 model's thresholds.
    fallback = [] if path.stem.endswith(".int8") else [path.with_name("model.json")]
    for beside in dict.fromkeys([path.with_suffix(".json"), *fallback]):
        if beside.is_file():
            return checked_info(read_json(beside, None, "export the model again"), beside)
    name = path.with_suffix(".json").name
    raise UserError(f"{path}: no {name} beside it and no metadata inside; export it with `finetune export`")


class Predictor:
    """Labels and probabilities for images, from a run directory or an exported model.

    Args:
        backend: uint8 NHWC array -> probabilities array.
        info: The ``model.json`` fields (classes, thresholds, input size, task).
        threshold: One threshold for every class instead of the calibrated ones.
    """

    def __init__(
        self, backend: Callable[[np.ndarray], np.ndarray], info: dict[str, Any], threshold: float | None = None
    ) -> None:
        if threshold is not None and not (_probability(threshold)):
            raise UserError(f"threshold {threshold}: a probability threshold is between 0 and 1")
        self.backend, self.info = backend, info
        self.classes: list[str] = list(info["classes"])
        self.size: int = int(info["input"]["size"][0])
        self.multi_label = info["task"] == "multilabel"
        saved = (info.get("thresholds") or 0.5) if self.multi_label else (info.get("reject_below") or 0.0)
        self.thresholds = np.asarray(threshold if threshold is not None else saved, dtype=np.float64)
        self.threshold_note = f"fixed {threshold:g}" if threshold is not None else info.get("thresholds_from", "")

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", threshold: float | None = None) -> Predictor:
        """The run's best (EMA when kept) weights, with its calibrated thresholds."""
        from finetune.deploy.export import run_classifier
        from finetune.rundir.directory import RunDir

        model, info = run_classifier(RunDir.open(run_dir))
        return cls(_torch_backend(model.to(_device(device))), info, threshold)

    @classmethod
    def from_torchscript(cls, path: str | Path, device: str = "auto", threshold: float | None = None) -> Predictor:
        """A ``finetune export --format torchscript`` file (its ``model.json`` is inside it)."""
        extra = {"model.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
                model = torch.jit.load(str(path), map_location=_device(device), _extra_files=extra)
        except (RuntimeError, ValueError, OSError) as err:
            raise UserError(f"{path}: not a TorchScript file ({(str(err).splitlines() or [''])[0][:120]})") from None
        try:
            embedded = json.loads(extra["model.json"]) if extra["model.json"] else None
        except ValueError:
            raise UserError(f"{path}: its model.json is not JSON; export the model again") from None
        info = _read_info(Path(path), embedded)
        return cls(_torch_backend(model.eval()), info, threshold)

    @classmethod
    def from_onnx(cls, path: str | Path, device: str = "auto", threshold: float | None = None) -> Predictor:
        """A ``finetune export --format onnx`` file, run by onnxruntime (thresholds read from its metadata)."""
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise UserError(f"{path}: not an ONNX model ({(str(err).splitlines() or [''])[0][:120]})") from None
        meta = session.get_modelmeta().custom_metadata_map
        info = _read_info(Path(path), onnx_metadata(meta))
        name = session.get_inputs()[0].name
        return cls(lambda x: session.run(None, {name: x})[0], info, threshold)

    @classmethod
    def from_litert(cls, path: str | Path, threshold: float | None = None) -> Predictor:
        """A ``finetune export --format litert`` file, run by the LiteRT interpreter (the ``litert`` extra)."""
        from finetune.deploy import mobile
        from finetune.deploy.tflite_metadata import read_model_json

        mobile.require("litert", runtime=True)
        backend = mobile.litert_backend(Path(path))  # a file that is not LiteRT is refused here, before it is read
        return cls(backend, _read_info(Path(path), read_model_json(Path(path).read_bytes())), threshold)

    @classmethod
    def from_openvino(cls, path: str | Path, device: str = "CPU", threshold: float | None = None) -> Predictor:
        """A ``finetune export --format openvino`` IR file (``.xml``), run by OpenVINO (the ``openvino`` extra)."""
        from finetune.deploy import mobile

        mobile.require("openvino", runtime=True)
        if device not in ("auto", "cpu", "CPU", "GPU", "NPU"):
            raise UserError(f"--device {device!r}: OpenVINO runs on auto/cpu here (or its own GPU / NPU names)")
        backend, info = mobile.openvino_backend(Path(path), "CPU" if device in ("auto", "cpu") else device)
        return cls(backend, _read_info(Path(path), info), threshold)

    @classmethod
    def from_executorch(cls, path: str | Path, threshold: float | None = None) -> Predictor:
        """A ``finetune export --format executorch`` file (``.pte``), run by ExecuTorch (the ``executorch`` extra)."""
        from finetune.deploy import pte

        return cls(pte.pte_backend(Path(path)), _read_info(Path(path)), threshold)

    @classmethod
    def load(cls, source: str | Path, device: str = "auto", threshold: float | None = None) -> Predictor:
        """A run directory or an exported file: ``.onnx``, TorchScript ``.pt``, ``.tflite``, ``.xml``, ``.pte``."""
        source = Path(source)
        if source.is_dir():
            return cls.from_run(source, device, threshold)
        if not source.is_file():
            raise UserError(f"{source}: no such run directory or exported model")
        if source.suffix == ".onnx":
            return cls.from_onnx(source, device, threshold)
        if source.suffix == ".tflite":
            return cls.from_litert(source, threshold)
        if source.suffix == ".xml":
            return cls.from_openvino(source, device, threshold)
        if source.suffix == ".pte":
            return cls.from_executorch(source, threshold)
        return cls.from_torchscript(source, device, threshold)

    def __call__(
        self, inputs: str | Path | np.ndarray | Iterable[Any], batch_size: int = 32, num_workers: int = 0
    ) -> Prediction | list[Prediction]:
        """``predictor(image)`` is one :class:`Prediction`; ``predictor([a, b])`` (or a folder, a glob) is a list.

        As a Hugging Face pipeline or an Ultralytics model is called; see :meth:`predict` for what an input can be.
        """
        results = self.predict(inputs, batch_size, num_workers)
        single = isinstance(inputs, np.ndarray) or hasattr(inputs, "convert")
        if isinstance(inputs, str | Path):
            single = Path(inputs).is_file()
        return results[0] if single else results

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[n, classes]`` of a uint8 ``[n, h, w, 3]`` batch (any h, w: resized in the graph)."""
        probs = np.asarray(self.backend(np.require(images, np.uint8, ["C", "W"])), dtype=np.float32)
        if probs.ndim != 2 or probs.shape[1] != len(self.classes):
            raise UserError(
                f"the model gives {probs.shape[-1]} outputs per image and its metadata names {len(self.classes)} "
                "classes; export the model again with `finetune export`"
            )
        return probs

    def _result(self, source: str, probs: np.ndarray) -> Prediction:
        (labels,) = label_indices(probs[None], self.multi_label, self.thresholds)
        probabilities = {c: float(p) for c, p in zip(self.classes, probs)}
        return Prediction(source, [self.classes[i] for i in labels], probabilities, self.threshold_note)

    def predict_files(
        self, paths: Sequence[Path], batch_size: int = 32, num_workers: int = 0, skipped: Skipped | None = None
    ) -> Iterator[Prediction]:
        """Predictions for image files, in order, batched through a DataLoader; unreadable files go to ``skipped``.

        Without ``skipped``, a file that cannot be read is an error (it is never dropped silently).
        """
        if batch_size < 1 or num_workers < 0:
            raise UserError(f"batch_size {batch_size}, num_workers {num_workers}: give at least 1 and 0")
        loader = torch.utils.data.DataLoader(
            _Files(list(paths), self.size),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        for indices, images, errors in loader:
            if skipped is None and errors:
                raise UserError(f"{errors[0]}; pass skipped=Skipped() to go on past unreadable files")
            if skipped is not None:
                skipped.items.extend(errors)
            if images is None:
                continue
            for i, probs in zip(indices, self.probabilities(images.numpy())):
                yield self._result(str(paths[i]), probs)

    def predict(
        self, inputs: str | Path | np.ndarray | Iterable[Any], batch_size: int = 32, num_workers: int = 0
    ) -> list[Prediction]:
        """Predict files, folders, globs, HWC uint8 RGB arrays or PIL images (one, or a list mixing them).

        Raises:
            UserError: For a file that cannot be read (use :meth:`predict_files` to skip such files).
        """
        items = [inputs] if isinstance(inputs, str | Path | np.ndarray) or hasattr(inputs, "convert") else inputs
        if not isinstance(items, Iterable) or isinstance(items, bytes | dict):
            raise UserError(f"expected image paths, HxWx3 uint8 arrays or PIL images, got {type(inputs).__name__}")
        out: list[Prediction] = []
        for k, item in enumerate(items):
            if isinstance(item, str | Path):
                paths, missing = expand_paths([item])
                if missing:
                    raise UserError(missing[0])
                skipped = Skipped()
                out.extend(self.predict_files(paths, batch_size, num_workers, skipped))
                if skipped.items:
                    raise UserError(skipped.items[0])
            else:
                pixels = pil_rgb(item) if hasattr(item, "convert") else np.asarray(item)
                if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 1:
                    raise UserError(
                        f"input {k}: expected an HxWx3 uint8 RGB array (or a PIL image, a path), got "
                        f"{type(item).__name__} {pixels.dtype} {pixels.shape}"
                    )
                probs = self.probabilities(resize_rgb(pixels, self.size)[None])[0]
                out.append(self._result(f"<array {k}>", probs))
        return out


def _torch_backend(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    device = next(iter(model.parameters()), torch.empty(0)).device

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(images).to(device)).float().cpu().numpy()

    return run
