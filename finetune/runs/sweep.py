"""``finetune sweep``: Optuna's TPE over recipe keys, scored on the selection half only, then compared honestly.

    # space.toml: one table per recipe key
    ["optim.lr"]
    low = 1e-5
    high = 1e-3
    log = true

    ["train.ema"]
    choices = [0.0, 0.9998]

A range whose bounds are both integers draws integers (``step`` optional); ``log = true`` draws on a log scale.
Each trial trains the recipe with its draw on ``[data.holdout]`` with ``scoring = false``: val is the selection half
of the seed's draw and the scoring half is not read at all. The trial's value is the selection metric
(``train.select``: val mAP, or top-1) of its best checkpoint; Optuna's median pruner stops a trial whose per-epoch
val metric falls below the median of earlier trials at the same epoch. The study lives in ``study.db`` (SQLite),
so a stopped sweep continues where it left off. At the end ``best.toml`` is the recipe with the best draw, a
recipe ``finetune run`` takes, and ``finetune compare`` puts it beside the starting recipe on the scoring half.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import tomli_w
from rich.console import Console

from finetune import runfiles
from finetune.config import Recipe, load_recipe, recipe_to_dict
from finetune.config.overrides import read_toml
from finetune.errors import UserError
from finetune.eval.run_report import RunReport
from finetune.eval.tasks import task_for
from finetune.io import atomic_write_json, atomic_write_text, check_output_folder
from finetune.train.loop import Hook, Loop

INSTALL = "pip install 'finetune[sweep]'"
FIXED = ("data.root", "data.format", "data.train", "data.val", "data.test", "data.holdout", "output.", "train.seed")


def _require() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError(f"finetune sweep needs Optuna: {INSTALL}") from None
    return optuna


def read_space(path: Path, recipe: Path, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """The space file's parameters, each checked: a real recipe key that takes its low / first value."""
    if not path.is_file():
        raise UserError(f"{path}: no such sweep space file")
    space = read_toml(path)
    if not space:
        raise UserError(f'{path}: no parameters; give one table per recipe key, e.g. ["optim.lr"] low/high')
    for key, spec in space.items():
        if not isinstance(spec, dict) or not ("choices" in spec or {"low", "high"} <= set(spec)):
            raise UserError(f"{path}: {key}: give choices = [...] or low and high")
        unknown = set(spec) - {"choices", "low", "high", "log", "step"}
        if unknown:
            raise UserError(f"{path}: {key}: unknown field {sorted(unknown)[0]!r} (choices, low, high, log, step)")
        if any(key == f or key.startswith(f if f.endswith(".") else f + ".") for f in FIXED):
            raise UserError(f"{path}: {key}: fixed by the sweep (the data, the holdout draw, outputs); not a parameter")
        values = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        if not isinstance(values, list) or not values or any(isinstance(v, list | dict) for v in values):
            raise UserError(f"{path}: {key}: choices must be a non-empty list of numbers, strings or booleans")
        for value in values:
            try:
                load_recipe(recipe, [*overrides, f"{key}={_toml(value)}"])
            except UserError as err:
                raise UserError(f"{path}: {key} = {value!r}: the recipe refuses it ({err})") from None
    return space


def _toml(value: Any) -> str:
    """A value as it goes after ``--set key=``."""
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _draw(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if "choices" in spec:
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            log, step = spec.get("log", False), spec.get("step", 1)
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=1 if log else step, log=log)
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
    return params


class PruneHook(Hook):
    """Report each epoch's val metric to the trial; stop the run (``stop_reason``) when Optuna prunes it."""

    def __init__(self, trial: Any, key: str) -> None:
        self.trial, self.key, self.pruned = trial, key, False

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        value = record.get(self.key)
        if value is None:
            return
        self.trial.report(float(value), record["epoch"])
        if self.trial.should_prune():
            self.pruned = True
            loop.state.stop_reason = f"pruned by the sweep at epoch {record['epoch']} ({self.key} {value:.3f})"


def trial_recipe(recipe: Path, overrides: list[str], params: dict[str, Any], seed: int, out: Path, n: int) -> Recipe:
    """One trial: the draw, the selection half only (no test role), its own run directory."""
    sets = [*overrides, *(f"{k}={_toml(v)}" for k, v in params.items())]
    sets += [f"data.holdout.seed={seed}", "data.holdout.scoring=false", 'data.test=""', "output.html=false"]
    sets += [f'output.dir="{(out / "trials").as_posix()}"', f'output.name="trial-{n}"']
    return load_recipe(recipe, sets)


def _objective(recipe: Path, overrides: list[str], space: dict, seed: int, out: Path) -> Any:
    optuna = _require()

    def objective(trial: Any) -> float:
        from finetune.assembly.data import build_splits
        from finetune.runs.run import run_recipe

        r = trial_recipe(recipe, overrides, _draw(trial, space), seed, out, trial.number)
        splits = build_splits(r, check=False)
        seen = sorted({i for s in splits.values() for i in s.image_ids})
        trial.set_user_attr("images_seen", seen)  # every image the trial reads (train and the selection half)
        select = task_for(r.data.format, r.data.task).select(r.train.select)
        hook = PruneHook(trial, f"val_{select}")
        (out / "logs").mkdir(parents=True, exist_ok=True)
        with (out / "logs" / f"trial-{trial.number}.log").open("w") as f, contextlib.redirect_stdout(f):
            run_dir = run_recipe(r, console=Console(file=f, width=120), hooks=[hook])
        trial.set_user_attr("run", str(run_dir))
        if hook.pruned:
            raise optuna.TrialPruned()
        return float(RunReport.load(run_dir / runfiles.REPORT).splits["val"].summary[select])

    return objective


def _study(optuna: Any, out: Path, seed: int) -> Any:
    """The study in ``out/study.db``: created, or loaded to continue.

    The sampler is seeded with the seed plus the trials already there, so a continued study does not draw its
    first trials again (a fresh TPESampler replays its random start-up draws).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    done = len(optuna.load_study(study_name="sweep", storage=storage).trials) if (out / "study.db").is_file() else 0
    return optuna.create_study(
        study_name="sweep",
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed + done),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )


def _trial_json(t: Any) -> dict[str, Any]:
    keys = ("number", "value", "params")
    return {
        **{k: getattr(t, k) for k in keys},
        "state": t.state.name,
        "images_seen": t.user_attrs.get("images_seen", []),
    }


def sweep(
    recipe: Path,
    space_file: Path,
    trials: int,
    out: Path,
    overrides: list[str] | None = None,
    seed: int = 0,
    compare_seeds: list[int] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or continue) the study to ``trials`` finished trials, write ``best.toml``, compare it with the start."""
    from finetune.runs import compare as cmp

    console = console or Console(stderr=True)
    overrides = list(overrides or [])
    if trials < 1:
        raise UserError(f"--trials {trials}: run at least one trial")
    space = read_space(space_file, recipe, overrides)  # checked before Optuna is needed
    start = load_recipe(recipe, overrides)
    if task_for(start.data.format, start.data.task).select(start.train.select) == "loss":
        raise UserError('finetune sweep maximises the selection metric: set train.select to "map" (or "top1")')
    optuna = _require()
    check_output_folder(out, "--out", lambda f: (f / "study.db").is_file())  # a sweep of its own: continued
    out.mkdir(parents=True, exist_ok=True)
    study = _study(optuna, out, seed)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    left = trials - len(study.get_trials(states=finished))
    if left > 0:
        console.print(f"sweep: {left} of {trials} trials to run (study in {out / 'study.db'})")
        try:
            study.optimize(_objective(recipe, overrides, space, seed, out), n_trials=left, catch=())
        except KeyboardInterrupt:
            raise UserError("sweep stopped; run the same command to continue") from None
    if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        raise UserError("sweep: every trial was pruned; give more trials or a wider space")
    best = study.best_trial
    sets = [*overrides, *(f"{k}={_toml(v)}" for k, v in best.params.items())]
    atomic_write_text(out / "best.toml", tomli_w.dumps(recipe_to_dict(load_recipe(recipe, sets))))
    start_label = recipe.stem if recipe.stem != "best" and cmp.LABEL.fullmatch(recipe.stem) else "start"
    entries = [cmp.Entry(start_label, recipe, overrides, seed), cmp.Entry("best", out / "best.toml", [], seed)]
    with contextlib.redirect_stdout(io.StringIO()):
        result = cmp.compare(entries, compare_seeds or [seed], out / "compare", console=console)
    summary = {
        "best": {"number": best.number, "value": best.value, "params": best.params},
        "trials": [_trial_json(t) for t in study.trials],
        "compare": result,
    }
    atomic_write_json(out / "sweep.json", summary)
    return summary
