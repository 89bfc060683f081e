"""``finetune compare`` and ``finetune sweep``: recipes on the same paired held-out draws, bootstrap intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finetune.cli.options import SetOption, err, out
from finetune.errors import UserError


def compare_command(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files (TOML) to compare.")],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds: each is one paired draw and training seed.")] = (
        "0,1,2"
    ),
    overrides: SetOption = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(help="NAME=KEY=VALUE: a row that is the first recipe with this override (repeat to add more)."),
    ] = None,
    probe: Annotated[bool, typer.Option(help="Add the linear-probe baseline at each compared resolution.")] = True,
    output: Annotated[Path, typer.Option("--out", help="Folder for the runs, results and compare.md.")] = Path(
        "compare"
    ),
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals.")] = 1000,
) -> None:
    """Train recipes on the same paired draws of the val split; print and write compare.md / compare.json."""
    from finetune.runs.compare import MAX_RESAMPLES, compare, markdown, parse_seeds, plan

    if not 100 <= resamples <= MAX_RESAMPLES:
        raise UserError(f"--resamples {resamples}: use 100 to {MAX_RESAMPLES} (1000 gives a steady 95% interval)")
    for r in recipes:
        if not r.is_file():
            raise UserError(f"{r}: no such recipe file")
    entries = plan(list(recipes), list(overrides or []), list(variant or []), probe)
    result = compare(entries, parse_seeds(seeds), output, resamples, err)
    out.print(markdown(result), markup=False, highlight=False)
    err.print(f"wrote {output / 'compare.md'} and compare.json")


def sweep_command(
    recipe: Annotated[Path, typer.Argument(help="The starting recipe (TOML).")],
    space: Annotated[Path, typer.Option(help="The search space: one TOML table per recipe key.")],
    trials: Annotated[int, typer.Option(help="Finished trials the study should have.")] = 20,
    seed: Annotated[int, typer.Option(help="The holdout draw (and sampler seed): trials see its selection half.")] = 0,
    compare_seeds: Annotated[
        str | None,
        typer.Option(help="Training seeds of the final compare of the start and the best, all on --seed's draw."),
    ] = None,
    overrides: SetOption = None,
    output: Annotated[Path, typer.Option("--out", help="Folder for the study, the trials and best.toml.")] = Path(
        "sweep"
    ),
) -> None:
    """Optuna TPE over recipe keys on the selection half; best.toml, then a compare on the scoring half."""
    from finetune.runs.compare import markdown, parse_seeds
    from finetune.runs.sweep import sweep

    if not recipe.is_file():
        raise UserError(f"{recipe}: no such recipe file")
    seeds = parse_seeds(compare_seeds) if compare_seeds is not None else [seed]
    result = sweep(recipe, space, trials, output, list(overrides or []), seed, seeds, err)
    b = result["best"]
    err.print(f"best trial {b['number']}: {b['value']:.4f} on the selection half, {b['params']}")
    out.print(markdown(result["compare"]), markup=False, highlight=False)
    err.print(f"wrote {output / 'best.toml'} (finetune run takes it) and {output / 'sweep.json'}")
