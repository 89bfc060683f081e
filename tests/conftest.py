"""Shared fixtures: a tiny generated COCO-format dataset and recipe files pointing at it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one compute thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when torch starts, here and in the tests' subprocesses

import numpy as np
import pytest
from PIL import Image

from finetune.data.demo import write_demo

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COCO_TINY = SHARED / "data" / "coco-tiny"
LITE0_WEIGHTS = SHARED / "weights" / "efficientnet_lite0.imagenet.safetensors"

# The optional extras (pyproject.toml) and the modules each one brings. A test that needs one is marked
# ``@pytest.mark.extra("name")``: skipped where the extra is absent (`make test`), and a failure where it is installed
# but the test skipped anyway (`make test-extras`, which CI runs): a test of an installed extra never passes by
# skipping. (litert has its own environment, `make test-litert`: see the Makefile.)
EXTRAS = {
    "inspect": ("pytorch_grad_cam", "cleanlab"),
    "sweep": ("optuna",),
    "openvino": ("openvino",),
    "litert": ("litert_torch", "ai_edge_litert", "ai_edge_quantizer", "mediapipe"),
    "wandb": ("wandb",),
    "hf": ("datasets",),
    "executorch": ("executorch", "torchao"),
}


def extra_missing(name: str) -> str | None:
    """Why the extra ``name`` is unusable here (a module of it is absent), or None when it is installed."""
    absent = [m for m in EXTRAS[name] if importlib.util.find_spec(m) is None]
    return f"the {name} extra is not installed ({', '.join(absent)}): pip install -e '.[{name}]'" if absent else None


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``extra`` marker."""
    config.addinivalue_line("markers", "extra(name): needs the optional extra `name` (tests/conftest.py EXTRAS)")


def _extras_of(item: pytest.Item) -> list[str]:
    return [m.args[0] for m in item.iter_markers("extra")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip a test of an extra that is not installed, saying what to install."""
    for item in items:
        for name in _extras_of(item):
            if name not in EXTRAS:
                raise pytest.UsageError(f"{item.nodeid}: unknown extra {name!r}; known: {', '.join(EXTRAS)}")
            if (why := extra_missing(name)) is not None:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A test of an installed extra that skips (an importorskip, a data check) fails instead."""
    outcome = yield
    report = outcome.get_result()
    installed = [n for n in _extras_of(item) if extra_missing(n) is None]
    if report.skipped and installed:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"the {', '.join(installed)} extra is installed, yet this test skipped: {reason}"


TINY_RECIPE = """
[data]
root = "{root}"
test = "test"
image_size = 32
batch_size = 8
num_workers = 0
[data.augment]
color_jitter = 0.1
[model]
name = "mobilenetv2_035"
drop_rate = 0.0
[optim]
lr = 1e-3
warmup_epochs = 0.5
[train]
epochs = 1
precision = "fp32"
[output]
dir = "{runs}"
name = "tiny"
html = false
"""


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-image demo dataset (24 train / 12 val / 12 test, 48 px): generated in well under a second."""
    root = tmp_path_factory.mktemp("tiny_coco")
    write_demo(root, {"train": 24, "val": 12, "test": 12}, size=48, seed=1, profile="easy")
    return root


@pytest.fixture
def tiny_recipe(tiny_coco: Path, tmp_path: Path) -> Path:
    """A recipe file for one fast CPU epoch on ``tiny_coco``, writing runs under ``tmp_path``."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE.format(root=tiny_coco.as_posix(), runs=(tmp_path / "runs").as_posix()))
    return path


COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture(scope="session")
def folder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class image folder of noisy solid colours (12 train / 4 val / 4 test per class, 24 px)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for name, rgb in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(rgb, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, real: bool = False
) -> subprocess.CompletedProcess:
    """Run the ``finetune`` console entry point (``finetune.cli.app:main``) and capture what it prints.

    In this process by default: the same entry point, argv, exit code and streams as the console script, without
    paying a Python and torch start-up per call. ``real=True`` runs the installed console script in a subprocess
    (for what only a fresh process shows: imports, signals, the script itself).
    """
    if real:
        exe = Path(sys.executable).parent / "finetune"
        return subprocess.run(
            [str(exe), *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=300
        )
    from finetune.cli.app import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["finetune", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except BaseException:  # noqa: BLE001 - a crash is what a subprocess would show: a traceback, code 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    return subprocess.CompletedProcess(["finetune", *args], code, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, no traceback, and one ``error:`` line, the last, containing every needle.

    Progress printed before a train-time error (the run's plan line) may precede it.
    """
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def interrupt_then_resume(
    recipe_path: Path, sets: list[str], epochs_done: int, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Run ``output.name=cut`` until Ctrl-C in the epoch after ``epochs_done``, then resume it; the run directory."""
    from finetune.config import load_recipe
    from finetune.errors import UserError
    from finetune.rundir.directory import RunDir
    from finetune.runs.run import run_recipe
    from finetune.train import fit as trainer

    real = trainer.train_one_epoch

    def interrupt(*args, **kwargs):
        if args[0].state.epoch == epochs_done:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt)
    with pytest.raises(UserError, match="interrupted; continue with `finetune run --resume"):
        run_recipe(load_recipe(recipe_path, [*sets, "output.name=cut"]))
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    cut = Path(load_recipe(recipe_path, sets).output.dir) / "cut"
    run_recipe(RunDir.open(cut).recipe(), resume=cut)
    return cut
