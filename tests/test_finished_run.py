"""A trained, exported run and the commands that read it.

Tampered or foreign export metadata, corrupt tool-written files, the Python API's conversions, settings that would do
nothing, data whose categories are not the run's, a second calibrate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.runs.run import run_recipe

from .conftest import run_cli
from .helpers import copy_data, recipe_at


# Exported metadata, the Python API and tool-written files: a tampered file is a user error, never a
# traceback or a silently wrong answer.
@pytest.fixture(scope="module")
def shipped(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run exported to ONNX and TorchScript (module-scoped; tests copy what they change)."""
    from finetune.deploy.export import export_run

    from .conftest import TINY_RECIPE

    folder = tmp_path_factory.mktemp("shipped")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=tiny_coco.as_posix(), runs=(folder / "runs").as_posix()))
    run = run_recipe(load_recipe(recipe))
    export_run(run, "onnx")
    export_run(run, "torchscript")
    return run


def _tampered(info: dict, how: str) -> dict:
    info = json.loads(json.dumps(info))
    n = len(info["classes"])
    edits = {
        "thresholds too short": lambda: info.update(thresholds=info["thresholds"][:-1]),
        "one threshold for all": lambda: info.update(thresholds=[0.3]),
        "thresholds a string": lambda: info.update(thresholds="0.3"),
        "NaN threshold": lambda: info.update(thresholds=[float("nan")] * n),
        "threshold 2.0": lambda: info.update(thresholds=[2.0] * n),
        "no input": lambda: info.pop("input"),
        "no task": lambda: info.pop("task"),
        "task regression": lambda: info.update(task="regression"),
        "size 0": lambda: info["input"].update(size=[0, 0]),
        "size text": lambda: info["input"].update(size=["big", "big"]),
    }
    edits[how]()
    return info


TAMPERED = {
    "thresholds too short": "'thresholds' is not one value per class",
    "one threshold for all": "'thresholds' is not one value per class",
    "thresholds a string": "'thresholds' is not one value per class",
    "NaN threshold": "not a probability (0..1)",
    "threshold 2.0": "not a probability (0..1)",
    "no input": "'input.size' is not a size in pixels",
    "no task": "'task' is None, not one of multilabel, singlelabel",
    "task regression": "'task' is 'regression', not one of",
    "size 0": "'input.size' is [0, 0], not a size from 1 to 4096 pixels",
    "size text": "'input.size' is not a size in pixels",
}


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(TAMPERED))
def test_tampered_export_metadata_is_refused_in_one_line(how: str, shipped: Path, tmp_path: Path) -> None:
    import onnx

    from finetune import Predictor

    model = onnx.load(str(shipped / "export" / "model.onnx"))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    bad = _tampered(meta, how)
    del model.metadata_props[:]
    for key, value in {**bad, "producer_note": "not json {"}.items():  # plus a foreign, non-JSON key
        model.metadata_props.add(key=key, value=value if key == "producer_note" else json.dumps(value))
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(UserError) as err:
        Predictor.from_onnx(tmp_path / "model.onnx")
    line = str(err.value)
    assert TAMPERED[how] in line and line.endswith("export the model again with `finetune export`"), line


@pytest.mark.slow
def test_foreign_metadata_is_ignored_and_outputs_must_match_classes(shipped: Path, tmp_path: Path) -> None:
    import onnx

    from finetune import Predictor

    model = onnx.load(str(shipped / "export" / "model.onnx"))
    model.metadata_props.add(key="producer_note", value="made with another tool")  # was: a JSONDecodeError
    onnx.save(model, str(tmp_path / "model.onnx"))
    image = sorted((Path(load_recipe(shipped / "recipe.toml").data.root) / "test").iterdir())[0]
    good = Predictor.from_onnx(tmp_path / "model.onnx").predict(image)[0]
    assert good.probabilities == Predictor.from_onnx(shipped / "export" / "model.onnx").predict(image)[0].probabilities
    for p in model.metadata_props:
        if p.key == "classes":
            p.value = json.dumps(json.loads(p.value)[:-1])
        if p.key == "thresholds":
            p.value = json.dumps(json.loads(p.value)[:-1])
    onnx.save(model, str(tmp_path / "fewer.onnx"))
    with pytest.raises(UserError, match="the model gives 10 outputs per image and its metadata names 9 classes"):
        Predictor.from_onnx(tmp_path / "fewer.onnx").predict(image)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["thresholds.json", "classes.json"])
@pytest.mark.parametrize("command", ["eval", "export", "predict"])
def test_a_corrupt_tool_written_file_is_one_line(name: str, command: str, shipped: Path, tmp_path: Path) -> None:

    run = tmp_path / "run"
    shutil.copytree(shipped, run, ignore=shutil.ignore_patterns("export"))
    (run / name).write_text('{"classes": [')  # a torn or hand-broken file
    image = sorted((Path(load_recipe(run / "recipe.toml").data.root) / "test").iterdir())[0]
    args = {"eval": ["eval", str(run)], "export": ["export", str(run)], "predict": ["predict", str(run), str(image)]}
    proc = run_cli(*args[command])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{run / name}: corrupt" in " ".join(proc.stderr.split()), proc.stderr


@pytest.mark.slow
def test_the_python_api_converts_like_a_file_and_refuses_what_it_cannot_use(shipped: Path, tmp_path: Path) -> None:

    from finetune import Predictor

    predictor = Predictor.from_run(shipped)
    ramp = (np.linspace(0, 65535, 48 * 48).reshape(48, 48)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as img:
        by_pil = predictor.predict(img)[0].probabilities  # was: PIL's convert("RGB"), a white image
    assert by_pil == pytest.approx(predictor.predict(path)[0].probabilities, abs=1e-6)  # was: 0.12 apart
    for bad, needle in [
        (np.zeros((48, 48, 3), np.float32), "float32"),
        (np.zeros((48, 48, 3), np.int64), "int64"),
        (np.zeros((0, 0, 3), np.uint8), "(0, 0, 3)"),
        (np.zeros((1, 3, 48, 48), np.uint8), "(1, 3, 48, 48)"),
        (np.zeros((48, 48), np.uint8), "(48, 48)"),
    ]:
        with pytest.raises(UserError, match=r"expected an HxWx3 uint8 RGB array"):
            predictor.predict(bad)
        with pytest.raises(UserError, match=re.escape(needle)):
            predictor.predict([bad])
    with pytest.raises(UserError, match="expected an HxWx3 uint8 RGB array"):
        predictor.predict([None])
    with pytest.raises(UserError, match="missing.jpg"):
        list(predictor.predict_files([tmp_path / "missing.jpg"]))  # was: [] without a word
    with pytest.raises(UserError, match="batch_size 0"):
        list(predictor.predict_files([path], batch_size=0))
    with pytest.raises(UserError, match="threshold 0.3: a probability threshold"):
        Predictor.from_run(shipped, threshold="0.3")  # type: ignore[arg-type]


@pytest.mark.slow
def test_settings_that_would_do_nothing_are_refused(shipped: Path, tiny_recipe: Path, folder_data: Path) -> None:
    said = run_cli("calibrate", str(shipped), "--set", "optim.lr=3")  # was: accepted, and nothing changed
    assert said.returncode == 2 and "--set optim.lr: calibrate changes only calibrate.*" in said.stderr, said.stderr
    single = ['data.format="folder"', 'loss.name="ce"', "data.image_size=24", f'data.root="{folder_data.as_posix()}"']
    run = run_recipe(load_recipe(tiny_recipe, [*single, "output.name=single"]))
    said = run_cli("eval", str(run), "--threshold", "0.3")  # was: accepted, and no threshold was applied
    assert said.returncode == 2 and "--threshold: a single-label run predicts its top class" in said.stderr


@pytest.mark.slow
def test_eval_refuses_data_whose_categories_are_not_the_runs(shipped: Path, tmp_path: Path) -> None:

    old_root = str(Path(load_recipe(shipped / "recipe.toml").data.root))
    root = tmp_path / "data"
    shutil.copytree(old_root, root)
    ann = root / "annotations" / "instances_test.json"
    doc = json.loads(ann.read_text())
    doc["categories"][0]["name"] = "renamed"  # the same ids, another name: was scored silently against classes.json
    ann.write_text(json.dumps(doc))
    run = tmp_path / "run"
    shutil.copytree(shipped, run, ignore=shutil.ignore_patterns("export"))
    (run / "recipe.toml").write_text((run / "recipe.toml").read_text().replace(old_root, str(root)))
    said = run_cli("eval", str(run), "--split", "test")
    text = " ".join(said.stderr.split())
    assert said.returncode == 2 and "categories differ from the training split's (or the run's classes.json)" in text
    assert "'renamed' vs 'circle'" in text, text


@pytest.mark.slow
def test_relative_root_and_second_calibrate(
    tiny_recipe: Path, tiny_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune.runs.evaluate import calibrate_run

    data = copy_data(tiny_coco, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    recipe = recipe_at(tiny_recipe, Path(os.path.relpath(data, work)))
    monkeypatch.chdir(work)
    run_dir = run_recipe(load_recipe(recipe))
    assert load_recipe(run_dir / "recipe.toml").data.root == str(data.resolve())
    written = [(run_dir / "thresholds.json").read_bytes()]
    monkeypatch.chdir(tmp_path)  # from another folder: the saved root is absolute
    for split in ("train", "val"):
        calibrate_run(run_dir, split, Console(file=StringIO()))
        written.append((run_dir / "thresholds.json").read_bytes())
    assert (run_dir / "thresholds.run.json").read_bytes() == written[0]  # the training's own, kept after two
    assert (run_dir / "thresholds.prev.json").read_bytes() == written[1]
