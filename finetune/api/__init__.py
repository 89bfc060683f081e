"""The Python API: ``finetune.train(recipe, **overrides)`` trains and returns a :class:`Run`; ``Run.load`` opens one.

A :class:`Run` gives the report's numbers, the classes and thresholds, and the steps that follow training:
``predictor()``, ``export()``, ``report()`` (the page), ``calibrate()``, ``evaluate()``. Each calls the function
the command line calls (``finetune run``, ``export``, ``report``, ``calibrate``, ``eval``), so both behave alike,
and a user error raises :class:`~finetune.errors.UserError` with the one line the command line prints. Nothing goes
to stdout unless asked (``verbose=True``, or a ``console``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
from rich.console import Console

from finetune import runfiles
from finetune.config.keys import section_of
from finetune.config.overrides import apply_overrides
from finetune.config.recipe import Recipe, load_recipe, recipe_to_dict, validate_recipe
from finetune.errors import UserError
from finetune.eval.run_report import RunReport, SplitReport
from finetune.rundir.directory import RunDir

Overrides = Mapping[str, Any] | Sequence[str] | None


def _is_section(path: str) -> bool:
    """Whether a dotted path names a table of recipe keys (``train``, ``data.augment``), not a map-valued key.

    A map value (``optim.lr_mult``, ``calibrate.classes``) is written whole: its keys, layer selectors and class
    names, may hold dots.
    """
    model: Any = Recipe
    for part in path.split("."):
        field = model.model_fields.get(part)
        found = section_of(field.annotation) if field is not None else None
        if found is None or found[1]:  # a value, or a list or map of sections (written whole)
            return False
        model = found[0]
    return True


def _flat(pairs: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in pairs.items():
        if isinstance(value, Mapping) and _is_section(f"{prefix}{key}"):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _toml_value(key: str, value: Any) -> str:
    """``value`` as TOML, maps as inline tables (``--set optim.lr_mult={"blocks.5:" = 0.1}`` replaces the map)."""
    if value is None:
        raise UserError(f"{key}=None: a recipe has no null value; leave the key out to keep its default")
    if isinstance(value, Path):
        return _toml_value(key, value.as_posix())
    if isinstance(value, Mapping):
        quoted = (tomli_w.dumps({str(k): 0}).rpartition("=")[0].strip() for k in value)
        return "{" + ", ".join(f"{k} = {_toml_value(key, v)}" for k, v in zip(quoted, value.values())) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def as_overrides(overrides: Overrides = None, keys: Mapping[str, Any] | None = None) -> list[str]:
    """``--set`` strings, so that Python overrides are parsed and validated exactly as the command line's are.

    Args:
        overrides: ``{"data.root": "...", "train": {"epochs": 2}}`` (dotted keys, or nested dicts for sections; a
            map-valued key such as ``optim.lr_mult`` takes its dict whole, as ``--set`` does), or ``--set`` strings.
        keys: Keyword arguments, a double underscore for each dot: ``train__epochs=2``.

    Returns:
        ``section.key=value`` strings, values written as TOML.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    items = [] if overrides is None or isinstance(overrides, Mapping) else list(overrides)
    pairs = dict(overrides) if isinstance(overrides, Mapping) else {}
    pairs.update({k.replace("__", "."): v for k, v in (keys or {}).items()})
    items += [f"{key}={_toml_value(key, value)}" for key, value in _flat(pairs)]
    return items


def _free_name(output_dir: str, base: str = "run") -> str:
    """``run``, else ``run-2``, ``run-3``... (the first not taken in ``output_dir``), as Ultralytics names runs."""
    i = 1
    while (Path(output_dir) / (base if i == 1 else f"{base}-{i}")).exists():
        i += 1
    return base if i == 1 else f"{base}-{i}"


def build_recipe(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: list[str] | None = None) -> Recipe:
    """A validated recipe from a TOML file, a dict (a recipe's sections) or a :class:`Recipe`, with overrides.

    A recipe given as a dict or an object without ``output.name`` gets the first free name of ``run``, ``run-2``...
    """
    if isinstance(recipe, str | Path):
        return load_recipe(recipe, overrides)
    raw = recipe_to_dict(recipe) if isinstance(recipe, Recipe) else copy.deepcopy(dict(recipe))
    out = validate_recipe(apply_overrides(raw, overrides or []), "recipe")
    if not out.output.name:
        out.output.name = _free_name(out.output.dir)
    return out


def train(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    overrides: Overrides = None,
    *,
    resume: str | Path | None = None,
    hooks: Sequence[Any] = (),
    verbose: bool = False,
    console: Console | None = None,
    **keys: Any,
) -> Run:
    """Train a recipe end to end, as ``finetune run`` does, and return the finished run.

    Args:
        recipe: A TOML file, a dict of the recipe's sections, or a :class:`~finetune.config.recipe.Recipe`.
        overrides: Dotted keys (``{"data.root": "data/demo"}``) or ``--set`` strings, applied in order.
        resume: A run directory to continue from its ``last.pt`` (``finetune run --resume``).
        hooks: Extra :class:`~finetune.train.loop.Hook` objects, after the recipe's own.
        verbose: Print progress (stderr) and the report's tables (stdout), as the command line does.
        console: Where progress goes (then the report's tables print to stdout too).
        **keys: More overrides, a double underscore for each dot: ``train__epochs=2``.

    Returns:
        The run.

    Raises:
        UserError: A recipe, data or run-directory problem, with the line the command line prints.
    """
    from finetune.runs.run import run_recipe  # torch and the whole trainer: imported when training starts

    r = build_recipe(recipe, as_overrides(overrides, keys))
    quiet = console is None and not verbose
    progress = console or Console(stderr=True, quiet=quiet)
    tables = Console(quiet=True) if quiet else None  # the report's tables: stdout (or a notebook's output) if asked
    path = run_recipe(r, resume=resume, console=progress, hooks=hooks, report_console=tables)
    return Run(path)


class Run:
    """A run directory: its numbers, and the steps that follow training."""

    def __init__(self, path: str | Path) -> None:
        self._run = RunDir.open(path)

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Open an existing run directory (one ``finetune run`` or :func:`train` wrote)."""
        return cls(path)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    @property
    def dir(self) -> Path:
        """The run directory."""
        return self._run.path

    @property
    def classes(self) -> list[str]:
        """The class names, in the model's output order."""
        return list(self._run.classes().names)

    @property
    def results(self) -> RunReport:
        """``report.json`` (read again each time: ``calibrate`` rewrites it)."""
        if not (self.dir / runfiles.REPORT).is_file():
            raise UserError(f"{self.dir}: no report.json (the run has not finished); resume it with train(resume=...)")
        return RunReport.load(self.dir / runfiles.REPORT)

    @property
    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per split (val, test), its summary: ``fixed`` and, once calibrated, ``calibrated``.

        ``fixed`` is at the recipe's fixed threshold (single-label: the top class).
        """
        return {name: _summaries(split) for name, split in self.results.splits.items()}

    @property
    def thresholds(self) -> dict[str, float] | None:
        """Class name -> the decision threshold the run predicts with (multi-label); None for single-label runs."""
        from finetune.eval.report import load_thresholds

        if self.results.task != "multi_label":
            return None
        fixed = self._run.recipe().train.threshold
        thr, _ = load_thresholds(self.dir, None, fixed)
        return dict(zip(self.classes, np.broadcast_to(np.asarray(thr, float), (len(self.classes),)).tolist()))

    def predictor(self, device: str = "auto", threshold: float | None = None) -> Any:
        """A :class:`~finetune.deploy.predictor.Predictor` on the run's best weights and thresholds."""
        from finetune.deploy.predictor import Predictor

        return Predictor.from_run(self.dir, device, threshold)

    def export(self, format: str = "onnx", *, int8: bool = False, out: str | Path | None = None, **options: Any) -> Any:  # noqa: A002
        """Export the model (``finetune export``); returns the files written (``.path``: the model file)."""
        from finetune.deploy.export import export_run

        return export_run(self.dir, format, out, int8=int8, **options)

    def qat(self, epochs: int = 4, lr: float | None = None, *, name: str = "", verbose: bool = False) -> Run:
        """Quantization-aware training (``finetune qat``): a new run beside this one, for its INT8 exports."""
        from finetune.runs.qat import qat_run

        progress, tables = Console(stderr=True, quiet=not verbose), None if verbose else Console(quiet=True)
        return Run(qat_run(self.dir, epochs, lr, name, console=progress, report_console=tables))

    def report(self, console: Console | None = None) -> Path:
        """Write ``report.html`` again (``finetune report``); returns its path."""
        from finetune.runs.report_page import report_run

        return report_run(self.dir, console=console or Console(stderr=True, quiet=True))

    def calibrate(self, overrides: Overrides = None, *, split: str = "val", **keys: Any) -> RunReport:
        """Re-fit the thresholds on ``split`` (``finetune calibrate``), with ``calibrate.*`` overrides."""
        from finetune.runs.evaluate import calibrate_run

        quiet = Console(stderr=True, quiet=True)
        return calibrate_run(self.dir, split, quiet, as_overrides(overrides, keys))

    def evaluate(self, split: str = "test", threshold: float | None = None) -> dict[str, dict[str, float]]:
        """Score the best weights on ``split`` (``finetune eval``, writing ``eval_<split>.json``), as :attr:`metrics`.

        ``threshold``: one threshold for every class instead of the run's (then there is no ``calibrated``).
        """
        from finetune.runs.evaluate import evaluate_run

        report = evaluate_run(self.dir, split, threshold, Console(stderr=True, quiet=True))
        return _summaries(report.splits[split])


def _summaries(split: SplitReport) -> dict[str, dict[str, float]]:
    out = {"fixed": split.summary}
    if split.calibrated_summary is not None:
        out["calibrated"] = split.calibrated_summary
    return out
