"""Reading a recipe file (TOML, one-line errors) and ``--set a.b=value`` overrides applied to it before validation."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from finetune.errors import UserError


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a TOML value (a bare word is read as a string).

    Args:
        item: The text given to ``--set``.

    Returns:
        The key path and the parsed value.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=2")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw recipe dict, creating sections as needed (validation comes after)."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item!r}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with one-line errors for a missing or malformed file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"))  # -sig: a BOM (Windows editors) is no error
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; give a recipe .toml file") from None
    except PermissionError:
        raise UserError(f"{path}: recipe file not readable (permission denied)") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML: {err}") from None
