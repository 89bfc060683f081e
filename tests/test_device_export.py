"""INT8 ONNX with re-fitted thresholds, LiteRT / OpenVINO (extras), the model card, a callable Predictor."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from PIL import Image

from finetune import Predictor
from finetune.assembly import build_from_run
from finetune.config import load_recipe
from finetune.deploy.export import export_run
from finetune.deploy.quantize import backend_outputs
from finetune.eval.thresholds import fit_thresholds
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe

from .conftest import TINY_RECIPE, assert_user_error, run_cli

# On the tiny generated model (mobilenetv2_035, 2 epochs, 32 px, ranges from 16 images) INT8 probabilities on the
# 12 generated test images moved from fp32 by at most 0.059-0.106 and on average 0.016-0.017 (train seeds 0, 1, 2).
# The bounds leave room for another machine's kernels; a broken quantizer (scales off, a missing dequantize) moves
# the mean by far more.
INT8_MAX, INT8_MEAN = 0.2, 0.04


def _run(folder: Path, tiny_coco: Path, sets: list[str]) -> Path:
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=tiny_coco.as_posix(), runs=(folder / "runs").as_posix()))
    return run_recipe(load_recipe(recipe, ["train.epochs=2", *sets]))


@pytest.fixture(scope="module")
def tiny_run(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # No shrinkage toward the global threshold, so that the INT8 file's thresholds have a plain reference below.
    return _run(tmp_path_factory.mktemp("device"), tiny_coco, ["calibrate.shrink=0"])


@pytest.fixture(scope="module")
def int8_export(tiny_run: Path):
    return export_run(tiny_run, "onnx", int8=True, calibration_images=16)


def _onnx(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), meta


def test_int8_carries_thresholds_refitted_on_its_own_probabilities(tiny_run: Path, int8_export) -> None:
    export = tiny_run / "export"
    int8, meta = _onnx(export / "model.int8.onnx")
    fp32, meta32 = _onnx(export / "model.onnx")
    assert meta["precision"] == "int8" and meta["classes"] == meta32["classes"]
    assert meta["quantization"]["format"] == "QDQ" and meta["quantization"]["calibration_images"] == 16
    # Independently: the INT8 file's own probabilities on the calibration split, thresholds fitted with the run's
    # settings (min_positives 5, no shrinkage), equal what the file carries, and not the fp32 ones.
    parts = build_from_run(RunDir.open(tiny_run), ("val",))
    out = backend_outputs(int8, parts, ["val"])["val"]
    expected = fit_thresholds(out.targets, out.probs, min_positives=5).thresholds
    np.testing.assert_allclose(meta["thresholds"], expected, rtol=0, atol=1e-6)
    assert not np.allclose(meta["thresholds"], meta32["thresholds"])
    assert json.loads((export / "model.int8.json").read_text())["thresholds"] == meta["thresholds"]
    # Probabilities on the generated test images stay within the stated tolerance of fp32, and the file is smaller.
    test = build_from_run(RunDir.open(tiny_run), ("test",))
    diff = np.abs(
        backend_outputs(int8, test, ["test"])["test"].probs - backend_outputs(fp32, test, ["test"])["test"].probs
    )
    assert diff.max() <= INT8_MAX and diff.mean() <= INT8_MEAN, (diff.max(), diff.mean())
    assert (export / "model.int8.onnx").stat().st_size < (export / "model.onnx").stat().st_size / 2
    # The side-by-side table: fp32, INT8 at fp32's thresholds, INT8 at its own, on the test split.
    rows = int8_export.comparison["rows"]
    assert [r["model"] for r in rows] == ["fp32", "int8, fp32 thresholds", "int8, re-fitted thresholds"]
    assert int8_export.comparison["scored_on"] == "test split"
    assert json.loads((export / "model.json").read_text())["int8"]["comparison"] == int8_export.comparison


def _front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_states_the_task_and_every_class(tiny_run: Path, int8_export) -> None:
    classes = [c["name"] for c in json.loads((tiny_run / "classes.json").read_text())]
    card = _front_matter(tiny_run / "export" / "README.md")
    f = card["finetune"]
    assert card["pipeline_tag"] == "image-classification" and "multi-label-classification" in card["tags"]
    assert f["task"] == "multilabel" and f["activation"] == "sigmoid" and f["apply_softmax"] is False
    assert [c["name"] for c in f["classes"]] == classes
    thresholds = json.loads((tiny_run / "export" / "model.json").read_text())["thresholds"]
    assert [c["threshold"] for c in f["classes"]] == pytest.approx(thresholds)
    assert f["data"]["splits"] == {"train": 24, "val": 12, "test": 12}
    assert f["metrics"]["measured_on"] == "test split" and "int8" in f
    body = (tiny_run / "export" / "README.md").read_text()
    assert "Do not apply softmax" in body and "fewer than 5 training positives" in body
    proc = run_cli("card", str(tiny_run))
    assert proc.returncode == 0, proc.stderr
    assert [c["name"] for c in _front_matter(tiny_run / "README.md")["finetune"]["classes"]] == classes


def test_predictor_is_callable_on_one_image_and_on_a_list(tiny_run: Path, tiny_coco: Path, int8_export) -> None:
    predict = Predictor.load(tiny_run / "export" / "model.int8.onnx")
    files = sorted((tiny_coco / "test").glob("*.jpg"))[:3]
    one = predict(files[0])
    assert one.source == str(files[0]) and set(one.probabilities) == set(predict.classes)
    pixels = np.asarray(Image.open(files[1]).convert("RGB"))
    assert predict(pixels).probabilities == pytest.approx(predict(files[1]).probabilities, abs=1e-6)
    many = predict([files[0], pixels, Image.open(files[2])])
    assert isinstance(many, list) and len(many) == 3
    assert many[0].probabilities == pytest.approx(one.probabilities, abs=1e-6)
    assert len(predict(tiny_coco / "test")) == 12  # a folder is a list
    assert predict.thresholds.tolist() == pytest.approx(
        json.loads((tiny_run / "export" / "model.int8.json").read_text())["thresholds"]
    )


def test_jsonl_streams_one_object_per_image_as_it_goes(
    tiny_run: Path, tiny_coco: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune.cli import deploy

    real_load = Predictor.load
    stream = io.StringIO()
    lines_before_batch: list[int] = []

    def spying_load(*args, **kwargs):
        predictor = real_load(*args, **kwargs)
        backend = predictor.backend

        def spy(images):
            lines_before_batch.append(stream.getvalue().count("\n"))
            return backend(images)

        predictor.backend = spy
        return predictor

    monkeypatch.setattr(Predictor, "load", spying_load)
    monkeypatch.setattr(sys, "stdout", stream)
    files = [str(p) for p in sorted((tiny_coco / "test").glob("*.jpg"))[:4]]
    deploy.predict_command(tiny_run, files, jsonl=True, batch_size=1, workers=0, top_k=2)
    monkeypatch.undo()
    rows = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["image"] for r in rows] == files
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["score"] >= r["top_k"][1]["score"] for r in rows)
    assert lines_before_batch == [0, 1, 2, 3]  # image k's line was out before image k+1 was computed


def test_bad_int8_requests_are_one_line(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for count in ("0", "25"):
        proc = run_cli("export", str(tiny_run), "--int8", "--calibration-images", count)
        assert_user_error(proc, f"--calibration-images {count}", "24 images", "1 to 24")
    assert_user_error(run_cli("export", str(tiny_run), "--format", "torchscript", "--int8"), "--int8", "TorchScript")
    assert_user_error(run_cli("export", str(tiny_run), "--quantize", "int4"), "--quantize 'int4'")
    real = importlib.util.find_spec
    missing = {"openvino", "litert_torch", "ai_edge_litert"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    assert_user_error(run_cli("export", str(tiny_run), "--format", "openvino"), "pip install 'finetune[openvino]'")
    assert_user_error(run_cli("export", str(tiny_run), "--format", "litert"), "pip install 'finetune[litert]'")
    assert_user_error(run_cli("export", str(tiny_run), "--out", str(tiny_run / "m.pt")), "--out", "model.onnx")
    readme = tiny_run.parent / "README.md"
    readme.write_text("# my project\n")
    assert_user_error(
        run_cli("export", str(tiny_run), "--out", str(tiny_run.parent / "m.onnx")), "README.md", "--no-card"
    )
    assert readme.read_text() == "# my project\n" and not (tiny_run.parent / "m.onnx").exists()
    fake = tiny_run / "model.tflite"
    fake.write_bytes(b"x")
    assert_user_error(run_cli("predict", str(fake), str(fake)), "pip install 'finetune[litert]'")


@pytest.mark.slow
def test_single_label_int8_export_works(folder_data: Path, tmp_path: Path) -> None:
    sets = ['data.format="folder"', 'loss.name="ce"', "data.image_size=24", f'data.root="{folder_data.as_posix()}"']
    run_dir = _run(tmp_path, folder_data, sets)
    result = export_run(run_dir, "onnx", int8=True)
    rows = result.comparison["rows"]
    assert [r["model"] for r in rows] == ["fp32", "int8"] and all(0 <= r["top1"] <= 1 for r in rows)
    info = json.loads((run_dir / "export" / "model.int8.json").read_text())
    assert info["thresholds"] is None and info["quantization"]["calibration_images"] == 36
    card = _front_matter(run_dir / "export" / "README.md")
    assert card["finetune"]["task"] == "singlelabel" and card["finetune"]["activation"] == "softmax"


@pytest.mark.extra("litert")
def test_litert_parity(tiny_run: Path, tiny_coco: Path) -> None:
    result = export_run(tiny_run, "litert", int8=True, calibration_images=16, card=False)
    files = sorted((tiny_coco / "train").glob("*.jpg"))[:16]  # not val: its probabilities are the thresholds
    ours = Predictor.load(result.path).predict(files)
    ref = Predictor.from_run(tiny_run, "cpu").predict(files)
    np.testing.assert_allclose(_probs(ours), _probs(ref), atol=1e-4, rtol=0)
    int8 = Predictor.load(result.path.with_name("model.int8.tflite"))
    diff = np.abs(_probs(int8.predict(files)) - _probs(ref))
    assert diff.max() <= INT8_MAX and diff.mean() <= INT8_MEAN, (diff.max(), diff.mean())
    refitted = json.loads(result.path.with_name("model.int8.json").read_text())
    assert (
        int8.thresholds.tolist() == pytest.approx(refitted["thresholds"]) and "re-fitted" in refitted["thresholds_from"]
    )


def _mediapipe_scores(path: Path, images: np.ndarray, classes: list[str], **options) -> np.ndarray:
    """MediaPipe Tasks' ImageClassifier on each image: its scores by category index (0 where it listed none)."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions

    config = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1, **options)
    scores = np.zeros((len(images), len(classes)))
    with ImageClassifier.create_from_options(config) as classifier:
        for i, image in enumerate(images):
            res = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
            for c in res.classifications[0].categories:
                assert c.category_name == classes[c.index]  # the labels inside the file are the run's classes
                scores[i, c.index] = c.score
    return scores


def _check_mediapipe(run_dir: Path, files: list[Path], tmp_path: Path) -> None:
    """The fp32 and INT8 .tflite, each alone in a folder, read by MediaPipe and by Predictor from their metadata."""
    from finetune.deploy.predictor import resize_rgb

    export_run(run_dir, "litert", int8=True, calibration_images=16, card=False, out=tmp_path / "m.tflite")
    run = Predictor.from_run(run_dir, "cpu")
    images = np.stack([resize_rgb(np.asarray(Image.open(f).convert("RGB")), run.size) for f in files])  # no resize
    alone = tmp_path / "alone"
    alone.mkdir()
    for name, tol in (("m.tflite", 1e-4), ("m.int8.tflite", INT8_MAX)):
        shutil.copy(tmp_path / name, alone / name)  # no sidecar beside it
        ours = Predictor.load(alone / name)  # classes and thresholds from the file's own metadata
        sidecar = json.loads((tmp_path / name.replace(".tflite", ".json")).read_text())
        assert ours.classes == run.classes and ours.info["thresholds"] == sidecar["thresholds"]
        scores = _mediapipe_scores(alone / name, images, run.classes, score_threshold=1e-9)
        np.testing.assert_allclose(scores, ours.probabilities(images), atol=1e-5, rtol=0)  # MediaPipe = our runtime
        np.testing.assert_allclose(scores, run.probabilities(images), atol=tol, rtol=0)  # and the run's model
        if run.multi_label:  # by default MediaPipe keeps the classes at or above the file's global threshold
            kept = _mediapipe_scores(alone / name, images[:1], run.classes)[0] > 0
            np.testing.assert_array_equal(kept, scores[0] >= min(sidecar["thresholds"]) - 1e-6)


@pytest.mark.extra("litert")
def test_litert_files_are_read_by_mediapipe_without_a_sidecar(tiny_run: Path, tiny_coco: Path, tmp_path: Path) -> None:
    """MediaPipe Tasks' ImageClassifier (a runtime nobody here wrote) on the .tflite files alone: multi-label."""
    _check_mediapipe(tiny_run, sorted((tiny_coco / "train").glob("*.jpg"))[:8], tmp_path)


@pytest.mark.extra("litert")
def test_litert_single_label_file_is_read_by_mediapipe(folder_data: Path, tmp_path: Path) -> None:
    sets = ['data.format="folder"', 'loss.name="ce"', "data.image_size=24", f'data.root="{folder_data.as_posix()}"']
    run_dir = _run(tmp_path, folder_data, [*sets, "train.epochs=1"])
    _check_mediapipe(run_dir, sorted((folder_data / "train").rglob("*.png"))[:8], tmp_path)


@pytest.mark.extra("openvino")
def test_openvino_parity(tiny_run: Path, tiny_coco: Path, tmp_path: Path) -> None:
    result = export_run(tiny_run, "openvino", int8=True, calibration_images=16, card=False)
    files = sorted((tiny_coco / "train").glob("*.jpg"))[:16]
    folder = result.path.parent
    # fp32: the same numbers; INT8: OpenVINO's own int8 kernels on the same QDQ graph (0.04 apart when measured).
    alone = tmp_path / "alone"  # the IR pair without its sidecar: classes and thresholds come from its rt_info
    alone.mkdir()
    for xml, onnx_file, tol in (("model.xml", "model.onnx", 1e-4), ("model.int8.xml", "model.int8.onnx", 0.1)):
        for part in (xml, xml.replace(".xml", ".bin")):
            shutil.copy(folder / part, alone / part)
        ours = Predictor.load(alone / xml)
        ref = Predictor.load(folder / onnx_file)
        np.testing.assert_allclose(_probs(ours.predict(files)), _probs(ref.predict(files)), atol=tol, rtol=0)
        assert ours.thresholds.tolist() == pytest.approx(ref.thresholds.tolist()) and ours.classes == ref.classes
    parity = json.loads((folder / "model.json").read_text())["openvino"]["parity_vs_onnxruntime"]
    assert set(parity) == {"model.xml", "model.int8.xml"}


@pytest.mark.extra("executorch")
def test_executorch_runtime_reads_the_pte(tiny_run: Path, tiny_coco: Path) -> None:
    """ExecuTorch's own runtime (not the toolkit's wrapper) on the .pte gives the toolkit's probabilities."""
    import torch
    from executorch.runtime import Runtime

    from finetune.deploy.export import run_classifier
    from finetune.deploy.pte import pte_backend

    result = export_run(tiny_run, "executorch", int8=True, calibration_images=16, card=False)
    assert result.path == tiny_run / "export" / "executorch" / "model.pte"
    model, info = run_classifier(RunDir.open(tiny_run))
    size = info["input"]["size"][0]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8))
    with torch.inference_mode():
        eager = model(images).numpy()
    for name, tol in (("model.pte", 1e-5), ("model.int8.pte", INT8_MAX)):
        method = Runtime.get().load_program(result.path.with_name(name)).load_method("forward")
        theirs = method.execute([images])[0].numpy()
        np.testing.assert_allclose(theirs, eager, atol=tol, rtol=0)  # batch 5: the batch is dynamic
    files = sorted((tiny_coco / "train").glob("*.jpg"))[:16]  # not val: its probabilities are the thresholds
    ref = _probs(Predictor.from_run(tiny_run, "cpu").predict(files))
    np.testing.assert_allclose(_probs(Predictor.load(result.path).predict(files)), ref, atol=1e-4, rtol=0)
    many = np.repeat(images.numpy(), 20, axis=0)  # 100 images: more than one call of the runtime takes
    np.testing.assert_allclose(pte_backend(result.path)(many), np.repeat(eager, 20, axis=0), atol=1e-5, rtol=0)
    int8 = Predictor.load(result.path.with_name("model.int8.pte"))
    diff = np.abs(_probs(int8.predict(files)) - ref)
    assert diff.max() <= INT8_MAX and diff.mean() <= INT8_MEAN, (diff.max(), diff.mean())
    refitted = json.loads(result.path.with_name("model.int8.json").read_text())
    assert int8.thresholds.tolist() == pytest.approx(refitted["thresholds"])
    assert "re-fitted" in refitted["thresholds_from"]
    assert refitted["quantization"]["tool"].startswith("ExecuTorch XNNPACKQuantizer")


@pytest.mark.extra("executorch")
def test_executorch_int8_with_flip_tta_keeps_the_probabilities(tiny_run: Path, tmp_path: Path) -> None:
    """Flip TTA inside the .pte: the INT8 file stays as close to eager as without it (BN statistics made non-trivial,
    as a trained network's are: PT2E's INT8 of a graph calling the network twice was far off on efficientnet_lite0)."""
    import torch

    from finetune.deploy import pte
    from finetune.deploy.export import run_classifier
    from finetune.deploy.exported import int8_name
    from finetune.deploy.quantize import calibration_loader

    parts = build_from_run(RunDir.open(tiny_run), ("train", "val", "test"), ["data.num_workers=0"])
    model, info = run_classifier(RunDir.open(tiny_run), parts)
    model.hflip = True
    gen = torch.Generator().manual_seed(0)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) * 3 + 0.25)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
    out = pte.export_executorch(model, info, tmp_path / "model.pte", parts, calibration_loader(parts, 16))
    size = info["input"]["size"][0]
    images = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    with torch.inference_mode():
        eager = model(torch.from_numpy(images)).numpy()
    assert not model.one_pass  # the eager wrapper is left as it was
    np.testing.assert_allclose(pte.pte_backend(out.path)(images), eager, atol=1e-5, rtol=0)
    diff = np.abs(pte.pte_backend(int8_name(out.path))(images) - eager)
    assert diff.max() <= INT8_MAX and diff.mean() <= INT8_MEAN, (diff.max(), diff.mean())


def _probs(results) -> np.ndarray:
    return np.array([list(r.probabilities.values()) for r in results])
