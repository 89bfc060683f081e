"""The learning-rate range test."""

from __future__ import annotations

from pathlib import Path

from .conftest import run_cli


def test_lr_find_is_reproducible(tiny_recipe: Path, tmp_path: Path) -> None:
    said = [run_cli("lr-find", str(tiny_recipe), "--steps", "12", "--png", str(tmp_path / f"{i}.png")) for i in (0, 1)]
    assert all(s.returncode == 0 for s in said), said[0].stderr[-2000:]
    first, second = (s.stdout.split("suggested peak lr ")[1].split()[0] for s in said)
    assert first == second  # was: 1.0e-7, 1.2e-7, 1.6e-7, 1.5e-3 on four identical runs
