"""Issue 24: runs that survive the real world (locks, killed workers, the epoch-1 dead end, DDP faults)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import io as ckpt
from finetune import runfiles
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.rundir import lock
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe
from finetune.train import fit as trainer

from .conftest import run_cli


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_and_a_foreign_one_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = {"command": "finetune run", "pid": _dead_pid(), "host": socket.gethostname(), "since": 0}
    (run / runfiles.LOCK).write_text(json.dumps(stale))  # what a SIGKILLed run leaves: the file, no lock held
    note = lock.acquire(run, "finetune run")
    assert note.startswith(f"took over {run / runfiles.LOCK}: its holder, finetune run (pid {stale['pid']} on ")
    assert json.loads((run / runfiles.LOCK).read_text())["pid"] == os.getpid()
    assert lock.acquire(run, "finetune report") == ""  # the same process nests (calibrate -> report)
    lock.release(run)
    assert (run / runfiles.LOCK).is_file()  # still held: the outer hold
    lock.release(run)
    assert not (run / runfiles.LOCK).exists()  # released: a finished run holds no .lock
    (run / runfiles.LOCK).write_text(json.dumps({**stale, "host": "elsewhere"}))
    with pytest.raises(UserError, match=r"locked by finetune run \(pid .* on elsewhere.* on another host; if that"):
        lock.acquire(run, "finetune run")


def test_a_held_lock_refuses_a_second_process_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = (
        "import sys; from finetune.rundir import lock; lock.acquire(sys.argv[1], 'finetune run'); print(1, flush=1)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script + "; sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
        with pytest.raises(UserError) as err:
            lock.acquire(run, "finetune calibrate")
        line = str(err.value)
        assert line.startswith(f"{run} is in use by finetune run (pid {holder.pid} on {socket.gethostname()}, since ")
        assert line.endswith("; wait for it to end, or stop it first") and "\n" not in line
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire(run, "finetune calibrate").startswith("took over")  # killed: its lock went with it
    lock.release(run)


# 7. The epoch-1 dead end: killed after best.pt and before last.pt.
def test_a_run_killed_between_best_and_last_in_epoch_1_can_be_rerun_and_resumed(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ckpt.save_checkpoint

    def killed_before_last(path: Path, state: dict) -> None:
        if path.name == "last.pt":
            raise KeyboardInterrupt
        real(path, state)

    monkeypatch.setattr(trainer, "save_checkpoint", killed_before_last)
    with pytest.raises(UserError, match="interrupted; continue with"):
        run_recipe(load_recipe(tiny_recipe))
    run = tiny_recipe.parent / "runs" / "tiny"
    assert (run / "best.pt").is_file() and not (run / "last.pt").exists() and not (run / runfiles.LOCK).exists()
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    assert run_cli("run", "--resume", str(run)).returncode == 0  # was: "holds more than a run stopped in epoch 1"
    (run / "last.pt").unlink()
    for name in ("report.json", "report.md", "thresholds.json", "thresholds.run.json"):
        (run / name).unlink(missing_ok=True)
    for extra in [p for p in run.iterdir() if p.suffix in (".png", ".json") and p.name != "classes.json"]:
        extra.unlink()
    done = run_cli("run", str(tiny_recipe))  # and rerunning the recipe starts it again
    assert done.returncode == 0, done.stderr[-2000:]


WORKER_KILLED = """
import os, pathlib, sys, time
from finetune.data import dataset
mark = pathlib.Path(sys.argv[1])
real = dataset.ImageDataset.__getitem__
def slow(self, index):
    if self.epoch == 1 and self.seed >= 0 and len(self) > 20:  # a training worker in epoch 2: say who, then wait
        mark.write_text(str(os.getpid()))
        time.sleep(120)
    return real(self, index)
dataset.ImageDataset.__getitem__ = slow
from finetune.cli.app import main
sys.argv = ["finetune", "run", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
def test_a_killed_worker_is_one_line_and_the_run_resumes(tiny_recipe: Path, tmp_path: Path) -> None:
    sets = ["train.epochs=2", "data.num_workers=1", "data.persistent_workers=false"]
    mark = tmp_path / "worker-pid"
    cmd = [sys.executable, "-c", WORKER_KILLED, str(mark), str(tiny_recipe), *(a for s in sets for a in ("--set", s))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not mark.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert mark.exists(), proc.communicate()[1][-2000:]
    time.sleep(0.2)
    os.kill(int(mark.read_text()), signal.SIGKILL)  # what the OOM killer does
    _, err = proc.communicate(timeout=120)
    run = tmp_path / "runs" / "tiny"
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert last.startswith("error: DataLoader worker (pid") and "out-of-memory killer" in last, last
    assert last.endswith(f"data.prefetch, then continue with `finetune run --resume {run}`"), last
    assert RunDir.open(run).checkpoint("last")["train_state"]["epoch"] == 1
    resumed = run_cli("run", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(run / "last.pt", weights_only=True)["train_state"]["epoch"] == 2


class _StopAtStep(trainer.Hook):
    """Ctrl-C right after optimizer step ``step`` (before that step's own mid-epoch checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, loop: trainer.Loop) -> None:  # noqa: D102
        if loop.state.step == self.step:
            raise KeyboardInterrupt


MID_EPOCH = ["train.epochs=3", "train.checkpoint_every=1", "data.augment.mixup=0.4", "train.ema=0.9"]


@pytest.mark.slow
def test_checkpoint_every_resumes_mid_epoch_bitwise_with_mixup_ema_and_dropout(tiny_recipe: Path) -> None:
    sets = [*MID_EPOCH, "model.drop_rate=0.3"]  # dropout: the RNG must be the checkpoint moment's
    straight = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=straight"]))
    assert not list((straight / "steps").glob("*.pt"))  # superseded by each epoch's last.pt
    with pytest.raises(UserError, match="interrupted"):
        run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=cut"]), hooks=[_StopAtStep(5)])
    cut = tiny_recipe.parent / "runs" / "cut"
    kept = sorted(p.name for p in (cut / "steps").glob("*.pt"))
    assert kept == ["step-00000004.pt"]  # epoch 2's first batch; epoch 1's were cleared by its last.pt
    assert RunDir(cut).resume_point() == cut / "steps" / "step-00000004.pt"
    done = run_cli("run", "--resume", str(cut))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after epoch 1 (step 4, batch 1 of epoch 2)" in " ".join(done.stderr.split())
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight, cut))
    for part in ("model", "eval_model"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, cut)]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]  # epoch 2's mean is whole


# 9. COCO annotations: every malformed file and every silent duplicate is one line naming the file.
def _doc() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }


def _edit(change: str) -> object:
    doc = _doc()
    if change == "top-level list":
        return [doc]
    if change == "annotations null":
        return {**doc, "annotations": None}
    if change == "images a dict":
        return {**doc, "images": {"1": doc["images"][0]}}
    if change == "duplicate image id":
        doc["images"][1]["id"] = 1
    elif change == "duplicate file_name":
        doc["images"][1]["file_name"] = "a.jpg"
    elif change == "duplicate category name":
        doc["categories"][1]["name"] = "cat"
    elif change == "string image id":
        doc["images"][0]["id"] = "1"
    elif change == "no file_name":
        del doc["images"][0]["file_name"]
    elif change == "category without name":
        del doc["categories"][0]["name"]
    elif change == "string bbox":
        doc["annotations"][0]["bbox"] = "0 0 4 4"
    elif change == "annotation without id":
        del doc["annotations"][0]["id"]
    elif change == "unknown category_id":
        doc["annotations"][0]["category_id"] = 7
    return doc


COCO_CASES = {
    "top-level list": "the top level is a list, not an object",
    "annotations null": "'annotations' is null, not a list",
    "images a dict": "'images' is dict, not a list",
    "duplicate image id": "images: id 1 appears more than once",
    "duplicate file_name": "images: file_name 'a.jpg' appears more than once",
    "duplicate category name": "categories: name 'cat' appears more than once",
    "string image id": "images[0]: 'id' is '1', not an integer",
    "no file_name": "images[0] has no 'file_name'",
    "category without name": "categories[0] has no 'name'",
    "string bbox": "annotations[0]: 'bbox' is '0 0 4 4', not [x, y, width, height]",
    "unknown category_id": "annotation 1 has category_id 7 not in 'categories'",
    "annotation without id": "annotations[0] has no 'id'",
}


@pytest.mark.parametrize("change", sorted(COCO_CASES))
def test_a_malformed_or_ambiguous_coco_file_is_one_line_naming_it(change: str, tmp_path: Path) -> None:
    from finetune.data.coco import read_coco_split

    (tmp_path / "annotations").mkdir()
    ann = tmp_path / "annotations" / "instances_train.json"
    ann.write_text(json.dumps(_edit(change)))
    with pytest.raises(UserError) as err:
        read_coco_split(tmp_path, "train")
    assert str(err.value).startswith(f"{ann}: ") and COCO_CASES[change] in str(err.value), str(err.value)


def test_a_coco_file_without_bboxes_reads_unless_min_box_area_needs_them(tmp_path: Path) -> None:
    from finetune.data.coco import read_coco_split

    (tmp_path / "annotations").mkdir()
    doc = _doc()
    del doc["annotations"][0]["bbox"]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    assert read_coco_split(tmp_path, "train").targets.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    with pytest.raises(UserError, match="annotation 1 has no 'bbox'; data.min_box_area needs one"):
        read_coco_split(tmp_path, "train", min_box_area=4.0)


# 10-12. Exported metadata, the Python API and tool-written files: a tampered file is a user error, never a
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
    import shutil

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
    import numpy as np
    from PIL import Image

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


# 8. Nothing of the user's is overwritten.
def test_data_demo_and_predict_csv_never_overwrite_a_users_files(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "annotations").mkdir(parents=True)
    (mine / "annotations" / "instances_train.json").write_text("the user's own")
    proc = run_cli("data", "demo", str(mine), "--train", "4", "--val", "2", "--test", "2", "--source", "0")
    assert proc.returncode == 2 and f"{mine}: is not empty (it holds annotations)" in proc.stderr
    assert (mine / "annotations" / "instances_train.json").read_text() == "the user's own"
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"the user's photo")
    proc = run_cli("predict", str(tmp_path / "no-run"), str(image), "--csv", str(image))
    assert proc.returncode == 2 and "names an image" in proc.stderr and image.read_bytes() == b"the user's photo"


# 14. Smaller ones.
def test_a_symlink_loop_predicts_each_file_once(tmp_path: Path) -> None:
    from finetune.deploy.predictor import expand_paths

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(b"")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")
    files, _ = expand_paths([f"{tmp_path}/d/**/*.jpg", str(tmp_path / "d" / "x.jpg")])
    assert files == [tmp_path / "d" / "x.jpg"]  # was: the same file 41 times


def test_a_recipe_with_a_utf8_bom_reads(tiny_recipe: Path) -> None:
    tiny_recipe.write_bytes(b"\xef\xbb\xbf" + tiny_recipe.read_bytes())  # what Windows Notepad writes
    assert load_recipe(tiny_recipe).train.epochs == 1  # was: "Invalid statement (at line 1, column 1)"


def test_under_torchrun_only_rank_0_prints_a_user_error(tmp_path: Path) -> None:
    said = run_cli("run", str(tmp_path / "missing.toml"), env={"RANK": "1"})
    assert said.returncode == 2 and said.stderr == ""
    said = run_cli("run", str(tmp_path / "missing.toml"), env={"RANK": "0"})
    assert said.returncode == 2 and "missing.toml: recipe file not found" in said.stderr


# 15. Misleading messages.
def test_os_errors_name_the_real_file_and_only_run_says_resume(tmp_path: Path) -> None:
    import errno

    from finetune.errors import os_error_line

    full = OSError(errno.ENOSPC, "No space left", str(tmp_path / ".model.onnx.ab12cd.tmp"))
    assert os_error_line(full, "export") == (
        f"{tmp_path / 'model.onnx'}: no space left on the device; free space or write to another folder"
    )
    assert os_error_line(full, "run").endswith("free space or choose another output.dir, then --resume")


def test_a_file_that_cannot_be_read_is_not_blamed_on_a_folder_that_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from finetune.errors import os_error_line

    ann = tmp_path / "instances_train.json"
    ann.write_text("{}")
    ann.chmod(0)
    if os.geteuid() == 0:  # root reads anything; os.access then answers as it would for an ordinary user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(ann) else real(p, mode, **kw))
    denied = PermissionError(errno.EACCES, "Permission denied", str(ann))
    assert os_error_line(denied, "run") == (
        f"{ann}: permission denied reading it; fix its permissions (chmod u+r) or use a copy you can read"
    )
    folder = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs" / "tiny"))
    assert os_error_line(folder, "run").endswith("choose a folder you can write (output.dir) or fix its permissions")


def test_an_elastic_restart_resumes_only_a_run_its_own_job_made(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune.runs.run import elastic_resume

    recipe = load_recipe(tiny_recipe)
    run = Path(recipe.output.dir) / recipe.output.name
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert elastic_resume(recipe, None) is None  # the first attempt never resumes by itself
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic_resume(recipe, None) is None  # an older run of the same name: attempt 0 refused it; so do we
    (run / runfiles.TORCHRUN_ID).write_text("job-1\n")
    assert elastic_resume(recipe, None) is None
    (run / runfiles.TORCHRUN_ID).write_text("job-2\n")
    assert elastic_resume(recipe, None) == run
    assert elastic_resume(recipe, run) is None  # an explicit --resume is not an elastic one


# 13. Out of memory.
def test_out_of_memory_is_one_line(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def allocate(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 TB")

    monkeypatch.setattr(trainer, "train_one_epoch", allocate)
    with pytest.raises(UserError, match=r"^out of memory \(.*can't allocate memory.*\): lower data.batch_size or"):
        run_recipe(load_recipe(tiny_recipe))
    for size, needle in (("1x32x32", "C must be 3"), ("3x100000x100000", "at most 4096 pixels a side")):
        said = run_cli("summary", "--model", "mobilenetv2_035", "--input-size", size)
        assert said.returncode == 2 and needle in said.stderr and "Traceback" not in said.stderr, said.stderr


class _NaNWeights(trainer.Hook):
    def on_fit_start(self, loop: trainer.Loop) -> None:  # noqa: D102 - as a broken model.checkpoint would start
        with torch.no_grad():
            next(loop.model.parameters()).fill_(float("nan"))


def test_nan_starting_weights_are_blamed_on_the_weights_not_the_lr(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match=r"^the starting weights hold NaN or inf \(.*\): model.checkpoint"):
        run_recipe(load_recipe(tiny_recipe), hooks=[_NaNWeights()])


def test_a_corrupt_stats_cache_is_computed_again(tiny_recipe: Path) -> None:
    from finetune.assembly import build_run
    from finetune.data.stats import cache_path

    assert run_cli("data", "stats", str(tiny_recipe)).returncode == 0
    split = build_run(load_recipe(tiny_recipe), roles=("train",)).splits["train"]
    cache = cache_path(split, "coco", load_recipe(tiny_recipe).data.image_size)
    assert cache.is_file()
    cache.write_text('{"mean": [0.5')  # torn
    again = run_cli("data", "stats", str(tiny_recipe))
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert json.loads(cache.read_text())["mean"]


def test_lr_find_is_reproducible(tiny_recipe: Path, tmp_path: Path) -> None:
    said = [run_cli("lr-find", str(tiny_recipe), "--steps", "12", "--png", str(tmp_path / f"{i}.png")) for i in (0, 1)]
    assert all(s.returncode == 0 for s in said), said[0].stderr[-2000:]
    first, second = (s.stdout.split("suggested peak lr ")[1].split()[0] for s in said)
    assert first == second  # was: 1.0e-7, 1.2e-7, 1.6e-7, 1.5e-3 on four identical runs


@pytest.mark.slow
def test_settings_that_would_do_nothing_are_refused(shipped: Path, tiny_recipe: Path, folder_data: Path) -> None:
    said = run_cli("calibrate", str(shipped), "--set", "optim.lr=3")  # was: accepted, and nothing changed
    assert said.returncode == 2 and "--set optim.lr: calibrate changes only calibrate.*" in said.stderr, said.stderr
    single = ['data.format="folder"', 'loss.name="ce"', "data.image_size=24", f'data.root="{folder_data.as_posix()}"']
    run = run_recipe(load_recipe(tiny_recipe, [*single, "output.name=single"]))
    said = run_cli("eval", str(run), "--threshold", "0.3")  # was: accepted, and no threshold was applied
    assert said.returncode == 2 and "--threshold: a single-label run predicts its top class" in said.stderr


def test_model_arch_on_a_timm_model_is_refused(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match=r"model.arch: only mobilenetv2_standard and mobilenetv2_reduced read it"):
        load_recipe(tiny_recipe, ["model.arch.width=0.5"])  # was: accepted; mobilenetv2_035 kept its width
    own = load_recipe(tiny_recipe, ['model.name="mobilenetv2_reduced"', "model.arch.width=0.5"])
    assert own.model.arch.width == 0.5


def test_validate_estimates_the_training_memory_and_warns_past_the_machine(tiny_recipe: Path) -> None:
    said = run_cli("validate", str(tiny_recipe))
    assert said.returncode == 0 and "GiB to train" in said.stdout and "run out of memory" not in said.stderr
    said = run_cli("validate", str(tiny_recipe), "--set", "data.batch_size=100000")  # was: valid, without a word
    assert "will run out of memory; lower data.batch_size or data.image_size" in " ".join(said.stderr.split())


@pytest.mark.slow
def test_eval_refuses_data_whose_categories_are_not_the_runs(shipped: Path, tmp_path: Path) -> None:
    import shutil

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
