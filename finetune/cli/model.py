"""The commands that look at a recipe's model without training it: ``groups``, ``summary`` and ``lr-find``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from finetune.cli.options import SetOption, err, out
from finetune.errors import UserError


def groups(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: SetOption = None,
) -> None:
    """Print the model's layer groups: parameters, and in each stage (the probe included) frozen or the LR it gets."""
    from finetune.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    from finetune.assembly import build_run

    parts = build_run(cfg, weights="none", roles=("train",), check_images=False)
    views = parts.stage_views()
    model, layer_groups = parts.model, parts.groups
    table = Table(title=f"{cfg.model.name}: {len(layer_groups)} layer groups, {len(parts.classes)} classes")
    table.add_column("group")
    table.add_column("parameters", justify="right")
    for view in views:
        table.add_column(view.title, justify="center")
    for g in layer_groups:
        n = sum(model.get_parameter(p).numel() for p in g.params)
        cells = [
            "solved" if g.name in v.solved else "[dim]frozen[/]" if v.lrs[g.name] is None else f"{v.lrs[g.name]:.3g}"
            for v in views
        ]
        table.add_row(g.name, f"{n:,}", *cells)
    out.print(table)
    bn = {"frozen": "fixed in frozen groups", "all": "fixed everywhere", "none": "updated everywhere"}[cfg.freeze.bn]
    out.print(
        f"BatchNorm running stats: {bn}; BN affine in frozen groups {'trains' if cfg.freeze.train_bn else 'frozen'}. "
        "A number is the group's peak LR in that stage (the stage's lr or optim.lr, times its layer_decay / lr_mult "
        f"multiplier; warmup starts at x{cfg.optim.warmup_factor:g}); stages are numbered as lr-find --stage counts."
    )


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--input-size {text!r}: expected CxHxW, e.g. 3x224x224")
    c, h, w = (int(p) for p in parts)
    if c != 3:
        raise UserError(f"--input-size {text!r}: the model takes RGB images; C must be 3")
    if max(h, w) > 4096:
        raise UserError(
            f"--input-size {text!r}: at most 4096 pixels a side (a forward pass that large runs out of memory)"
        )
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
    from finetune.assembly import build_run
    from finetune.data.split import ClassMap
    from finetune.summary import summarize_model

    if recipe is not None:
        cfg = load_recipe(recipe, overrides)
        parts = build_run(cfg, weights="none", roles=("train",), check_images=False)
        default_size, default_batch = (3, cfg.data.image_size, cfg.data.image_size), cfg.data.batch_size
    else:
        cfg = Recipe.model_validate({"model": {"name": model_name, "drop_rate": 0.0}})
        classes = ClassMap(tuple(range(num_classes)), tuple(map(str, range(num_classes))))
        parts = build_run(cfg, weights="none", roles=(), classes=classes)
        default_batch = 1
        default_size = (3, 32, 32) if model_name == "mobilenetv2_reduced" else (3, 224, 224)
    stage_note = "all parameters trainable"
    if recipe is not None and parts.policy is not None:
        stage = parts.policy.apply(0)
        stage_note = f"trainable/frozen as in stage 1 (training {len(stage.train)} of {len(parts.groups)} groups)"
    report = summarize_model(parts.model, size or default_size, batch or default_batch, cfg.optim.name)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_summary(report, cfg.model.name, cfg.optim.name, stage_note)


def lr_find(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    stage: Annotated[int, typer.Option(help="\\[\\[freeze.stages]] entry to sweep (1-based).")] = 1,
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
    from finetune.assembly import build_run
    from finetune.eval import plots
    from finetune.runs.run import seed_everything
    from finetune.train.lr_find import lr_range_test

    seed_everything(cfg.train.seed, cfg.train.deterministic)  # the head's init, dropout: the same sweep every time
    parts = build_run(cfg, roles=("train", "val"), console=err)  # resolved as a run resolves it
    model, index = parts.place(), parts.trained_stage(stage)
    if parts.policy is not None:
        parts.fit_probe()
        parts.policy.apply(parts.policy.stages[index].start)
    result = lr_range_test(
        model,
        parts.loader("train", augment=True),
        parts.loss_fn,
        parts.optimizer_and_scheduler[0],
        multipliers=parts.stage_multipliers(index),
        forward=parts.policy.forward if parts.policy else None,
        device=parts.device,
        precision=parts.precision,
        start=start,
        end=end,
        steps=steps,
    )
    if result.lrs and result.steep == result.lrs[0]:
        err.print(
            "[yellow]note[/] the steepest descent is at the sweep's first LR: the loss has no clear descent in this "
            "range; try a lower --start, or more --steps"
        )
    title = f"{cfg.model.name}, stage {stage}: LR range test"
    plots.lr_find_png(result.lrs, result.losses, result.smoothed, result.steep, png, title)
    out.print(
        f"stage {stage}: {len(result.lrs)} steps from {start:.1e}; suggested peak lr {result.steep:.2e} "
        f"(steepest descent; minimum/10 = {result.min_div_10:.2e}); the recipe's "
        f"{parts.stage_lr(index):.2e}; plot {escape(str(png))}"
    )
