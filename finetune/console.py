"""Consoles that stay readable in a log: a table written to a file or a pipe is not cut to 80 columns."""

from __future__ import annotations

import os
import time

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


def _span(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    s = int(max(seconds, 0))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LogTicker:
    """Progress lines for a console that is not a terminal (a log file, ``nohup``, CI, a scheduler).

    A terminal gets rich's live bar instead; a log gets one plain line every ``every_s`` seconds (and, with
    ``every_steps``, every that many steps), so an hour-long run can be followed with ``tail -f``.

    Args:
        console: Where the lines go; nothing is printed when it is a terminal.
        label: What runs (``epoch 3/20``, ``cache pass 1``).
        total: Steps this ticker counts to (batches).
        every_s: Seconds between lines; 0 = no time-based lines.
        every_steps: Steps between lines; 0 = no step-based lines.
        after: Work that remains after this one, in this one's steps (later epochs): adds the run's time left.
        done: Steps already done when counting starts (a resumed epoch): not timed.
    """

    def __init__(
        self,
        console: Console,
        label: str,
        total: int,
        every_s: float = 60.0,
        every_steps: int = 0,
        after: int = 0,
        done: int = 0,
    ) -> None:
        self.console, self.label, self.total, self.after = console, label, total, after
        self.every_s, self.every_steps = every_s, every_steps
        self.on = not console.is_terminal and (every_s > 0 or every_steps > 0)
        self.start = self.last = time.perf_counter()
        self.first = done  # steps done before this process started counting (a resumed epoch)

    def tick(self, step: int, info: str = "") -> None:
        """Step ``step`` (1-based, of ``total``) is done; print a line (``info`` in it) when one is due."""
        if not self.on:
            return
        now = time.perf_counter()
        due_time = self.every_s > 0 and now - self.last >= self.every_s
        due_step = self.every_steps > 0 and step % self.every_steps == 0
        if not (due_time or due_step) or step >= self.total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        per_step = elapsed / max(step - self.first, 1)
        left = (self.total - step) * per_step
        run_left = f"  run ~{_span(left + self.after * per_step)} left" if self.after else ""
        self.console.print(
            f"{self.label}  {step}/{self.total}  {info + '  ' if info else ''}{_span(left)} left{run_left}",
            highlight=False,
            soft_wrap=True,
        )
