"""``finetune sweep``: trials on the selection half only, a best recipe ``finetune validate`` takes, bad spaces."""

import json
from pathlib import Path

import pytest

from .conftest import assert_user_error, run_cli

SPACE = """
["optim.lr"]
low = 1e-4
high = 3e-3
log = true

["train.epochs"]
low = 1
high = 2
"""


@pytest.mark.slow
@pytest.mark.extra("sweep")
def test_a_three_trial_sweep_writes_a_best_recipe_and_never_scores_on_what_it_saw(
    tiny_recipe: Path, tmp_path: Path
) -> None:
    (tmp_path / "space.toml").write_text(SPACE)
    out = tmp_path / "sweep"
    args = ["sweep", str(tiny_recipe), "--space", str(tmp_path / "space.toml"), "--trials", "3", "--out", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "sweep.json").read_text())
    assert len(doc["trials"]) == 3 and all(t["state"] in ("COMPLETE", "PRUNED") for t in doc["trials"])
    assert {t["params"]["train.epochs"] for t in doc["trials"]} <= {1, 2}
    scoring = set(doc["compare"]["draws"]["0"]["scoring"])
    selection = set(doc["compare"]["draws"]["0"]["selection"])
    assert scoring and not scoring & selection
    for t in doc["trials"]:  # every image a trial read: train and the selection half, never the scoring half
        assert t["images_seen"] and not set(t["images_seen"]) & scoring and selection <= set(t["images_seen"])
    assert run_cli("validate", str(out / "best.toml")).returncode == 0
    assert [r["label"] for r in doc["compare"]["rows"]] == ["tiny", "best"]
    assert "best - tiny" in proc.stdout
    again = run_cli(*args)  # a finished study is read back: nothing trains again
    assert again.returncode == 0 and "trials to run" not in again.stderr


def test_a_bad_sweep_space_is_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    cases = [
        ('["optim.nope"]\nlow = 1\nhigh = 2\n', "optim.nope = 1: the recipe refuses it"),
        ('["optim.lr"]\nlow = 1e-4\n', "optim.lr: give choices = [...] or low and high"),
        ('["optim.lr"]\nchoices = [0.1]\nlogg = true\n', "unknown field 'logg'"),
        ("", "no parameters"),
        ('["data.holdout.seed"]\nchoices = [1, 2]\n', "fixed by the sweep"),
        ('["train.epochs"]\nlow = 1\nhigh = -1\n', "train.epochs = -1: the recipe refuses it"),
        ('["freeze.solver_c"]\nchoices = [[0.1], [1.0]]\n', "choices must be a non-empty list"),
    ]
    for body, needle in cases:
        (tmp_path / "space.toml").write_text(body)
        args = ["sweep", str(tiny_recipe), "--space", str(tmp_path / "space.toml"), "--out", str(tmp_path / "s")]
        assert_user_error(run_cli(*args), needle)
    assert_user_error(run_cli("sweep", str(tiny_recipe), "--space", str(tmp_path / "none.toml")), "no such sweep")
    (tmp_path / "space.toml").write_text('["optim.lr"]\nlow = 1e-4\nhigh = 1e-3\n')
    args = ["sweep", str(tiny_recipe), "--space", str(tmp_path / "space.toml"), "--set", 'train.select="loss"']
    assert_user_error(run_cli(*args), 'set train.select to "map"')
