"""Every command on each kind of run (multi-label COCO, single-label image folder), in process."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finetune.cli.app import app
from finetune.errors import UserError

STAGES = 'freeze.stages=[{epochs = 1, train = ["classifier"]}, {train = ["all"]}]'


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["multi_label", "single_label"])
def test_every_command_on_each_kind(
    kind: str, tiny_recipe: Path, tiny_coco: Path, folder_data: Path, tmp_path: Path
) -> None:
    sets = ["train.epochs=2", STAGES]
    if kind == "single_label":
        sets += [
            'data.format="folder"',
            'loss.name="ce"',
            "data.image_size=24",
            f'data.root="{folder_data.as_posix()}"',
        ]
        image = next((folder_data / "test" / "red").glob("*.png"))
    else:
        image = next((tiny_coco / "test").glob("*.jpg"))
    args = [str(tiny_recipe), *(x for s in sets for x in ("--set", s))]
    assert "valid" in _invoke("validate", *args)
    assert "stage 2" in _invoke("groups", *args)
    assert "MACs per image" in _invoke("summary", *args)
    assert "images" in _invoke("data", "stats", *args)
    _invoke("run", *args)
    run_dir = tmp_path / "runs" / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == kind and set(report["splits"]) == {"val", "test"}

    shown = _invoke("eval", str(run_dir), "--split", "test")
    evaluated = json.loads((run_dir / "eval_test.json").read_text())
    assert evaluated["task"] == kind
    assert ("top-1" if kind == "single_label" else "mAP") in shown
    if kind == "multi_label":
        assert "fitted on val" in _invoke("calibrate", str(run_dir))
        assert evaluated["splits"]["test"]["calibrated"]["summary"] == report["splits"]["test"]["calibrated"]["summary"]
    else:
        assert evaluated["splits"]["test"]["summary"] == report["splits"]["test"]["summary"]
        with pytest.raises(UserError, match="single-label run"):
            CliRunner().invoke(app, ["calibrate", str(run_dir)], catch_exceptions=False)
    (result,) = json.loads(_invoke("predict", str(run_dir), str(image), "--json"))
    assert len(result["probabilities"]) == len(json.loads((run_dir / "classes.json").read_text()))
    assert len(result["labels"]) == 1 if kind == "single_label" else result["thresholds"].startswith("calibrated")
