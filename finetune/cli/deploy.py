"""``finetune predict`` and ``finetune export``: the model out of its run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from finetune import runfiles
from finetune.cli.options import check_threshold, err, out
from finetune.errors import UserError

ThresholdOption = Annotated[
    float | None,
    typer.Option(
        help="One decision threshold for every class (default: the ones the model carries); for a single-label "
        "model, the reject threshold on the top probability."
    ),
]


def predict_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run directory, or a file from `finetune export`: .onnx (fp32, INT8), .pt, .tflite, .xml, .pte."
        ),
    ],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array at the end.")] = False,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Stream one JSON object per image to stdout as each is predicted.")
    ] = False,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write one row per image: path, labels, a probability per class.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --csv file.")] = False,
    threshold: ThresholdOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images.")] = 2,
    top_k: Annotated[
        int,
        typer.Option("--top-k", "--top", help="The K most probable classes per image (table, and top_k in JSON)."),
    ] = 3,
) -> None:
    """Predict labels for images with a run (its best checkpoint) or an exported model; unreadable files are skipped."""
    check_threshold(threshold)
    if batch_size < 1 or workers < 0:
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: give 1 or more")
    if as_json and jsonl:
        raise UserError("--json and --jsonl: choose one")
    from finetune.deploy.output import print_predictions, write_csv
    from finetune.deploy.predictor import Predictor, Skipped, expand_paths

    files, missing = expand_paths(paths)
    if not files:
        raise UserError(f"{missing[0] if missing else 'PATH'}; nothing to predict")
    _check_csv(csv_out, files)
    predictor = Predictor.load(source, device, threshold)
    _check_csv(csv_out, files, force, source, predictor.classes)
    skipped = Skipped(list(missing))
    results = []
    for r in predictor.predict_files(files, batch_size, workers, skipped):
        results.append(r)
        if jsonl:
            sys.stdout.write(json.dumps(r.to_json(top_k)) + "\n")
            sys.stdout.flush()
    if csv_out is not None:
        write_csv(csv_out, results, predictor.classes)
    if as_json:
        print(json.dumps([r.to_json(top_k) for r in results], indent=2))
    elif csv_out is None and not jsonl:
        print_predictions(results, out, top_k)
    for line in skipped.items:
        err.print(f"[yellow]skipped[/] {escape(line)}")
    where = f"; wrote {escape(str(csv_out))}" if csv_out else ""
    err.print(f"{len(results)} images predicted, {len(skipped.items)} skipped{where}")


def _check_csv(
    csv_out: Path | None,
    images: list[Path],
    force: bool = False,
    source: Path | None = None,
    classes: list[str] | None = None,
) -> None:
    """Refuse a ``--csv`` path that names an image; given the model, also one that would replace another file.

    With ``source`` and ``classes``: a run's own file, or an existing file but an earlier ``--csv`` of this model.
    """
    from finetune.deploy.output import csv_header
    from finetune.deploy.predictor import IMAGE_SUFFIXES
    from finetune.io import check_output

    if csv_out is None:
        return
    if csv_out.suffix.lower() in IMAGE_SUFFIXES or csv_out.resolve() in {f.resolve() for f in images}:
        raise UserError(f"--csv {csv_out}: names an image (an input, or an image file name); give a .csv path to write")
    if source is None or classes is None:
        return
    header = csv_header(classes)

    def ours(path: Path) -> bool:  # the same model's predictions: its exact header (a dataset CSV has another)
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline() == header

    run_dir = source if source.is_dir() else None
    fix = "choose another file, or pass --force to replace it"
    check_output(csv_out, "--csv", ours=ours, force=force, run_dir=run_dir, fix=fix)


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="onnx, torchscript, hf (a folder timm and the Hub load), litert (.tflite; extra), openvino "
            "(IR; extra) or executorch (.pte; extra).",
        ),
    ] = "onnx",
    output: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Model file (default RUN/export/model.onnx, .pt, litert/model.tflite, openvino/model.xml)."
        ),
    ] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8", help="Also write an INT8 model (static, calibrated on train images) with re-fitted thresholds."
        ),
    ] = False,
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8: the same as --int8.")] = None,
    calibration_images: Annotated[
        int | None,
        typer.Option(
            help="Train images (unaugmented, a seeded random subset) for the INT8 ranges; default 300 or all."
        ),
    ] = None,
    card: Annotated[bool, typer.Option(help="Write the model card, README.md, beside the model.")] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing files at --out that an earlier export did not write.")
    ] = False,
) -> None:
    """Export a run's model (uint8 NHWC images in, probabilities out) with its sidecar JSON and a model card."""
    from finetune.deploy.export import export_run

    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize!r}: only int8 is supported")
    int8 = int8 or quantize == "int8"
    if not int8 and calibration_images is not None:
        raise UserError("--calibration-images: only used with --int8")
    result = export_run(run_dir, fmt, output, int8=int8, calibration_images=calibration_images, card=card, force=force)
    for path in result.files:
        out.print(f"wrote {escape(str(path))}")
    if result.comparison is not None:
        from finetune.deploy.quantize import comparison_markdown

        out.print(escape(comparison_markdown(result.comparison)))


def benchmark_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    formats: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: onnx, openvino, litert, executorch (default: onnx and each installed extra's)."
        ),
    ] = None,
    images: Annotated[int, typer.Option(help="The batch the images/s is measured on.")] = 32,
    reps: Annotated[int, typer.Option(help="Batch-1 calls timed per backend (median and p90).")] = 50,
) -> None:
    """Every backend's fp32 and INT8 file: size, latency, images/s and held-out quality; RUN/benchmark.json, .png."""
    from finetune.deploy.benchmark import benchmark_markdown, benchmark_run, parse_formats

    doc = benchmark_run(run_dir, parse_formats(formats), images, reps, console=err)
    out.print(escape(benchmark_markdown(doc)))
    out.print(f"scored on the {doc['scored_on']}; wrote {escape(str(Path(run_dir) / runfiles.BENCHMARK))} and .png")


def qat_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    epochs: Annotated[int, typer.Option(help="QAT epochs, every layer group training.")] = 4,
    lr: Annotated[float | None, typer.Option(help="Peak LR, cosine to zero (default: the run's optim.lr).")] = None,
    name: Annotated[str, typer.Option(help="The new run's name, beside RUN (default: RUN's name + -qat).")] = "",
) -> None:
    """Quantization-aware training: fine-tune a finished run with the INT8 rounding simulated, into RUN-qat."""
    from finetune.runs.qat import qat_run

    path = qat_run(run_dir, epochs, lr, name, console=err)
    out.print(f"wrote {escape(str(path))}; export its INT8 files with finetune export {escape(str(path))} --int8")


def card_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    output: Annotated[Path | None, typer.Option("--out", help="File to write (default RUN/README.md).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing file at --out that is not a model card.")
    ] = False,
) -> None:
    """Write a run's model card (README.md with YAML front matter: task, classes, thresholds, metrics, data)."""
    from finetune.deploy.export import card_run

    out.print(f"wrote {escape(str(card_run(run_dir, output, force)))}")
