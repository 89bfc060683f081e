"""The Python API: finetune.train() and Run give what the command line gives, from the same functions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import finetune
from finetune.api import as_overrides, build_recipe
from finetune.config import load_recipe
from finetune.errors import UserError

from .conftest import assert_user_error, run_cli


def test_overrides_read_as_the_command_lines() -> None:
    got = as_overrides({"data.root": Path("/d"), "train": {"epochs": 2}}, {"model__name": "mobilenetv2_050"})
    assert got == ['data.root="/d"', "train.epochs=2", 'model.name="mobilenetv2_050"']
    assert as_overrides(["train.epochs=3"], {"data__image_size": 64}) == ["train.epochs=3", "data.image_size=64"]
    with pytest.raises(UserError, match=r"train\.seed=None: a recipe has no null value"):
        as_overrides({"train.seed": None})
    # A map-valued key is one value, as --set takes it: its keys (layer selectors, class names) may hold dots.
    got = as_overrides({"optim.lr_mult": {"blocks.5:": 0.1}, "calibrate": {"classes": {"a.b": {"target": 0.9}}}})
    assert got == ['optim.lr_mult={"blocks.5:" = 0.1}', 'calibrate.classes={"a.b" = {target = 0.9}}']


def test_a_recipe_from_a_dict_or_an_object(tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe)
    again = build_recipe(recipe, as_overrides(keys={"train__epochs": 3}))
    assert again.train.epochs == 3 and recipe.train.epochs != 3 and again.output.name == "tiny"
    mult = build_recipe(recipe, as_overrides(keys={"optim__lr_mult": {"blocks.5:": 0.1}})).optim.lr_mult
    assert mult == {"blocks.5:": 0.1}
    raw = {"data": {"root": recipe.data.root}, "output": {"dir": str(tiny_recipe.parent / "runs")}}
    assert build_recipe(raw).output.name == "run"
    (tiny_recipe.parent / "runs" / "run").mkdir(parents=True)
    assert build_recipe(raw).output.name == "run-2"  # the first free name, as Ultralytics names its runs


@pytest.mark.slow
def test_train_gives_the_clis_numbers_and_the_run_round_trips(
    tiny_recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sets = {"train.epochs": 1, "train.seed": 3}
    run = finetune.train(tiny_recipe, sets, output__name="api")
    assert capsys.readouterr().out == ""  # nothing on stdout unless asked
    cli = run_cli(
        "run", str(tiny_recipe), "--set", "train.epochs=1", "--set", "train.seed=3", "--set", "output.name=cli"
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    written = json.loads((tmp_path / "runs" / "cli" / "report.json").read_text())
    assert run.metrics == {
        name: {"fixed": s["summary"], **({"calibrated": s["calibrated"]["summary"]} if "calibrated" in s else {})}
        for name, s in written["splits"].items()
    }
    assert set(run.metrics) == {"val", "test"} and "calibrated" in run.metrics["test"]

    opened = finetune.Run.load(run.dir)
    saved = json.loads((run.dir / "thresholds.json").read_text())
    assert opened.classes == run.classes == [c["name"] for c in saved["classes"]]
    assert list(opened.thresholds.values()) == pytest.approx([c["threshold"] for c in saved["classes"]])
    images = sorted((Path(load_recipe(tiny_recipe).data.root) / "test").glob("*.jpg"))[:4]
    direct = opened.predictor().predict(images)
    exported = opened.export("onnx", card=False)
    from_file = finetune.Predictor.from_onnx(exported.path).predict(images)
    for a, b in zip(direct, from_file):
        assert a.labels == b.labels
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-5)
    _timm_folder_round_trip(opened)
    evaluated = opened.evaluate("test")
    assert evaluated["calibrated"] == pytest.approx(opened.metrics["test"]["calibrated"])
    assert "calibrated" not in opened.evaluate("test", threshold=0.3)
    assert opened.report().name == "report.html"


def test_a_user_error_is_the_clis_line(tiny_recipe: Path) -> None:
    with pytest.raises(UserError) as err:
        finetune.train(tiny_recipe, train__epochs=0)
    cli = run_cli("run", str(tiny_recipe), "--set", "train.epochs=0")
    assert_user_error(cli)
    assert cli.stderr.strip().splitlines()[-1] == f"error: {err.value}"
    with pytest.raises(UserError, match="not a run directory"):
        finetune.Run.load(tiny_recipe.parent)


def test_finetune_train_stays_callable_once_its_modules_are_imported() -> None:
    import finetune.train.loop  # binds finetune.train to the package, as any import of the loop does

    assert callable(finetune.train) and finetune.train.loop.Hook is not None


def _timm_folder_round_trip(run: finetune.Run) -> None:
    """``export --format hf``: timm rebuilds the network from the folder, and a recipe can start from it."""
    import timm
    import torch

    from finetune.assembly import build_from_run
    from finetune.models import read_state_dict
    from finetune.rundir.directory import RunDir

    folder = run.export("hf").path.parent
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "model.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["label_names"] == run.classes and config["num_classes"] == len(run.classes)
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and "Predictor.load" not in card  # the Hub shows timm's loading snippet
    sidecar = json.loads((folder / "model.json").read_text())
    assert sidecar["input"]["layout"] == "NCHW" and sidecar["output"]["applied"] is False  # the network, not a graph
    ours = build_from_run(RunDir.open(run.dir)).model.eval()
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    size = config["pretrained_cfg"]["input_size"][1]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)  # logits, before the sigmoid
    from PIL import Image

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=theirs))
    assert transform(Image.new("RGB", (3 * size, size))).shape == (3, size, size)  # squashed whole, not centre-cropped
    assert set(read_state_dict(folder)) == set(ours.state_dict())  # model.checkpoint = "FOLDER" reads it
    assert run.export("hf").path.parent == folder  # a second export replaces its own files
    with pytest.raises(UserError, match=r"--int8: timm's folder \(hf\) has no INT8 export"):
        run.export("hf", int8=True)
    with pytest.raises(UserError, match="timm reads model.safetensors by name"):
        run.export("hf", out=folder / "weights.safetensors")
