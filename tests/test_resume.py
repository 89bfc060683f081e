"""Runs that were stopped, killed or signalled: rerun or resumed exactly, never lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import io as ckpt
from finetune import runfiles
from finetune.cli import app as cli
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe
from finetune.train import fit as trainer

from .conftest import run_cli
from .helpers import StopAtStep

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


MID_EPOCH = ["train.epochs=3", "train.checkpoint_every=1", "data.augment.mixup=0.4", "train.ema=0.9"]


SLOW_EPOCH_2 = """
import pathlib, sys, time
from finetune.train import fit as trainer
mark = pathlib.Path(sys.argv[1])
real = trainer.train_one_epoch
def slow(*args, **kwargs):
    if args[0].state.epoch == 1:  # in epoch 2: say so, then wait for the signal
        mark.write_text("epoch 2")
        time.sleep(120)
    return real(*args, **kwargs)
trainer.train_one_epoch = slow
from finetune.cli.app import main
sys.argv = ["finetune", "run", *sys.argv[2:]]
main()
"""


# A run stopped before its first checkpoint can be rerun, or resumed.
def test_a_run_stopped_in_epoch_1_can_be_rerun_or_resumed(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer.train_one_epoch

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt)
    for _ in range(2):  # the second rerun finds the first one's leftovers
        with pytest.raises(UserError, match="interrupted"):
            run_recipe(load_recipe(tiny_recipe))
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "recipe.toml").is_file() and not (run_dir / "last.pt").exists()
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    run_recipe(RunDir.open(run_dir).resume_recipe(), resume=run_dir)  # was: "no last.pt to resume from"
    assert (run_dir / "report.json").is_file()
    with pytest.raises(UserError, match="already holds a run"):  # a run with a checkpoint is still never rerun
        run_recipe(load_recipe(tiny_recipe))


# metrics.jsonl: a kill between the log line and the checkpoint, and a partial last line.
@pytest.mark.slow
def test_metrics_survive_a_kill_between_log_and_checkpoint(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer.checkpoint_state

    def killed(loop, hooks=()):
        if loop.state.epoch == 2:
            raise KeyboardInterrupt  # epoch 2 is logged, but its last.pt is never written
        return real(loop, hooks)

    monkeypatch.setattr(trainer, "checkpoint_state", killed)
    with pytest.raises(UserError, match="interrupted"):
        run_recipe(load_recipe(tiny_recipe, ["train.epochs=3"]))
    monkeypatch.setattr(trainer, "checkpoint_state", real)
    run_dir = tmp_path / "runs" / "tiny"
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "val_lo')  # and a kill in the middle of a line
    (run_dir / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    run_recipe(RunDir.open(run_dir).resume_recipe(), resume=run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


# --resume --set, and eval --threshold.
@pytest.mark.slow
def test_resume_refuses_settings_that_change_the_run(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = run_recipe(load_recipe(tiny_recipe, ["train.epochs=2"]))
    before = (run_dir / "recipe.toml").read_text()
    for bad in ("optim.lr=0.1", "data.batch_size=4", "model.name='mobilenetv2_050'"):
        with pytest.raises(UserError, match=rf"--set {bad.split('=')[0]}: cannot change on --resume"):
            RunDir.open(run_dir).resume_recipe([bad])
    with pytest.raises(UserError, match="train.epochs = 1: .* has already trained 2 epochs"):
        run_recipe(RunDir.open(run_dir).resume_recipe(["train.epochs=1"]), resume=run_dir)
    assert (run_dir / "recipe.toml").read_text() == before
    with pytest.raises(UserError, match="--threshold 1.5: a probability threshold is between 0 and 1"):
        cli.evaluate(run_dir, "test", 1.5)


@pytest.mark.slow
def test_sigterm_resumes_exactly_and_a_second_run_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    import signal

    sets = ["train.epochs=3"]
    straight = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=straight"]))
    mark = tmp_path / "in-epoch-2"
    args = [str(tiny_recipe), *(a for s in [*sets, "output.name=cut"] for a in ("--set", s))]
    cmd = [sys.executable, "-c", SLOW_EPOCH_2, str(mark), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not mark.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert mark.exists(), proc.communicate()[1][-2000:]
    cut = tmp_path / "runs" / "cut"
    # While it trains, a second run into its directory (another seed) and a command that writes there are
    # refused in one line naming the holder; nothing of the first run's is touched.
    before = {p.name: p.stat().st_mtime_ns for p in cut.iterdir()}
    for other in (["run", str(tiny_recipe), *args[1:], "--set", "train.seed=1"], ["eval", str(cut)]):
        second = run_cli(*other)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"{cut} is in use by finetune run (pid {proc.pid} on " in " ".join(second.stderr.split())
    assert {p.name: p.stat().st_mtime_ns for p in cut.iterdir()} == before
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == f"error: terminated (SIGTERM); continue with `finetune run --resume {cut}`"
    assert RunDir.open(cut).checkpoint("last")["train_state"]["epoch"] == 1  # epoch 1 checkpoint, whole
    run_recipe(RunDir.open(cut).recipe(), resume=cut)
    wa, wb = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (straight, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# The epoch-1 dead end: killed after best.pt and before last.pt.
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


@pytest.mark.slow
def test_checkpoint_every_resumes_mid_epoch_bitwise_with_mixup_ema_and_dropout(tiny_recipe: Path) -> None:
    sets = [*MID_EPOCH, "model.drop_rate=0.3"]  # dropout: the RNG must be the checkpoint moment's
    straight = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=straight"]))
    assert not list((straight / "steps").glob("*.pt"))  # superseded by each epoch's last.pt
    with pytest.raises(UserError, match="interrupted"):
        run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=cut"]), hooks=[StopAtStep(5)])
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
