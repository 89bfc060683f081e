"""The real ``finetune`` command, end to end, in subprocesses."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from .conftest import assert_user_error, run_cli


@pytest.mark.slow
def test_run_resume_eval_predict(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    proc = run_cli("run", str(tiny_recipe), real=True)  # the installed console script, end to end
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    names = {p.name for p in run_dir.iterdir()}
    assert names >= {
        "recipe.toml",
        "classes.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "report.json",
        "report.md",
        "thresholds.json",
        "pr_curves.png",
        "f1_per_class.png",
    }
    assert not any(n.endswith(".tmp") for n in names)
    classes = json.loads((run_dir / "classes.json").read_text())
    assert [c["id"] for c in classes][:4] == [1, 2, 3, 5] and classes[3]["name"] == "star"
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1] and 0 <= lines[0]["val_map"] <= 1
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["splits"]) == {"val", "test"} and report["splits"]["test"]["images"] == 12
    assert "mAP" in proc.stdout and "test" in proc.stdout

    # Running the same recipe again must not touch the finished run.
    before = (run_dir / "last.pt").read_bytes()
    assert_user_error(run_cli("run", str(tiny_recipe)), "already holds a run", "--resume")
    assert (run_dir / "last.pt").read_bytes() == before

    # Resume with more epochs: continues at epoch 2, not from scratch.
    proc = run_cli("run", "--resume", str(run_dir), "--set", "train.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after epoch 1" in proc.stderr
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2] and lines[1]["step"] == 2 * lines[0]["step"]
    state = torch.load(run_dir / "last.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 2
    assert "epochs = 2" in (run_dir / "recipe.toml").read_text()

    proc = run_cli("eval", str(run_dir), "--split", "test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((run_dir / "eval_test.json").read_text())
    assert ev["splits"]["test"]["images"] == 12 and ev["thresholds"].startswith("calibrated on val")
    saved = json.loads((run_dir / "thresholds.json").read_text())
    assert [r["threshold"] for r in saved["classes"]] == [r["threshold_cal"] for r in ev["splits"]["test"]["per_class"]]

    proc = run_cli("calibrate", str(run_dir), "--split", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "thresholds.prev.json").read_text()) == saved  # the old thresholds are kept
    assert json.loads((run_dir / "thresholds.json").read_text())["split"] == "train"
    assert "fitted on train" in proc.stdout
    assert_user_error(run_cli("calibrate", str(run_dir), "--split", "test"), "--split 'test'")

    image = next((tiny_coco / "test").glob("*.jpg"))
    proc = run_cli("predict", str(run_dir), str(image), "--json", "--threshold", "0.3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout)
    assert len(result["probabilities"]) == 10 and result["thresholds"] == "fixed 0.3"
    assert all(result["probabilities"][name] >= 0.3 for name in result["labels"])
    proc = run_cli("predict", str(run_dir), str(tmp_path / "no.jpg"), str(image))  # a missing file is skipped
    assert proc.returncode == 0 and "no.jpg: no such file" in proc.stderr
    assert "1 images predicted, 1 skipped" in proc.stderr


@pytest.mark.slow
def test_validate_prints_a_plan(tiny_recipe: Path) -> None:
    proc = run_cli("validate", str(tiny_recipe), "--check-images")
    assert proc.returncode == 0, proc.stderr
    for needle in ("mobilenetv2_035", "10 classes", "24 images", "12 images", "steps"):
        assert needle in proc.stdout


@pytest.mark.slow
def test_recipe_errors_are_one_line(tiny_recipe: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_recipe.read_text().replace("[train]", "[train]\nepochz = 3"))
    assert_user_error(run_cli("validate", str(bad), real=True), "bad.toml", "train.epochz: unknown key")
    assert_user_error(run_cli("run", str(tiny_recipe), "--set", "train.epochs=two"), "train.epochs", "integer")
    assert_user_error(
        run_cli("validate", str(tiny_recipe), "--set", f"data.root={tmp_path}"),
        "instances_train.json: annotation file not found",
    )
    assert_user_error(run_cli("run", str(tmp_path / "nope.toml")), "nope.toml: recipe file not found")


@pytest.mark.slow
def test_missing_and_corrupt_images(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_coco, root)
    victim = sorted((root / "val").glob("*.jpg"))[0]
    victim.unlink()
    assert_user_error(run_cli("validate", str(tiny_recipe), "--set", f"data.root={root}"), victim.name, "not found")

    victim.write_bytes(b"\xff\xd8\xff\xe0 truncated nonsense")  # a corrupt JPEG
    args = ("--set", f"data.root={root}")
    assert_user_error(run_cli("validate", str(tiny_recipe), *args, "--check-images"), victim.name, "cannot decode")
    proc = run_cli("run", str(tiny_recipe), *args, "--set", "data.on_bad_image=error")
    assert_user_error(proc, victim.name, "cannot decode", 'data.on_bad_image = "skip"')

    proc = run_cli("run", str(tiny_recipe), *args, "--set", "output.name=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = json.loads((tmp_path / "runs" / "skip" / "bad_images.json").read_text())
    assert len(bad) == 1 and victim.name in bad[0]
    assert json.loads((tmp_path / "runs" / "skip" / "report.json").read_text())["splits"]["val"]["images"] == 11


@pytest.mark.slow
def test_groups_prints_each_group_per_stage(tiny_recipe: Path) -> None:
    stages = 'freeze.stages=[{epochs = 1, train = ["classifier"]}, {train = ["blocks.5:", "head", "classifier"]}]'
    proc = run_cli(
        "groups", str(tiny_recipe), "--set", "train.epochs=3", "--set", stages, "--set", "optim.lr_mult={stem=0.1}"
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]]
        for ln in proc.stdout.splitlines()
        if ln.startswith("│")
    }
    assert list(rows)[:2] == ["stem", "blocks.0"] and list(rows)[-2:] == ["head", "classifier"]
    assert rows["stem"][1:] == ["frozen", "frozen"]
    assert rows["blocks.5"][1:] == ["frozen", "0.001"]
    assert rows["classifier"][1:] == ["0.001", "0.001"]
    assert int(rows["classifier"][0].replace(",", "")) == 1280 * 10 + 10  # mobilenetv2_035 head: 1280 features
    assert_user_error(run_cli("groups", str(tiny_recipe), "--set", 'model.name="resnet18"'), "resnet18", "layer groups")


def test_groups_shows_the_probe_stage_and_each_stages_own_lr(tiny_recipe: Path) -> None:
    """LP-FT: a probe, a stage with its own lr, one with its own layer_decay; numbered as lr-find counts them."""
    from typer.testing import CliRunner

    from finetune.cli.app import app

    stages = (
        'freeze.stages=[{train = ["classifier"], solver = "lbfgs"}, '
        '{epochs = 1, train = ["blocks.5:", "head", "classifier"], lr = 3e-3}, '
        '{train = ["all"], lr = 2e-3, layer_decay = 0.5}]'
    )
    args = ["groups", str(tiny_recipe), "--set", "train.epochs=3", "--set", stages]
    result = CliRunner().invoke(app, args, catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rows = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[3:-1]] for ln in lines if ln.startswith("│")}
    names = [n for n in rows if n]
    assert "stage 1" in result.stdout and "probe (lbfgs)" in result.stdout and "epochs 2-3" in result.stdout
    assert rows["classifier"] == ["solved", "0.003", "0.002"]
    assert rows["head"] == ["frozen", "0.003", "0.001"]
    assert rows["blocks.4"] == ["frozen", "frozen", f"{2e-3 * 0.5 ** (len(names) - 1 - names.index('blocks.4')):.3g}"]
    assert rows["stem"][:2] == ["frozen", "frozen"]
    lr_find = CliRunner().invoke(
        app, ["lr-find", str(tiny_recipe), "--stage", "1", "--set", "train.epochs=3", "--set", stages]
    )
    assert lr_find.exit_code == 1 and "a solver stage is solved, not trained" in str(lr_find.exception)


@pytest.mark.slow
def test_demo_recipes_chain_pretrain_into_staged_fine_tune(tiny_coco: Path, tmp_path: Path) -> None:
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    small = []
    for item in (
        f'data.root="{tiny_coco.as_posix()}"',
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        f'output.dir="{(tmp_path / "runs").as_posix()}"',
    ):
        small += ["--set", item]
    pre = run_cli(
        "run", str(recipes / "demo_pretrain.toml"), *small, "--set", 'data.train="train"', "--set", "train.epochs=1"
    )
    assert pre.returncode == 0, pre.stderr[-3000:]
    pre_dir = (tmp_path / "runs" / "demo_pretrain").as_posix()
    proc = run_cli(
        "run",
        str(recipes / "quickstart.toml"),
        *small,
        "--set",
        f'model.checkpoint="{pre_dir}"',
        "--set",
        "train.epochs=4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "loaded 314 tensors from" in proc.stderr
        and "missing" not in proc.stderr
        and "demo_pretrain/best.pt" in proc.stderr
    )
    for needle in (
        "stage 1/3 (epochs 1-1): training classifier",
        "stage 2/3 (epochs 2-3): training blocks.4-6, head",
        "stage 3/3 (epochs 4-4): training all groups",
        "cached 24 feature vectors",
    ):
        assert needle in proc.stderr, needle
    lines = [json.loads(ln) for ln in (tmp_path / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in lines] == [1, 2, 2, 3] and lines[0]["cached_features"]


@pytest.mark.slow
def test_every_recipe_validates_on_tiny_generated_data(tiny_coco: Path) -> None:
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    coco = [p for p in sorted(recipes.glob("*.toml")) if 'format = "' not in p.read_text()]
    assert {p.name for p in coco} >= {"quickstart.toml", "demo_pretrain.toml", "coco_multilabel_focal.toml"}
    for path in coco:
        sets = [f'data.root="{tiny_coco.as_posix()}"', 'data.train="train"', 'model.checkpoint=""']
        sets += ["model.pretrained=false"]
        if 'source = "train"' not in path.read_text():  # a recipe that holds its val out of train keeps doing so
            sets.append('data.val="val"')
        proc = run_cli("validate", str(path), *[a for s in sets for a in ("--set", s)])
        assert proc.returncode == 0, (path.name, proc.stderr)
        assert "valid" in proc.stdout and "10 classes" in proc.stdout, path.name


def test_lr_find_help_shows_the_table_name_literally() -> None:
    from typer.testing import CliRunner

    from finetune.cli.app import app

    result = CliRunner().invoke(app, ["lr-find", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "[[freeze.stages]] entry to sweep" in result.stdout
