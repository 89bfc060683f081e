"""What every command shares: the ``--set`` option, argument checks, and consoles that stay readable in a log."""

from __future__ import annotations

from typing import Annotated

import typer

from finetune.console import LogConsole
from finetune.errors import UserError

SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a recipe key: section.key=value (a TOML value).")
]
out = LogConsole()
err = LogConsole(stderr=True, soft_wrap=True)


def check_threshold(threshold: float | None) -> None:
    """A ``--threshold`` must be a probability."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: a probability threshold is between 0 and 1")
