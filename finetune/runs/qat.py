"""``finetune qat RUN``: a finished run fine-tuned for a few epochs with the INT8 rounding simulated.

The result is a new run directory beside ``RUN`` (``<name>-qat``): the same recipe, data, splits and calibration,
starting from ``RUN``'s selected weights (the EMA's when it kept one), every layer group training in one stage at one
LR, BatchNorm statistics fixed, ``quantize.aware = true``. It is validated, selected, calibrated and reported like any
run, on the plain network with the QAT-trained weights; ``finetune export --int8`` and ``finetune benchmark`` on it
give the INT8 files, their thresholds re-fitted on each file's own probabilities as for any run.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from finetune import runfiles
from finetune.config import Recipe
from finetune.errors import UserError
from finetune.rundir.directory import RunDir

DEFAULT_EPOCHS = 4


def qat_recipe(run_dir: str | Path, epochs: int = DEFAULT_EPOCHS, lr: float | None = None, name: str = "") -> Recipe:
    """The recipe of the QAT run of ``run_dir``: its own, starting from its best weights, one stage, fake-quantized.

    Args:
        run_dir: A finished run (it has ``best.pt``).
        epochs: QAT epochs.
        lr: The peak LR (cosine to zero, no warmup); default the run's ``optim.lr``.
        name: The new run's directory name (default ``<run>-qat``), written beside the run.

    Raises:
        UserError: For a folder that is not a finished run, or epochs / LR out of range.
    """
    run = RunDir.open(run_dir)
    best = run.path / runfiles.BEST
    if not best.is_file():
        raise UserError(f"{run_dir}: no {runfiles.BEST} (the run has not finished an epoch); finish it first")
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: give 1 or more")
    if lr is not None and not lr > 0:
        raise UserError(f"--lr {lr}: give a positive learning rate")
    base = run.recipe()
    sets = [
        "model.pretrained=false",
        f"model.checkpoint={json.dumps(best.resolve().as_posix())}",
        'freeze.stages=[{train=["all"]}]',
        'freeze.bn="all"',
        'freeze.until=""',
        "freeze.cache_features=false",
        "freeze.cache_maps=false",
        f"optim.lr={lr if lr is not None else base.optim.lr!r}",
        "optim.warmup_epochs=0",
        'optim.schedule="cosine"',
        f"train.epochs={epochs}",
        "train.patience=0",
        "quantize.aware=true",
        f"output.dir={json.dumps(run.path.resolve().parent.as_posix())}",
        f"output.name={json.dumps(name or run.path.name + '-qat')}",
    ]
    return run.recipe(sets)


def qat_run(
    run_dir: str | Path,
    epochs: int = DEFAULT_EPOCHS,
    lr: float | None = None,
    name: str = "",
    console: Console | None = None,
    report_console: Console | None = None,
) -> Path:
    """Train the QAT run of ``run_dir`` (see :func:`qat_recipe`); progress to ``console``, tables to the other."""
    from finetune.runs.run import run_recipe

    return run_recipe(qat_recipe(run_dir, epochs, lr, name), console=console, report_console=report_console)
