"""The run-directory lock: one writer at a time, a stale lock taken over, a foreign one refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import runfiles
from finetune.errors import UserError
from finetune.rundir import lock


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
