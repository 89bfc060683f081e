"""The run-directory lock: one writer at a time (a run, ``calibrate``, ``eval``, ``export``, ``report``).

The lock is ``RUN/.lock``, held with a POSIX record lock (``fcntl.lockf``) for as long as the command writes, and it
names its holder (command, PID, host, start time) for the one line a second writer gets. The kernel takes it
atomically and drops it when the holder dies however it dies (SIGKILL, OOM killer), so a lock file left behind by a
dead process is stale by construction: it is taken over with a note. A record lock, not ``flock``: a forked
DataLoader worker does not inherit it, so workers orphaned by a SIGKILLed run cannot keep its directory locked.

The one exception is a lock file written on another host (a shared filesystem, where a lock may not reach across
machines): that is refused, with the file to delete once the user knows that run is gone. Under torchrun rank 0
takes the lock and every rank gets its answer. The file is removed when the holder lets go, so a finished run
directory holds no ``.lock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from rich.console import Console
from rich.markup import escape

from finetune import runfiles
from finetune.distributed import Dist, broadcast_object
from finetune.errors import UserError, os_error_line

P = ParamSpec("P")
R = TypeVar("R")
_HELD: dict[Path, list[Any]] = {}  # lock path -> [fd, depth]: a command that locks twice (calibrate -> report) nests


def _holder(info: dict[str, Any]) -> str:
    """The holder line, e.g. "finetune run (pid 12 on host, since 2026-12-01 21:40:05)", from what the file says."""
    who = str(info.get("command", "a finetune command"))
    where = " ".join(f"{label}{info[key]}" for key, label in (("pid", "pid "), ("host", "on ")) if key in info)
    since = info.get("since")
    if isinstance(since, int | float) and not isinstance(since, bool) and 0 <= since < 1e11:  # not NaN, not year 5000
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
        where = f"{where}, since {stamp}" if where else f"since {stamp}"
    return f"{who} ({where})" if where else who


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"command": "an unreadable lock"}
    return info if isinstance(info, dict) else {"command": "an unreadable lock"}


def _open_locked(path: Path) -> tuple[int, dict[str, Any]] | dict[str, Any]:
    """``(fd, what the file said)`` once the lock is ours, or the holder's record when it is not free."""
    while True:
        try:  # never through a symbolic link: that would write over, then delete, the file it points to
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise UserError(f"{path}: is a symbolic link, not a lock this toolkit made; delete the link") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"{path}: is not a regular file (a lock this toolkit made is one); delete it")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            info = _read(fd)
            os.close(fd)
            return info
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked between our open and our lock
            return fd, _read(fd)
        os.close(fd)


def acquire(run_path: Path, command: str) -> str:
    """Take ``run_path``'s lock for ``command`` in this process (creating the directory); returns a takeover note.

    Raises:
        UserError: Another live process holds it, or a lock file from another host is there.
    """
    path = Path(run_path) / runfiles.LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{run_path}: is a file; choose another output.dir or output.name") from None
    key = path.parent.resolve() / runfiles.LOCK  # the folder resolved, never the lock file (it may be a link)
    if key in _HELD:
        _HELD[key][1] += 1
        return ""
    got = _open_locked(path)
    if isinstance(got, dict):
        raise UserError(f"{run_path} is in use by {_holder(got)}; wait for it to end, or stop it first")
    fd, left = got
    host = socket.gethostname()
    if left and left.get("host", host) != host:
        os.close(fd)
        raise UserError(
            f"{run_path} is locked by {_holder(left)} on another host; if that process is gone, delete {path}"
        )
    mine = {"command": command, "pid": os.getpid(), "host": host, "since": time.time()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
    except OSError:
        os.close(fd)  # and with it the lock
        raise
    _HELD[key] = [fd, 1]
    if left:
        return f"took over {path}: its holder, {_holder(left)}, is no longer running"
    return ""


def release(run_path: Path) -> None:
    """Let go of ``run_path``'s lock (the innermost of nested holds only decrements)."""
    key = Path(run_path).resolve() / runfiles.LOCK
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1]:
        return
    del _HELD[key]
    with contextlib.suppress(FileNotFoundError):
        # ours, not one made after ours was deleted by hand
        if os.stat(key, follow_symlinks=False).st_ino == os.fstat(held[0]).st_ino:
            key.unlink()  # while still holding it: a waiter that opened the old file sees the inode change and retries
    os.close(held[0])


@contextlib.contextmanager
def run_lock(
    run_path: str | Path, command: str, d: Dist | None = None, console: Console | None = None
) -> Iterator[None]:
    """Hold ``run_path``'s lock for the block: rank 0 takes it, every rank raises its refusal (under torchrun).

    A directory the lock itself created is removed again if the block leaves it empty (a refused or failed start).
    """
    run_path, d = Path(run_path), d or Dist()
    existed = run_path.exists()
    answer: tuple[str, str] = ("", "")
    if d.main:
        try:
            answer = ("", acquire(run_path, command))
        except UserError as err:
            answer = (str(err), "")
        except OSError as err:  # a folder one cannot write: every rank gets the line, none waits for ever
            answer = (os_error_line(err, command.split()[-1]) or f"{run_path}: {err}", "")
    refusal, note = broadcast_object(answer, d)
    if refusal:
        raise UserError(refusal)
    if note and console is not None:
        console.print(f"[yellow]note[/] {escape(note)}")
    try:
        yield
    finally:
        if d.main:
            release(run_path)
            if not existed:
                with contextlib.suppress(OSError):
                    run_path.rmdir()  # only when empty


def locking(command: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function whose first argument is a run directory it writes into: it runs holding the lock.

    A path that is not a directory goes straight through, so the function's own "not a run directory" line is what
    the user sees; so does a directory nobody can write into (an archived run), which nothing could change.
    """

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            run_dir = Path(args[0] if args else kwargs["run_dir"])  # type: ignore[arg-type]
            if not run_dir.is_dir() or not os.access(run_dir, os.W_OK):  # a read-only run (an archive) takes none
                return fn(*args, **kwargs)
            with run_lock(run_dir, command, console=Console(stderr=True)):  # a takeover's note goes to stderr
                return fn(*args, **kwargs)

        return locked

    return wrap
