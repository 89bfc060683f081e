"""``finetune data``: the dataset commands (the demo generator, splitting, statistics)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from finetune.cli.options import SetOption, err, out
from finetune.errors import UserError

data_app = typer.Typer(help="Dataset tools.", no_args_is_help=True)


@data_app.command("demo")
def data_demo(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the dataset.")],
    seed: int = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    train: int = 2200,
    val: int = 600,
    test: int = 600,
    source: Annotated[int, typer.Option(help="Images in the 'source' split that demo_pretrain trains on.")] = 2200,
    profile: Annotated[
        str,
        typer.Option(
            help="long-tail (rare classes, small or faint objects: per-class thresholds gain) or easy (every object "
            "clear; the first demo data)."
        ),
    ] = "long-tail",
) -> None:
    """Write the synthetic COCO-format demo dataset (deterministic)."""
    from finetune.data.demo import PROFILES, write_demo

    if profile not in PROFILES:
        raise UserError(f"--profile {profile!r}: give one of {', '.join(PROFILES)}")
    if any(n < 0 for n in (train, val, test, source)) or size < 16:
        raise UserError("--train/--val/--test/--source: give counts of 0 or more; --size: at least 16 pixels")
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{out_dir}: {parent} is a file, not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):  # a user's annotations and images are never replaced
        first = sorted(p.name for p in out_dir.iterdir())[0]
        raise UserError(f"{out_dir}: is not empty (it holds {first}); choose a new or empty folder")
    start = time.perf_counter()
    sizes = {"train": train, "val": val, "test": test, "source": source}
    counts = write_demo(out_dir, {k: v for k, v in sizes.items() if v > 0}, size, seed, profile)
    err.print(
        f"wrote {sum(counts.values())} images {counts} to {escape(str(out_dir))} in {time.perf_counter() - start:.1f}s"
    )


@data_app.command("split")
def data_split(
    source: Annotated[
        Path,
        typer.Argument(help="A folder of class folders, a CSV of path and labels, a COCO .json, or a VOC folder."),
    ],
    fractions: Annotated[str, typer.Option(help="train,val,test shares of the images, summing to 1.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="The random tie-breaks (the same seed gives the same split).")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            help="The CSV to write (default SOURCE/splits.csv, or NAME.split.csv); COCO: the folder; VOC: the folder "
            "of the image sets (default ROOT/ImageSets/Main, where the VOC reader looks)."
        ),
    ] = None,
    label_sep: Annotated[str, typer.Option(help="The separator inside a CSV's labels column.")] = "|",
) -> None:
    """Split a dataset into train/val/test, stratified; every class of 3+ images lands in every split."""
    from finetune.data.stratify import SPLITS, split_source

    try:
        shares = tuple(float(x) for x in fractions.split(","))
    except ValueError:
        raise UserError(f"--fractions {fractions}: give three numbers, e.g. 0.8,0.1,0.1") from None
    written, split, notes = split_source(source, shares, seed, out, label_sep)
    counts = ", ".join(f"{name} {int((split == i).sum())}" for i, name in enumerate(SPLITS))
    err.print(f"split {len(split)} images: {counts}")
    for note in notes:
        err.print(f"note: {escape(note)}")
    for path in written:
        err.print(f"wrote {escape(str(path))}")


@data_app.command("stats")
def data_stats(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: SetOption = None,
    refresh: Annotated[bool, typer.Option(help="Recompute even when cached.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Per-channel mean/std of the train split (cached for normalize = "dataset"), label counts, co-occurrence."""
    from finetune.config import load_recipe

    cfg = load_recipe(recipe, overrides)
    from finetune.assembly import build_run
    from finetune.data.stats import cache_path, load_or_compute, stats_key

    split = build_run(cfg, roles=("train",)).splits["train"]
    key = stats_key(cfg.data.format, cfg.data.task)
    stats, cached = load_or_compute(split, key, cfg.data.image_size, refresh, cfg.data.on_bad_image)
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    where = cache_path(split, key, cfg.data.image_size)
    out.print(
        f"{escape(cfg.data.root)} / {escape(stats['split'])}: {stats['images']} images at {stats['image_size']}px "
        f"({'from cache' if cached else 'computed; cached'} in {escape(str(where))})"
        + (f"; {stats['skipped']} unreadable images skipped" if stats.get("skipped") else "")
    )
    out.print(f'mean {stats["mean"]}  std {stats["std"]}  (0..1 scale; use normalize = "dataset")')
    table = Table(title="labels")
    table.add_column("class")
    table.add_column("images", justify="right")
    unknown = stats.get("unknown_counts")
    if unknown:
        table.add_column("unknown", justify="right")
    for name, count in stats["label_counts"].items():
        table.add_row(escape(name), str(count), *([str(unknown[name])] if unknown else []))
    out.print(table)
    if "cooccurrence" in stats:
        names = list(stats["label_counts"])
        co = stats["cooccurrence"]
        pairs = sorted(((co[i][j], names[i], names[j]) for i in range(len(names)) for j in range(i)), reverse=True)
        out.print(
            f"labels per image {stats['labels_per_image']:.2f}; most frequent pairs: "
            + escape(", ".join(f"{a}+{b} {n}" for n, a, b in pairs[:5]))
        )
