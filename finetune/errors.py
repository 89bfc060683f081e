"""The one exception type for mistakes a user can fix (bad recipe, missing file, corrupt image).

The CLI prints a ``UserError`` as one line and exits with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """A problem in the user's input: the message names the key or path and says what to do."""


# Errors of the machine rather than of the code: a full disk, a folder the user cannot write. One line, exit 2.
_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "a read-only file system",
}


_PATH_ERRORS = {
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EEXIST: "exists and is not a folder",
    errno.ENAMETOOLONG: "a name in this path is longer than the file system allows",
}


def _real_name(filename: object) -> str:
    """The file a user asked for, not the hidden ``.NAME.xxxx.tmp`` an atomic write was filling."""
    path = Path(str(filename))
    match = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
    name = str(path.with_name(match.group(1))) if match else str(path)
    return name if len(name) <= 200 else f"{name[:120]}...{name[-60:]} ({len(name)} characters)"


def _unreadable(filename: object) -> bool:
    """Whether ``filename`` exists but this process may not read it (a permission error reading, not writing)."""
    try:
        return filename is not None and os.path.isfile(str(filename)) and not os.access(str(filename), os.R_OK)
    except (OSError, ValueError):
        return False


def os_error_line(e: OSError, command: str = "run") -> str | None:
    """The one-line message for an :class:`OSError` a user can fix (permissions, disk space), else None.

    Only ``run`` is told to ``--resume`` and about ``output.dir``; other commands are told to write elsewhere.
    """
    where = _real_name(e.filename) if e.filename else "a file the command writes"
    run = command == "run"
    if isinstance(e, PermissionError) and _unreadable(e.filename):
        return f"{where}: permission denied reading it; fix its permissions (chmod u+r) or use a copy you can read"
    if isinstance(e, PermissionError):
        place = " (output.dir)" if run else ""
        return f"{where}: permission denied; choose a folder you can write{place} or fix its permissions"
    if e.errno in _OS_ERRORS:
        then = "choose another output.dir, then --resume" if run else "write to another folder"
        return f"{where}: {_OS_ERRORS[e.errno]}; free space or {then}"
    if e.errno in _PATH_ERRORS:
        return f"{where}: {_PATH_ERRORS[e.errno]}; choose another path"
    return None
