"""Progress lines for runs whose output is a log (not a terminal): every N seconds or steps, with the time left."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from finetune.config import load_recipe
from finetune.console import LogTicker
from finetune.runs.run import run_recipe


def _log() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=False), out


def test_ticker_prints_every_n_steps_with_the_time_left_and_never_in_a_terminal() -> None:
    console, out = _log()
    ticker = LogTicker(console, "epoch 1/3", 10, every_s=0, every_steps=4, after=20)
    for step in range(1, 11):
        ticker.tick(step, f"loss {1 / step:.2f}")
    lines = out.getvalue().splitlines()
    assert [ln.split("  ")[1] for ln in lines] == ["4/10", "8/10"]  # the last step is the epoch line's, not ours
    assert all(ln.startswith("epoch 1/3") and " left" in ln and "run ~" in ln for ln in lines)
    assert "loss 0.25" in lines[0]
    terminal = Console(file=io.StringIO(), force_terminal=True)
    quiet = LogTicker(terminal, "epoch 1/3", 10, every_s=0, every_steps=1)
    quiet.tick(1)
    assert terminal.file.getvalue() == ""


def test_ticker_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 10.0, 30.0, 61.0, 90.0, 125.0])
    monkeypatch.setattr("finetune.console.time.perf_counter", lambda: next(clock))
    console, out = _log()
    ticker = LogTicker(console, "caching pass 1", 100, every_s=60)  # start: 0.0
    for step in range(1, 6):
        ticker.tick(step)  # at 10, 30, 61, 90, 125 s: lines at 61 and 125
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("caching pass 1  3/100")
    assert "32m52s left" in lines[0]  # 3 steps took 61 s: 97 more at 61/3 s each are 1,972 s
    assert lines[1].startswith("caching pass 1  5/100")


@pytest.mark.slow
def test_a_run_writing_to_a_log_shows_progress_lines_within_epochs(tiny_recipe: Path) -> None:
    console, out = _log()
    sets = ["train.epochs=2", "train.progress_steps=1", "freeze.cache_features=true"]
    sets += ['freeze.stages=[{epochs = 1, train = ["classifier"]}, {train = ["all"]}]']
    run_recipe(load_recipe(tiny_recipe, sets), console=console)
    text = out.getvalue()
    steps = [ln for ln in text.splitlines() if ln.startswith("epoch 1/2  ") and " left" in ln]
    assert len(steps) >= 1 and "img/s" in steps[0] and "run ~" in steps[0]  # 3 batches: lines at 1 and 2
    assert any(ln.startswith("epoch 2/2  1/") for ln in text.splitlines())
