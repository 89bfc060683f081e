"""The ``finetune`` command line: the commands, nothing else."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finetune.cli_data import SetOption, data_app
from finetune.cli_deploy import check_threshold, export, predict
from finetune.errors import UserError, os_error_line

app = typer.Typer(help="Transfer learning for small image classifiers.", no_args_is_help=True, add_completion=False)
app.add_typer(data_app, name="data")
app.command()(predict)
app.command()(export)

out = Console()
err = Console(stderr=True, soft_wrap=True)


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe TOML file.")] = None,
    overrides: SetOption = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory from its last.pt.")] = None,
) -> None:
    """Train a recipe end to end: data, model, training, evaluation, report."""
    from finetune.config import load_recipe

    if resume is not None:
        from finetune.rundir import RunDir

        if recipe is not None:
            raise UserError("give either RECIPE or --resume RUN_DIR (a resumed run uses its own recipe.toml)")
        cfg = RunDir.open(resume).resume_recipe(overrides)
    elif recipe is None:
        raise UserError("missing RECIPE; e.g. finetune run recipes/quickstart.toml")
    else:
        cfg = load_recipe(recipe, overrides)
    from finetune.distributed import teardown
    from finetune.training import run as run_recipe  # after the recipe: a recipe error should not wait for torch

    try:
        run_recipe(cfg, resume, err)
    finally:
        teardown()  # under torchrun: leave the process group


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: SetOption = None,
    check_images: Annotated[bool, typer.Option(help="Decode every image (slow on big datasets).")] = False,
) -> None:
    """Check a recipe: build the model and read the data without training, then print the plan."""
    from finetune.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    from finetune import build, build_train
    from finetune.data.coco import check_images as check

    device, precision = build.build_device(cfg.train)
    splits = build.build_splits(cfg)
    if check_images:
        for s in splits.values():
            problems = check(s.image_paths, decode=True)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise UserError(problems[0] + more)
    classes = splits["train"].classes
    model, load_report = build.build_model(cfg, len(classes))
    build.build_loss(cfg, splits["train"])
    steps = build_train.plan_steps(cfg, len(splits["train"].image_paths))
    # What `run` builds before its first step, so that validate refuses every recipe run would refuse.
    layer_groups = build_train.build_groups(cfg, model)
    policy = build_train.build_policy(cfg, model, layer_groups)
    build_train.build_feature_cache(cfg, policy, splits["train"])
    build_train.build_optimizer(cfg, model, steps, layer_groups)
    if policy is not None:
        policy.remove()
    n_params = sum(p.numel() for p in model.parameters())
    table = Table(title=escape(f"{recipe}: valid"), show_header=False)
    table.add_row("model", f"{cfg.model.name} ({n_params:,} parameters), head for {len(classes)} classes")
    if load_report:
        table.add_row("weights", escape(load_report.summary()))
    names = ", ".join(classes.names[:8]) + (", ..." if len(classes) > 8 else "")
    table.add_row("classes", escape(f"{len(classes)}: {names}"))
    for role, s in splits.items():
        table.add_row(role, escape(f"{len(s.image_paths)} images, {int(s.targets.sum())} labels, {s.annotation_file}"))
    table.add_row(
        "steps",
        f"{steps.steps_per_epoch}/epoch x {cfg.train.epochs} epochs = {steps.total_steps} "
        f"(warmup {steps.warmup_steps})",
    )
    table.add_row("device", f"{device.type}, {precision}")
    table.add_row("run dir", escape(str(Path(cfg.output.dir) / cfg.output.name)))
    out.print(table)


@app.command()
def groups(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: SetOption = None,
) -> None:
    """Print the model's layer groups: parameters, trainable state per stage, and starting learning rate."""
    from finetune.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    from finetune import build, build_train
    from finetune.errors import UserError as _UserError
    from finetune.optim import group_multipliers

    classes = build.build_splits(cfg, ("train",), check=False)["train"].classes
    model = build.build_bare_model(cfg, len(classes))
    layer_groups = build_train.build_groups(cfg, model)
    if layer_groups is None:
        raise _UserError(f"model.name: {cfg.model.name} has no layer groups; it trains as a whole")
    stages = build_train.build_stages(cfg, layer_groups)
    mult = group_multipliers(layer_groups, cfg.optim.layer_decay, cfg.optim.lr_mult)
    table = Table(title=f"{cfg.model.name}: {len(layer_groups)} layer groups, {len(classes)} classes")
    table.add_column("group")
    table.add_column("parameters", justify="right")
    for i, st in enumerate(stages):
        table.add_column(f"stage {i + 1}\nepochs {st.start + 1}-{st.end}", justify="center")
    table.add_column("lr", justify="right")
    for g in layer_groups:
        n = sum(model.get_parameter(p).numel() for p in g.params)
        marks = ["train" if g.name in st.train else "[dim]frozen[/]" for st in stages]
        table.add_row(g.name, f"{n:,}", *marks, f"{cfg.optim.lr * mult[g.name]:.3g}")
    out.print(table)
    bn = {"frozen": "fixed in frozen groups", "all": "fixed everywhere", "none": "updated everywhere"}[cfg.freeze.bn]
    out.print(
        f"BatchNorm running stats: {bn}; BN affine in frozen groups {'trains' if cfg.freeze.train_bn else 'frozen'}. "
        f"lr = optim.lr x group multiplier at the schedule's peak (warmup starts at x{cfg.optim.warmup_factor:g})."
    )


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--input-size {text!r}: expected CxHxW, e.g. 3x224x224")
    c, h, w = (int(p) for p in parts)
    return c, h, w


def _print_summary(report: dict, model_name: str, optim_name: str, stage_note: str) -> None:
    """The per-layer table and totals of ``finetune summary``."""
    mib = 1024**2
    table = Table(title=f"{model_name}, input {'x'.join(map(str, report['totals']['input']))}")
    for col in ("layer", "type", "output", "params", "MACs", "act. memory"):
        table.add_column(col, justify="left" if col in ("layer", "type", "output") else "right")
    for r in report["layers"]:
        table.add_row(
            r["name"],
            r["kind"],
            "x".join(map(str, r["output_shape"])),
            f"{r['params']:,}",
            f"{r['macs']:,}",
            f"{r['activation_bytes'] / mib:.2f} MiB",
        )
    out.print(table)
    t, m = report["totals"], report["totals"]["memory"]
    out.print(f"parameters: {t['parameters']:,} ({t['trainable']:,} trainable, {t['frozen']:,} frozen; {stage_note})")
    out.print(f"MACs per image: {t['macs_per_image']:,} ({t['macs_per_image'] / 1e6:.1f} M)")
    out.print(
        f"memory at batch {t['input'][0]} (fp32): activations forward {m['activations_forward'] / mib:.1f} MiB, "
        f"forward+backward ~{m['activations_forward_backward'] / mib:.1f} MiB, inference peak "
        f"{m['activations_inference_peak'] / mib:.1f} MiB; parameters {m['parameters'] / mib:.1f} MiB, gradients "
        f"{m['gradients'] / mib:.1f} MiB, {optim_name} state {m['optimizer_state'] / mib:.1f} MiB; "
        f"training total ~{m['training_total'] / mib:.1f} MiB"
    )


@app.command()
def summary(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe TOML file (or use --model).")] = None,
    model_name: Annotated[str | None, typer.Option("--model", help="A model name instead of a recipe.")] = None,
    input_size: Annotated[str | None, typer.Option(help="CxHxW (default: the recipe's, or 3x224x224).")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size for memory (default: the recipe's, or 1).")] = None,
    num_classes: Annotated[int, typer.Option(help="Classifier outputs with --model.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    overrides: SetOption = None,
) -> None:
    """Per-layer table (output shape, parameters, MACs, activation memory) and totals for a recipe's model."""
    from finetune.config import Recipe, load_recipe

    if (recipe is None) == (model_name is None):
        raise UserError("give either RECIPE or --model NAME, e.g. finetune summary --model mobilenetv2_100")
    if batch is not None and batch < 1:
        raise UserError(f"--batch {batch}: give a batch size of at least 1")
    if num_classes < 1:
        raise UserError(f"--num-classes {num_classes}: give at least 1 class")
    size = _parse_size(input_size) if input_size else None
    from finetune import build, build_train
    from finetune.summary import summarize_model

    if recipe is not None:
        cfg = load_recipe(recipe, overrides)
        n_classes = len(build.build_splits(cfg, ("train",), check=False)["train"].classes)
        default_size, default_batch = (3, cfg.data.image_size, cfg.data.image_size), cfg.data.batch_size
    else:
        cfg = Recipe.model_validate({"model": {"name": model_name, "drop_rate": 0.0}})
        n_classes, default_batch = num_classes, 1
        default_size = (3, 32, 32) if model_name == "mobilenetv2_reduced" else (3, 224, 224)
    model = build.build_bare_model(cfg, n_classes)
    stage_note = "all parameters trainable"
    if recipe is not None:
        policy = build_train.build_policy(cfg, model, build_train.build_groups(cfg, model))
        if policy is not None:
            stage = policy.apply(0)
            policy.remove()
            stage_note = f"trainable/frozen as in stage 1 (training {len(stage.train)} of {len(policy.groups)} groups)"
    size = size or default_size
    report = summarize_model(model, size, batch or default_batch, cfg.optim.name)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_summary(report, cfg.model.name, cfg.optim.name, stage_note)


@app.command(name="eval")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    threshold: Annotated[
        float | None, typer.Option(help="One decision threshold for every class (default: the run's thresholds.json).")
    ] = None,
) -> None:
    """Score a run's best checkpoint on a split; prints the tables and writes eval_<split>.json."""
    check_threshold(threshold)
    from finetune.evaluation import evaluate as evaluate_run
    from finetune.tasks import TASKS

    report = evaluate_run(run_dir, split, threshold, err)
    TASKS[report["task"]].print_report(report, out)


@app.command()
def calibrate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    split: Annotated[str, typer.Option(help="The split to fit thresholds on: val or train.")] = "val",
    overrides: SetOption = None,
) -> None:
    """Re-fit a run's per-class thresholds; rewrites thresholds.json (the old one kept as thresholds.prev.json)."""
    from finetune.evaluation import calibrate_run
    from finetune.tasks import TASKS

    if split not in ("val", "train"):
        raise UserError(f"--split {split!r}: thresholds are fitted on val or train (test stays unseen)")
    report = calibrate_run(run_dir, split, err, overrides)
    TASKS[report["task"]].print_report(report, out)


@app.command("lr-find")
def lr_find(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    stage: Annotated[int, typer.Option(help="[[freeze.stages]] entry to sweep (1-based).")] = 1,
    start: Annotated[float, typer.Option(help="First learning rate.")] = 1e-7,
    end: Annotated[float, typer.Option(help="Last learning rate.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Batches at most.")] = 100,
    png: Annotated[Path, typer.Option(help="Where to write the plot.")] = Path("lr_find.png"),
    overrides: SetOption = None,
) -> None:
    """LR range test on a stage's trainable groups: prints a suggested peak LR, writes a PNG; changes no weight."""
    from finetune.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    if not 0 < start < end or steps < 3:
        raise UserError("--start/--end/--steps: need 0 < start < end and at least 3 steps")
    from finetune import build, build_train, plots
    from finetune.lr_find import lr_range_test

    splits = build.build_splits(cfg, ("train", "val"))
    cfg, _ = build.build_resolved_recipe(cfg, splits["train"])  # as a run would: normalize, jitter placement
    device, precision = build.build_device(cfg.train)
    model, _ = build.build_model(cfg, len(splits["train"].classes))
    model.to(device)
    groups = build_train.build_groups(cfg, model)
    policy = build_train.build_policy(cfg, model, groups)
    index = build_train.build_trained_stage_index(cfg, stage)
    if policy is not None:
        build_train.build_probe(cfg, policy, splits, device, precision, err)
        policy.apply(policy.stages[index].start)
    loader = build.build_loader(cfg.data, build.build_dataset(cfg.data, splits["train"], True, cfg.train.seed), True)
    plan = build_train.plan_steps(cfg, len(splits["train"].image_paths))
    optimizer, _ = build_train.build_optimizer(cfg, model, plan, groups)
    mult = build_train.build_stage_multipliers(cfg, groups, index) if groups else {"all": 1.0}
    result = lr_range_test(
        model,
        loader,
        build.build_loss(cfg, splits["train"]).to(device),
        optimizer,
        multipliers=mult,
        forward=policy.forward if policy else None,
        device=device,
        precision=precision,
        start=start,
        end=end,
        steps=steps,
    )
    if policy is not None:
        policy.remove()
    title = f"{cfg.model.name}, stage {stage}: LR range test"
    plots.lr_find_png(result.lrs, result.losses, result.smoothed, result.steep, png, title)
    out.print(
        f"stage {stage}: {len(result.lrs)} steps from {start:.1e}; suggested peak lr {result.steep:.2e} "
        f"(steepest descent; minimum/10 = {result.min_div_10:.2e}); the recipe's "
        f"{build_train.build_stage_lr(cfg, index):.2e}; plot {escape(str(png))}"
    )


def _version(value: bool) -> None:
    if value:
        from finetune import __version__

        print(f"finetune {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Transfer learning for small image classifiers."""


def main() -> None:
    """Console entry point: a UserError (or a full disk, a folder one cannot write) is one line and exit code 2."""
    try:
        app()
    except (UserError, OSError) as e:
        line = str(e) if isinstance(e, UserError) else os_error_line(e)
        if line is None:
            raise
        # escape: messages name keys like [freeze] or stages[0], which rich would otherwise eat as markup
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
