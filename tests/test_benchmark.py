"""``finetune benchmark``: every backend's row, its quality checked against scikit-learn, the JSON and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from finetune.assembly import build_from_run
from finetune.config import load_recipe
from finetune.deploy import mobile
from finetune.deploy.benchmark import benchmark_run, parse_formats
from finetune.deploy.exported import onnx_backend
from finetune.deploy.quantize import backend_outputs
from finetune.errors import UserError
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe

from .conftest import TINY_RECIPE, assert_user_error, run_cli


@pytest.fixture(scope="module")
def tiny_run(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bench")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=tiny_coco.as_posix(), runs=(folder / "runs").as_posix()))
    return run_recipe(load_recipe(recipe, ["train.epochs=2"]))


def test_the_command_writes_a_row_per_backend_the_json_and_the_plot(tiny_run: Path) -> None:
    proc = run_cli("benchmark", str(tiny_run), "--formats", "onnx", "--reps", "3", "--images", "4")
    assert proc.returncode == 0, proc.stderr
    assert "| onnx | int8 |" in proc.stdout and "scored on the test split" in proc.stdout
    doc = json.loads((tiny_run / "benchmark.json").read_text())
    rows = {(r["backend"], r["precision"]): r for r in doc["rows"]}
    assert list(rows) == [("pytorch", "fp32"), ("onnx", "fp32"), ("onnx", "int8")]
    assert (tiny_run / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tiny_run / "export").exists()  # the timed files sit in RUN/benchmark_models/, not in the user's export
    for r in rows.values():
        assert r["b1_ms"] > 0 and r["b1_p90_ms"] >= r["b1_ms"] and r["batch_ips"] > 0 and r["top1"] is None
    assert rows["onnx", "int8"]["mib"] < rows["onnx", "fp32"]["mib"] / 2 and rows["pytorch", "fp32"]["mib"] is None

    # The ONNX fp32 row's mAP is scikit-learn's on the same file's test probabilities, and eager PyTorch agrees.
    parts = build_from_run(RunDir.open(tiny_run), ("test",), ["data.num_workers=0"])
    out = backend_outputs(onnx_backend((tiny_run / rows["onnx", "fp32"]["file"]).read_bytes()), parts, ["test"])["test"]
    y = np.nan_to_num(out.targets)
    ap = [average_precision_score(y[:, c], out.probs[:, c]) for c in range(y.shape[1]) if y[:, c].any()]
    assert rows["onnx", "fp32"]["map"] == pytest.approx(np.mean(ap), abs=1e-9)
    assert rows["pytorch", "fp32"]["map"] == pytest.approx(rows["onnx", "fp32"]["map"], abs=1e-3)
    refit = [r["macro_f1_refit"] for r in rows.values()]
    assert all(0 <= f <= 1 for f in refit)


def test_bad_formats_and_a_missing_extra_are_one_line(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_user_error(run_cli("benchmark", str(tiny_run), "--formats", "tflite"), "--formats tflite", "onnx, openvino")
    assert_user_error(run_cli("benchmark", str(tiny_run), "--images", "0"), "--images 0")
    monkeypatch.setattr(mobile.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"openvino needs the openvino package.*pip install 'finetune\[openvino\]'"):
        parse_formats("onnx,openvino")
    assert parse_formats(None) == ("onnx",)  # by default, onnx and the extras that are installed


def test_a_run_without_a_test_split_is_scored_out_of_fold(tiny_coco: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=tiny_coco.as_posix(), runs=(tmp_path / "runs").as_posix()))
    run = run_recipe(load_recipe(recipe, ["train.epochs=1", 'data.test=""']))
    doc = benchmark_run(run, ("onnx",), images=2, reps=2)
    assert doc["scored_on"].startswith("val split") and len(doc["rows"]) == 3
    assert all(r["macro_f1_carried"] is None and 0 <= r["macro_f1_refit"] <= 1 for r in doc["rows"])
    again = benchmark_run(run, ("onnx",), images=2, reps=2)  # its own files in RUN/benchmark_models/ are replaced
    assert [r["mib"] for r in again["rows"]] == [r["mib"] for r in doc["rows"]]
    with pytest.raises(UserError, match="--formats torchscript"):  # checked from Python too
        benchmark_run(run, ("torchscript",))
