"""A run directory written by finetune 0.1.0 (before the layout move) still evaluates, exports and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune import Predictor
from finetune.deploy.export import export_run
from finetune.rundir.directory import RunDir
from finetune.runs.evaluate import evaluate_run
from finetune.runs.run import run_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1_0"


@pytest.fixture
def old_run(tmp_path: Path, tiny_coco: Path) -> Path:
    """A copy of the fixture run (made on ``tiny_coco``'s images) with its data root pointed at them."""
    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    (run / "expected.json").unlink()
    text = (run / "recipe.toml").read_text()
    old_root = next(line for line in text.splitlines() if line.startswith("root = "))
    (run / "recipe.toml").write_text(text.replace(old_root, f'root = "{tiny_coco.as_posix()}"'))
    return run


def _expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def test_an_old_run_evaluates_and_exports_as_it_did(old_run: Path, tiny_coco: Path) -> None:
    report = evaluate_run(old_run, "test")
    assert report.splits["test"].summary["map"] == pytest.approx(_expected()["fixture_test_map"], abs=1e-9)
    onnx = export_run(old_run).path
    probs = _expected()["onnx_probabilities"]
    results = Predictor.from_onnx(onnx).predict([tiny_coco / "test" / name for name in probs])
    for r in results:
        want = probs[Path(r.source).name]
        np.testing.assert_allclose([r.probabilities[c] for c in want], list(want.values()), atol=1e-6)


@pytest.mark.slow
def test_an_old_run_resumes_then_evaluates_and_exports(old_run: Path) -> None:
    recipe = RunDir.open(old_run).resume_recipe(["train.epochs=3"])
    run_recipe(recipe, resume=old_run)
    lines = (old_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["step"] == 9  # 3 steps per epoch, continued from step 6
    assert evaluate_run(old_run, "test").splits["test"].images == 12
    assert export_run(old_run).path.is_file()


def test_report_tables_are_not_cut_in_a_log(old_run: Path) -> None:
    """Written to a pipe or file (not a terminal), the tables are as wide as they need, not 80 columns."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # pytest-xdist workers have it set
    exe = str(Path(sys.executable).parent / "finetune")
    proc = subprocess.run([exe, "eval", str(old_run), "--split", "test"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "support" in proc.stdout and "threshold" in proc.stdout and "…" not in proc.stdout


def test_an_old_run_trained_on_cuda_exports_on_a_cpu_machine(old_run: Path) -> None:
    """Export needs no device: a recipe that says train.device = "cuda" exports where there is none."""
    text = (old_run / "recipe.toml").read_text()
    (old_run / "recipe.toml").write_text(text.replace('device = "auto"', 'device = "cuda"'))
    assert 'device = "cuda"' in (old_run / "recipe.toml").read_text()
    assert export_run(old_run).path.is_file()


@pytest.mark.slow
def test_an_optimizer_of_another_layout_is_one_line_on_resume(tiny_recipe: Path) -> None:
    """A 0.1.0 run with L2-SP on a model without layer groups had two optimizer groups fewer: one clear line."""
    import torch

    from finetune.config import load_recipe
    from finetune.errors import UserError

    run = run_recipe(load_recipe(tiny_recipe, ['model.name="resnet10t"', "optim.l2sp=0.01", "train.epochs=1"]))
    state = torch.load(run / "last.pt", weights_only=True)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:2]
    torch.save(state, run / "last.pt")
    with pytest.raises(UserError, match="optimizer state has 2 parameter groups where this run has 4"):
        run_recipe(RunDir.open(run).resume_recipe(["train.epochs=2"]), resume=run)
