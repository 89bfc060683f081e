"""The toolkit's file I/O: atomic writes, JSON lines, safe checkpoint loading and RNG state capture.

Every file a run writes goes to a temporary file in the same folder and is renamed into place, so an interrupted
write never leaves a half-written checkpoint or report behind. Checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import runfiles
from finetune.errors import UserError


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it (set back at once)
    os.umask(mask)
    return mask


def cache_dir(name: str) -> Path:
    """A folder of the toolkit's cache: ``$FINETUNE_CACHE_DIR/<name>`` (default ``~/.cache/finetune/<name>``)."""
    return Path(os.environ.get("FINETUNE_CACHE_DIR", Path.home() / ".cache" / "finetune")) / name


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (atomic on POSIX).

    The file gets the mode an ordinary ``open`` would give it (0666 less the umask), not ``mkstemp``'s 0600.
    An ``OSError`` (a full disk) names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(err.filename or path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and not err.filename:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


TMP_SUFFIX = ".tmp"
# No tag opens without "<" (a lone ">" stays readable: "precision >= 0.9"); "|" would split a table cell.
_MARKDOWN = str.maketrans({"&": "&amp;", "<": "&lt;", "|": "\\|", "`": "\\`", "\n": " ", "\r": " "})


def markdown_text(value: object) -> str:
    """``value`` as Markdown that shows as itself: no HTML a viewer would run, no ``|`` that splits a table cell."""
    return str(value).translate(_MARKDOWN)


def csv_cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text, not a formula (OWASP's rule: ``= + - @``, tab or CR first is quoted)."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def check_output(
    path: Path,
    option: str,
    *,
    ours: Callable[[Path], bool] | None = None,
    force: bool = False,
    run_dir: Path | None = None,
    fix: str = "choose another path or pass --force",
) -> None:
    """Refuse to write ``path`` where that would replace something this toolkit did not make.

    The one rule for a file a command writes at, or beside, a path the user named: the path may be new, or a file
    ``ours`` recognises as an earlier output of the same command, or (with ``force``) any regular file or symbolic
    link (the link is replaced, never its target). Never a folder, and never a file of the run directory ``run_dir``
    but those under its ``export/`` folder (the toolkit's) and its ``README.md`` (when ``ours``): ``--force`` does
    not reach a run's own files.

    Args:
        path: The file about to be written.
        option: What named it, for the message (``--out``, ``--csv``).
        ours: Whether an existing file is one this command wrote before (replaced without asking).
        force: Replace any other existing regular file.
        run_dir: The run directory the command reads, whose files are never replaced.
        fix: What the user can do about an existing file, for the message.

    Raises:
        UserError: When the path is refused.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder, not a file; give the path of a file to write")
    if not path.is_file() and not path.is_symlink():
        raise UserError(f"{option} {path}: is not a regular file; give the path of a file to write")
    here = path.parent.resolve() / path.name  # the link itself, not where it points: a write replaces the link
    if run_dir is not None and here.is_relative_to(Path(run_dir).resolve()):
        inside = here.relative_to(Path(run_dir).resolve())
        if inside.parts[0] in ("export", runfiles.BENCHMARK_DIR):  # the toolkit's: a new export or benchmark replaces
            return
        if inside != Path("README.md"):
            raise UserError(f"{option} {path}: is one of the run's own files; write outside the run or under export/")
    if path.is_symlink() and not force:
        raise UserError(f"{option} {path}: is a symbolic link; pass --force to replace the link (not its target)")
    if not force and not (ours is not None and ours(path)):
        raise UserError(f"{option} {path}: exists and was not written by this command; {fix}")


def check_output_folder(folder: Path, option: str, ours: Callable[[Path], bool]) -> None:
    """Refuse a folder a command fills (``compare --out``) unless it is new, empty, or one it filled before (``ours``).

    Raises:
        UserError: For a file, or a folder holding anything else (a user's own ``compare.md`` would be replaced).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder}: is not a folder; give a new folder for this command's files")
    if folder.is_dir() and any(folder.iterdir()) and not ours(folder):
        raise UserError(
            f"{option} {folder}: holds files this command did not write; give a new folder (or an empty one)"
        )


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files an interrupted :func:`atomic_write_bytes` left in ``folder``.

    Call it only where no other process is writing (a run being resumed). Returns what was removed.
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and fsync it (a crash leaves at most that line partial, which readers drop)."""
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(
    path: str | Path, kind: type | None = dict, fix: str = "write it again with the command that made it"
) -> Any:
    """A JSON file this toolkit wrote; a broken or tampered one is one line (a user error), not a traceback.

    Args:
        path: The file.
        kind: The type its top level must have (``None``: any).
        fix: What the user can do, for the message.
    """
    try:
        value = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: corrupt (not JSON: {str(err)[:80]}); {fix}") from None
    if kind is not None and not isinstance(value, kind):
        raise UserError(f"{path}: corrupt (a {type(value).__name__} where a {kind.__name__} belongs); {fix}")
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file (a partial last line, from a kill mid-write, is dropped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` with ``torch.save`` and write it atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_error(path: str | Path, err: Exception) -> UserError:
    """The one-line error for a weights file that cannot be read: empty, truncated, not torch, or unsafe."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if isinstance(err, pickle.UnpicklingError) and found:
        return UserError(
            f"{path}: refused: it holds a pickled Python object ({found.group(1)}) besides tensors, and loading it "
            "could run arbitrary code; re-save the weights as safetensors (or a plain state dict) from a trusted source"
        )
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        return UserError(f"{path}: the file is empty (0 bytes); was it copied or written completely?")
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:  # torch's text urges the unsafe
        return UserError(
            f"{path}: cannot read weights: torch's safe loader refused it (a truncated file, or pickled content "
            "besides tensors); re-save it as safetensors or a plain state dict from a trusted source"
        )
    first = (text.splitlines() or [""])[0][:200]
    return UserError(f"{path}: cannot read weights ({type(err).__name__}{': ' + first if first else ''})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, without unpickling arbitrary objects.

    Raises:
        UserError: When the file is missing, empty, truncated or holds objects ``weights_only`` refuses.
    """
    if not Path(path).is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to parse the file is about the file
        raise load_error(path, err) from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a finetune checkpoint (a {type(state).__name__}, not a dict)")
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, in a form ``weights_only`` loading accepts (no NumPy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
