"""``finetune benchmark RUN``: every installed export backend on one run, measured side by side.

For PyTorch eager and for each format's fp32 and INT8 files (exported into ``RUN/benchmark_models/<format>/``, so an
export the user made is left as it is): the file size; batch-1 latency (median and p90 over ``reps`` calls on one
held-out image); the images per second at a batch of ``images``; and held-out quality: multi-label mAP and macro-F1
at the thresholds the fp32 model carries and at thresholds re-fitted on that backend's own probabilities (the
run's calibration settings), single-label top-1. Scored on the test split, or on val (out-of-fold thresholds) when
the run has none. The table prints, ``RUN/benchmark.json`` keeps it, and ``RUN/benchmark.png`` plots quality
against latency.

Timing is this process on this machine, one backend after another, each with the machine's cores (torch,
onnxruntime, OpenVINO and LiteRT each use them all): compare rows of one table, not tables of two machines.
"""

from __future__ import annotations

import contextlib
import io
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from finetune import __version__, runfiles
from finetune.assembly import RunParts, build_from_run
from finetune.deploy import mobile, pte
from finetune.deploy.export import FORMATS, export_run, run_classifier
from finetune.deploy.exported import Backend, int8_name
from finetune.deploy.predictor import Predictor
from finetune.deploy.quantize import backend_outputs, held_out, nhwc_batches, refit
from finetune.errors import UserError
from finetune.eval.metrics import summarize, summarize_single
from finetune.io import atomic_write_bytes, atomic_write_json
from finetune.predictions import Predictions
from finetune.rundir.directory import RunDir
from finetune.rundir.lock import locking

BENCH_FORMATS = ("onnx", "openvino", "litert", "executorch")  # the formats with an INT8 file and a runtime here


@dataclass
class Row:
    """One backend's measurements (quality as fractions; ``None`` where it does not apply)."""

    backend: str
    precision: str
    file: str | None
    mib: float | None
    b1_ms: float
    b1_p90_ms: float
    batch_ips: float
    map: float | None = None
    macro_f1_carried: float | None = None
    macro_f1_refit: float | None = None
    top1: float | None = None


def parse_formats(text: str | None) -> tuple[str, ...]:
    """``--formats onnx,litert`` as a tuple (None: ONNX and every installed extra's); see :func:`check_formats`."""
    if text is None:
        return tuple(f for f in BENCH_FORMATS if f == "onnx" or _installed(f))
    return check_formats(tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip())), text)


def check_formats(chosen: tuple[str, ...], text: str = "") -> tuple[str, ...]:
    """``chosen``, refused for a format this command does not measure or whose extra is missing."""
    bad = [f for f in chosen if f not in BENCH_FORMATS]
    if bad or not chosen:
        shown = ", ".join(bad) or repr(text)
        raise UserError(f"--formats {shown}: give a comma-separated list of {', '.join(BENCH_FORMATS)}")
    for fmt in chosen:
        _require(fmt)  # one line naming the extra to install
    return chosen


def _require(fmt: str) -> None:
    if fmt == "executorch":
        pte.require()
    elif fmt != "onnx":
        mobile.require(fmt)


def _installed(fmt: str) -> bool:
    try:
        _require(fmt)
    except UserError:
        return False
    return True


def timing(fn: Backend, image: np.ndarray, batch: np.ndarray, reps: int) -> tuple[float, float, float]:
    """Batch-1 latency median and p90 (ms) over ``reps`` calls after 5 warm-up calls, and images/s on ``batch``."""
    for _ in range(5):
        fn(image)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(image)
        times.append(1000 * (time.perf_counter() - start))
    fn(batch)
    start = time.perf_counter()
    for _ in range(3):
        fn(batch)
    rate = 3 * len(batch) / (time.perf_counter() - start)
    return statistics.median(times), float(np.percentile(times, 90)), rate


def _quality(parts: RunParts, outs: dict[str, Predictions], carried: np.ndarray | None) -> dict[str, float | None]:
    """Held-out quality of one backend's probabilities (see the module docstring).

    Without a test split the thresholds are out-of-fold on this backend's own probabilities, so there are no
    carried thresholds to score on held-out images: that column is None.
    """
    if carried is None:  # single-label: top-1 on test, else val
        held = outs["test"] if "test" in outs else outs["val"]
        return {"top1": summarize_single(held.targets, held.probs)["top1"]}
    own, _ = refit(parts, outs) if parts.calibration.enabled else (carried, "")
    held, thr_own, _ = held_out(parts, outs, own)
    at_own = summarize(held.targets, held.probs, thr_own)
    at_carried = summarize(held.targets, held.probs, carried)["macro_f1"] if "test" in outs else None
    return {"map": at_own["map"], "macro_f1_carried": at_carried, "macro_f1_refit": at_own["macro_f1"]}


def _backends(
    run: RunDir, model: torch.nn.Module, formats: tuple[str, ...]
) -> list[tuple[str, str, Backend, Path | None]]:
    """``(backend, precision, function, file)`` for eager PyTorch and each format's fp32 and INT8 export."""

    @torch.inference_mode()
    def eager(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()

    found: list[tuple[str, str, Backend, Path | None]] = [("pytorch", "fp32", eager, None)]
    for fmt in formats:
        out = run / runfiles.BENCHMARK_DIR / fmt / f"model{FORMATS[fmt]}"
        with contextlib.redirect_stdout(io.StringIO()):  # the converters print
            result = export_run(run.path, fmt, out, int8=True, card=False)
        for precision, path in (("fp32", result.path), ("int8", int8_name(result.path))):
            found.append((fmt, precision, Predictor.load(path, "cpu").backend, path))  # the runtime predict uses
    return found


def _size(path: Path | None) -> float | None:
    if path is None:
        return None
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None  # OpenVINO's weights file
    return (path.stat().st_size + (weights.stat().st_size if weights else 0)) / 2**20


def _sample(parts: RunParts, n: int) -> np.ndarray:
    """``n`` held-out images (uint8 NHWC, evaluation pipeline), repeated when the split has fewer."""
    role = "test" if "test" in parts.splits else "val"
    got: list[np.ndarray] = []
    for images, _ in nhwc_batches(parts.loader(role), parts.recipe.data.on_bad_image):
        got.append(images)
        if sum(map(len, got)) >= n:
            break
    if not got:
        raise UserError(f"benchmark: the {role} split has no readable image to time on")
    pool = np.concatenate(got)
    return pool[np.arange(n) % len(pool)]


@locking("finetune benchmark")
def benchmark_run(
    run_dir: str | Path,
    formats: tuple[str, ...] | None = None,
    images: int = 32,
    reps: int = 50,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure every backend of ``formats`` (default: ONNX and each installed extra's) on a run.

    Args:
        run_dir: The run directory.
        formats: Among ``onnx``, ``openvino``, ``litert``, ``executorch``.
        images: The batch the throughput is measured on.
        reps: Batch-1 calls timed per backend.
        console: Where each row prints as it is measured (default: stderr).

    Returns:
        The document written to ``RUN/benchmark.json``: the machine, the settings and one row per backend.

    Raises:
        UserError: For a bad count or format, a missing extra, or a run that cannot be read.

    Without a test split, quality is scored on val with out-of-fold thresholds and ``macro_f1_carried`` is None.
    """
    if images < 1 or reps < 1:
        raise UserError(f"--images {images} / --reps {reps}: give 1 or more")
    formats = parse_formats(None) if formats is None else check_formats(tuple(formats))
    console = console or Console(stderr=True)
    run = RunDir.open(run_dir)
    split = run.recipe().calibrate.split  # the thresholds are re-fitted where the run fitted its own
    roles = tuple(dict.fromkeys([split, "val", "test"]))
    parts = build_from_run(run, roles, ["data.num_workers=0"])  # no fork after a converter started its threads
    batch = _sample(parts, images)
    rows: list[Row] = []
    model, info = run_classifier(run, parts)
    carried = np.asarray(info["thresholds"], dtype=np.float64) if info["thresholds"] is not None else None
    for backend, precision, fn, path in _backends(run, model, formats):
        outs = backend_outputs(fn, parts, [r for r in roles if r in parts.splits])
        quality = _quality(parts, outs, carried)
        med, p90, rate = timing(fn, batch[:1], batch, reps)
        rows.append(Row(backend, precision, path and str(path.relative_to(run.path)), _size(path), med, p90, rate))
        for key, value in quality.items():
            setattr(rows[-1], key, value)
        console.print(escape(_line(rows[-1])))
    doc = {
        "finetune_version": __version__,
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "images": images,
        "reps": reps,
        "scored_on": "test split" if "test" in parts.splits else "val split, out-of-fold thresholds",
        "rows": [asdict(r) for r in rows],
    }
    atomic_write_json(run / runfiles.BENCHMARK, doc)
    atomic_write_bytes(run / runfiles.BENCHMARK_PLOT, _plot(rows, parts.task.calibrates))
    return doc


HEADER = (
    "| backend | precision | file MiB | batch-1 ms (median) | p90 | batch img/s | held-out mAP | macro-F1 carried | "
    "re-fitted | top-1 |"
)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _line(r: Row) -> str:
    mib = "" if r.mib is None else f"{r.mib:.2f}"
    return (
        f"| {r.backend} | {r.precision} | {mib} | {r.b1_ms:.2f} | {r.b1_p90_ms:.2f} | {r.batch_ips:.0f} | "
        f"{_pct(r.map)} | {_pct(r.macro_f1_carried)} | {_pct(r.macro_f1_refit)} | {_pct(r.top1)} |"
    )


def benchmark_markdown(doc: dict[str, Any]) -> str:
    """``RUN/benchmark.json`` as a Markdown table."""
    lines = [HEADER, "|" + "---|" * 10]
    lines += [_line(Row(**r)) for r in doc["rows"]]
    return "\n".join(lines)


def _plot(rows: list[Row], multi: bool) -> bytes:
    """Held-out quality (mAP, or top-1) against batch-1 latency, one labelled point per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    quality: Callable[[Row], float | None] = (lambda r: r.map) if multi else (lambda r: r.top1)
    seen: dict[float, int] = {}  # backends of one quality (every fp32 file) get their labels stacked, not overlaid
    for r in rows:
        y = quality(r)
        if y is None:
            continue
        k = seen[round(y, 4)] = seen.get(round(y, 4), -1) + 1
        ax.scatter(r.b1_ms, 100 * y, marker="o" if r.precision == "fp32" else "s", s=40)
        label = f"{r.backend} {r.precision}"
        ax.annotate(label, (r.b1_ms, 100 * y), textcoords="offset points", xytext=(6, 4 - 11 * k), fontsize=8)
    ax.margins(x=0.15, y=0.2)
    if max(r.b1_ms for r in rows) > 5 * min(r.b1_ms for r in rows):
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")  # eager PyTorch is often several times the exported files
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch-1 latency, median (ms)")
    ax.set_ylabel("held-out mAP (%)" if multi else "held-out top-1 (%)")
    ax.set_title("Quality against latency, this machine")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
