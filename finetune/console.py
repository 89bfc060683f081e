"""Consoles that stay readable in a log: a table written to a file or a pipe is not cut to 80 columns."""

from __future__ import annotations

import os

from rich.console import Console, ConsoleDimensions

LOG_WIDTH = 240  # columns when the output is a file or a pipe: report tables are not cut to 80


class LogConsole(Console):
    """A rich console that, writing to a file or a pipe (a log), is :data:`LOG_WIDTH` wide instead of 80.

    In a terminal (or with ``COLUMNS`` set) it is rich's own width.
    """

    @property
    def size(self) -> ConsoleDimensions:  # noqa: D102
        size = super().size
        if self._width is None and not self.is_terminal and "COLUMNS" not in os.environ:
            return ConsoleDimensions(max(size.width, LOG_WIDTH), size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)
