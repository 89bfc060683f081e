"""``finetune predict`` and ``finetune export``: the model out of its run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from finetune.cli.options import check_threshold, err, out
from finetune.errors import UserError


def predict_command(
    source: Annotated[Path, typer.Argument(help="A run directory, or a model.onnx / model.pt from `finetune export`.")],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write one row per image: path, labels, a probability per class.")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="One decision threshold for every class (default: the run's thresholds.json).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images.")] = 2,
    top: Annotated[int, typer.Option(help="Probabilities to show per image in the table.")] = 3,
) -> None:
    """Predict labels for images with a run (its best checkpoint) or an exported model; unreadable files are skipped."""
    check_threshold(threshold)
    if batch_size < 1 or workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    from finetune.deploy.output import print_predictions, write_csv
    from finetune.deploy.predictor import Predictor, Skipped, expand_paths

    files, missing = expand_paths(paths)
    if not files:
        raise UserError(f"{missing[0] if missing else 'PATH'}; nothing to predict")
    predictor = Predictor.load(source, device, threshold)
    skipped = Skipped(list(missing))
    results = list(predictor.predict_files(files, batch_size, workers, skipped))
    if csv_out is not None:
        write_csv(csv_out, results, predictor.classes)
    if as_json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    elif csv_out is None:
        print_predictions(results, out, top)
    for line in skipped.items:
        err.print(f"[yellow]skipped[/] {escape(line)}")
    where = f"; wrote {escape(str(csv_out))}" if csv_out else ""
    err.print(f"{len(results)} images predicted, {len(skipped.items)} skipped{where}")


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    output: Annotated[Path | None, typer.Option("--out", help="File to write (default RUN/export/model.*).")] = None,
) -> None:
    """Export a run's model (uint8 NHWC images in, probabilities out) with model.json: classes, thresholds, input."""
    from finetune.deploy.export import export_run

    path = export_run(run_dir, fmt, output)
    out.print(f"wrote {escape(str(path))} and {escape(str(path.with_name('model.json')))}")
