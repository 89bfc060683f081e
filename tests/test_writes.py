"""What a command may write: never a file the user or the run made that it was not asked to replace (issue 35).

One rule (``finetune.io.check_output``): a named output may be new, an earlier output of the same command, or with
``--force`` any regular file; never a link, never one of the run's own files. The run-directory lock is opened
without following links. Class names reach Markdown escaped and CSV cells never start a formula.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest

from finetune import runfiles
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.io import csv_cell, markdown_text
from finetune.rundir import lock
from finetune.runs.run import run_recipe

from .conftest import TINY_RECIPE, assert_user_error, run_cli

SCRIPT = "<script>alert(1)</script>"
FORMULA = "=HYPERLINK(1)"


@pytest.fixture(scope="module")
def hostile_run(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch on a copy of the tiny data whose first two classes are named like an attack."""
    folder = tmp_path_factory.mktemp("writes")
    root = folder / "data"
    shutil.copytree(tiny_coco, root)
    for ann in (root / "annotations").glob("*.json"):
        data = json.loads(ann.read_text())
        data["categories"][0]["name"], data["categories"][1]["name"] = SCRIPT, FORMULA
        ann.write_text(json.dumps(data))
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=root.as_posix(), runs=(folder / "runs").as_posix()))
    return run_recipe(load_recipe(recipe))


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_export_never_replaces_the_runs_files_or_a_users_file(hostile_run: Path, tmp_path: Path) -> None:
    before = _hashes(hostile_run)
    for name in ("report.onnx", "thresholds.onnx"):  # the sidecar would have been report.json / thresholds.json
        proc = run_cli("export", str(hostile_run), "--out", str(hostile_run / name), "--no-card", "--force")
        assert_user_error(proc, f"{hostile_run / name.replace('.onnx', '.json')}", "one of the run's own files")
    assert _hashes(hostile_run) == before
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.json").write_text("the user's own")
    assert_user_error(
        run_cli("export", str(hostile_run), "--out", str(photos / "holiday.onnx")),
        f"{photos / 'holiday.json'}: exists and was not written by this command",
    )
    assert (photos / "holiday.json").read_text() == "the user's own" and not (photos / "holiday.onnx").exists()
    exported = tmp_path / "out" / "model.onnx"
    for _ in range(2):  # an earlier export of its own is replaced without asking
        assert run_cli("export", str(hostile_run), "--out", str(exported)).returncode == 0
    assert json.loads(exported.with_suffix(".json").read_text())["classes"][:2] == [SCRIPT, FORMULA]
    assert run_cli("export", str(hostile_run), "--out", str(photos / "holiday.onnx"), "--force").returncode == 0


def test_card_never_replaces_a_runs_file_or_a_users_file_unasked(hostile_run: Path, tmp_path: Path) -> None:
    before = _hashes(hostile_run)
    for name in ("best.pt", "recipe.toml", "report.json"):
        assert_user_error(run_cli("card", str(hostile_run), "--out", str(hostile_run / name), "--force"), "run's own")
    assert _hashes(hostile_run) == before
    notes = tmp_path / "notes.md"
    notes.write_text("the user's notes")
    assert_user_error(run_cli("card", str(hostile_run), "--out", str(notes)), "pass --force")
    assert notes.read_text() == "the user's notes"
    card = tmp_path / "card.md"
    assert run_cli("card", str(hostile_run), "--out", str(card)).returncode == 0
    assert run_cli("card", str(hostile_run), "--out", str(card)).returncode == 0  # a card replaces its own card
    body = card.read_text().split("---\n", 2)[2]  # the YAML front matter holds the name as data, a quoted string
    assert SCRIPT not in body and markdown_text(SCRIPT) in body
    assert run_cli("card", str(hostile_run), "--out", str(notes), "--force").returncode == 0


def test_report_markdown_and_predict_csv_escape_class_names(hostile_run: Path, tmp_path: Path) -> None:
    report = (hostile_run / "report.md").read_text()
    assert "<script>" not in report and "&lt;script>alert(1)&lt;/script>" in report and markdown_text(SCRIPT) in report
    image = next((hostile_run.parent.parent / "data" / "test").glob("*.jpg"))
    out = tmp_path / "p.csv"
    assert run_cli("predict", str(hostile_run), str(image), "--csv", str(out)).returncode == 0
    header = out.read_text().splitlines()[0].split(",")
    assert header[2:4] == [SCRIPT, f"'{FORMULA}"]
    user_csv = tmp_path / "mine.csv"
    user_csv.write_text("the user's table")
    assert_user_error(run_cli("predict", str(hostile_run), str(image), "--csv", str(user_csv)), "--force")
    assert user_csv.read_text() == "the user's table"


@pytest.mark.parametrize("first", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_cells_that_would_start_a_formula_are_quoted(first: str) -> None:
    assert csv_cell(f"{first}x") == f"'{first}x" and csv_cell("cat") == "cat" and csv_cell("") == ""


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    run, target = tmp_path / "run", tmp_path / "precious.txt"
    run.mkdir()
    target.write_text("the user's file")
    (run / runfiles.LOCK).symlink_to(target)
    with pytest.raises(UserError, match="is a symbolic link"):
        lock.acquire(run, "finetune card")
    assert target.read_text() == "the user's file" and (run / runfiles.LOCK).is_symlink()
    os.mkfifo(run / "fifo")
    (run / runfiles.LOCK).unlink()
    (run / "fifo").rename(run / runfiles.LOCK)
    with pytest.raises(UserError, match="not a regular file"):
        lock.acquire(run, "finetune card")


@pytest.mark.parametrize("since", [1e300, -5.0, math.nan, math.inf])
def test_a_stale_lock_with_a_strange_time_is_taken_over_with_a_note(tmp_path: Path, since: float) -> None:
    stale = {"command": "finetune run", "pid": 2**22 + 7, "host": socket.gethostname(), "since": since}
    (tmp_path / runfiles.LOCK).write_text(json.dumps(stale))
    note = lock.acquire(tmp_path, "finetune calibrate")
    lock.release(tmp_path)
    assert note.startswith(f"took over {tmp_path / runfiles.LOCK}: its holder, finetune run (pid")
    assert "since" not in note


def test_a_command_that_takes_over_a_stale_lock_says_so(hostile_run: Path, tmp_path: Path) -> None:
    stale = {"command": "finetune run", "pid": 2**22 + 7, "host": socket.gethostname(), "since": 0}
    (hostile_run / runfiles.LOCK).write_text(json.dumps(stale))
    proc = run_cli("card", str(hostile_run), "--out", str(tmp_path / "c.md"))
    assert proc.returncode == 0 and "took over" in proc.stderr, proc.stderr


def test_every_command_that_writes_leaves_planted_user_files_alone(hostile_run: Path, tmp_path: Path) -> None:
    """Each command pointed at (or beside) a folder of the user's files: refused, or writing only where it may."""
    mine = tmp_path / "mine"
    mine.mkdir()
    planted = ["model.onnx", "model.json", "model.pt", "README.md", "preds.csv", "compare.md", "notes.txt"]
    for name in planted:
        (mine / name).write_text(f"the user's {name}")
    before = _hashes(mine)
    recipe = hostile_run / "recipe.toml"
    image = str(next((hostile_run.parent.parent / "data" / "test").glob("*.jpg")))
    exists = "exists and was not written by this command"
    refused = [
        (["export", str(hostile_run), "--out", str(mine / "model.onnx")], f"model.onnx: {exists}"),
        (["export", str(hostile_run), "--format", "torchscript", "--out", str(mine / "model.pt")], "model.pt: "),
        (["card", str(hostile_run), "--out", str(mine / "README.md")], f"README.md: {exists}"),
        (["predict", str(hostile_run), image, "--csv", str(mine / "preds.csv")], f"preds.csv: {exists}"),
        (["data", "demo", str(mine)], "is not empty"),
        (["compare", str(recipe), "--out", str(mine), "--seeds", "0"], "holds files this command did not write"),
        (["run", str(recipe), "--set", f'output.dir="{mine}"', "--set", 'output.name="notes.txt"'], "notes.txt"),
    ]
    for argv, needle in refused:
        assert_user_error(run_cli(*argv), needle)
    writers = [  # they write in the run directory (or the cache) only
        ["predict", str(hostile_run), image, "--json"],
        ["calibrate", str(hostile_run)],
        ["eval", str(hostile_run)],
        ["report", str(hostile_run), "--no-cams"],
        ["data", "stats", str(recipe)],
    ]
    for argv in writers:
        proc = run_cli(*argv, cwd=mine, env={"FINETUNE_CACHE_DIR": str(tmp_path / "cache")})
        assert proc.returncode == 0, (argv, proc.stderr[-800:])
    assert _hashes(mine) == before


@pytest.mark.parametrize(
    "extra",
    [pytest.param(name, marks=pytest.mark.extra(name)) for name in ("litert", "openvino", "inspect", "sweep")],
)
def test_the_extras_commands_leave_planted_user_files_alone(hostile_run: Path, tmp_path: Path, extra: str) -> None:
    """The commands of the optional extras, as above: LiteRT and OpenVINO exports, inspect, sweep."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("model.tflite", "model.xml", "model.json", "label_issues.csv", "sweep.json", "best.toml"):
        (mine / name).write_text(f"the user's {name}")
    before = _hashes(mine)
    exists = "exists and was not written by this command"
    if extra in ("litert", "openvino"):
        out = mine / ("model.tflite" if extra == "litert" else "model.xml")
        assert_user_error(run_cli("export", str(hostile_run), "--format", extra, "--out", str(out)), exists)
    elif extra == "sweep":
        (tmp_path / "space.toml").write_text('["optim.lr"]\nlow = 1e-4\nhigh = 1e-3\n')
        argv = ["sweep", str(hostile_run / "recipe.toml"), "--space", str(tmp_path / "space.toml"), "--out", str(mine)]
        assert_user_error(run_cli(*argv), "holds files this command did not write")
    else:  # inspect writes label_issues.csv and report.html in the run directory, whatever the working folder
        proc = run_cli("inspect", str(hostile_run), "--no-cams", cwd=mine)
        assert proc.returncode == 0, proc.stderr[-800:]
        assert (hostile_run / "label_issues.csv").is_file()
    assert _hashes(mine) == before
