"""Issue 24: runs that survive the real world (locks, killed workers, the epoch-1 dead end, DDP faults)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import io as ckpt
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.train import fit as trainer
from finetune.train import lock
from finetune.train.run import run_recipe
from finetune.train.rundir import RunDir

from .conftest import run_cli


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_and_a_foreign_one_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = {"command": "finetune run", "pid": _dead_pid(), "host": socket.gethostname(), "since": 0}
    (run / lock.LOCK_NAME).write_text(json.dumps(stale))  # what a SIGKILLed run leaves: the file, no lock held
    note = lock.acquire(run, "finetune run")
    assert note.startswith(f"took over {run / lock.LOCK_NAME}: its holder, finetune run (pid {stale['pid']} on ")
    assert json.loads((run / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock.acquire(run, "finetune report") == ""  # the same process nests (calibrate -> report)
    lock.release(run)
    assert (run / lock.LOCK_NAME).is_file()  # still held: the outer hold
    lock.release(run)
    assert not (run / lock.LOCK_NAME).exists()  # released: a finished run holds no .lock
    (run / lock.LOCK_NAME).write_text(json.dumps({**stale, "host": "elsewhere"}))
    with pytest.raises(UserError, match=r"locked by finetune run \(pid .* on elsewhere.* on another host; if that"):
        lock.acquire(run, "finetune run")


def test_a_held_lock_refuses_a_second_process_in_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = "import sys; from finetune.train import lock; lock.acquire(sys.argv[1], 'finetune run'); print(1, flush=1)"
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
    assert (run / "best.pt").is_file() and not (run / "last.pt").exists() and not (run / lock.LOCK_NAME).exists()
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
