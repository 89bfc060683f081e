"""Every export backend on one run, on real JPEGs: file size, latency, throughput and held-out quality.

    python benchmarks/export_speed.py [--run RUN ...] [--out DIR] [--reps 50]

Without ``--run`` it trains two flagship runs on ../shared/data/coco-small at 224 px (val2017 split in halves as in
``benchmarks/transfer.py``: val selects and calibrates, test2017 is only scored): efficientnet_lite0 from the real
ImageNet weights, and mobilenetv2_100 from scratch (no ImageNet weights for it here: its quality numbers say
nothing, its speed and size do). For each run it exports ONNX fp32 + INT8, and LiteRT and OpenVINO fp32 + INT8
where the extras are installed, then for each backend (and PyTorch eager) prints:

- file size; batch-1 latency (median, p90 over ``--reps`` calls on one real image); batch-32 images/s;
- test mAP and macro-F1, with the fp32 thresholds carried over and with thresholds re-fitted on the backend's own
  val probabilities (the run's calibration settings).

All backends run in this process, one after another, with the machine's cores (torch, onnxruntime, OpenVINO and
LiteRT each use them all). The ONNX exporter check (TorchScript-based vs ``dynamo=True``) prints at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer import COCO_SMALL, FLAGSHIP, WEIGHTS, make_root  # noqa: E402

from finetune.assembly import build_from_run  # noqa: E402
from finetune.config import load_recipe  # noqa: E402
from finetune.deploy import mobile  # noqa: E402
from finetune.deploy.export import export_run, onnx_backend, run_classifier  # noqa: E402
from finetune.deploy.quantize import backend_outputs, refit  # noqa: E402
from finetune.errors import UserError  # noqa: E402
from finetune.eval.metrics import summarize  # noqa: E402
from finetune.rundir.directory import RunDir  # noqa: E402
from finetune.runs.run import run_recipe  # noqa: E402


def train(out: Path, model: str) -> Path:
    """A flagship run at 224 px (lite0: real ImageNet weights; mobilenetv2_100: from scratch, 6 epochs)."""
    root = make_root(out, 0)
    sets = [f'data.root="{root}"', f'model.name="{model}"', "model.pretrained=false", 'data.test="test2017"']
    sets += ["data.image_size=224", "data.num_workers=2", f'output.dir="{out}/runs"', f'output.name="{model}-224"']
    if model == "efficientnet_lite0":
        sets.append(f'model.checkpoint="{WEIGHTS}"')
    else:
        sets += ["freeze.stages=[]", 'freeze.bn="none"', "optim.lr=3e-3", "train.ema=0.0", "train.epochs=6"]
    return run_recipe(load_recipe(FLAGSHIP, sets))


def backends(run_dir: Path) -> dict[str, tuple[Any, Path | None]]:
    """Backend name -> (uint8 NHWC -> probabilities, file), exporting what the installed extras allow."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        export_run(run_dir, "onnx", int8=True)
    ex = run_dir / "export"
    model, _ = run_classifier(RunDir.open(run_dir))

    @torch.inference_mode()
    def eager(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()

    out: dict[str, tuple[Any, Path | None]] = {"pytorch eager fp32": (eager, None)}
    for name, file in (("onnx fp32", "model.onnx"), ("onnx int8", "model.int8.onnx")):
        out[name] = (onnx_backend((ex / file).read_bytes()), ex / file)
    for fmt in ("litert", "openvino"):
        try:
            mobile.require(fmt)
        except UserError as err:  # a missing extra: say so and go on
            print(f"{fmt}: skipped ({err})")
            continue
        with quiet:
            result = export_run(run_dir, fmt, int8=True, card=False)
        for prec, path in (
            ("fp32", result.path),
            ("int8", result.path.with_name(f"{result.path.stem}.int8{result.path.suffix}")),
        ):
            if fmt == "litert":
                out[f"litert {prec}"] = (mobile.litert_backend(path), path)
            else:
                out[f"openvino {prec}"] = (mobile.openvino_backend(path)[0], path)
    return out


def _size(path: Path | None) -> float:
    if path is None:
        return float("nan")
    total = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)
    return total / 2**20


def timing(fn: Any, image: np.ndarray, batch: np.ndarray, reps: int) -> tuple[float, float, float]:
    """Batch-1 latency median and p90 (ms), and batch-32 images/s."""
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


def quality(fn: Any, parts: Any, carried: np.ndarray) -> dict[str, float]:
    """Test mAP and macro-F1 at the carried (fp32) thresholds and at thresholds re-fitted on this backend's val."""
    outs = backend_outputs(fn, parts, ["val", "test"])
    with contextlib.redirect_stdout(io.StringIO()):
        own, _ = refit(parts, outs)
    y, p = outs["test"]["targets"], outs["test"]["probs"]
    at_carried, at_own = summarize(y, p, carried), summarize(y, p, own)
    return {"map": at_carried["map"], "f1_carried": at_carried["macro_f1"], "f1_refit": at_own["macro_f1"]}


def bench_run(run_dir: Path, reps: int) -> list[dict[str, Any]]:
    """One row per backend."""
    parts = build_from_run(RunDir.open(run_dir), ("val", "test"), ["data.num_workers=0"])  # no fork after JAX
    carried = np.array([c["threshold"] for c in RunDir.open(run_dir).read_json("thresholds.json")["classes"]])
    images = np.concatenate(list(_first_batches(parts, 32)))[:32]
    rows = []
    for name, (fn, path) in backends(run_dir).items():
        med, p90, rate = timing(fn, images[:1], images, reps)
        rows.append(
            {
                "backend": name,
                "MiB": _size(path),
                "b1_ms": med,
                "b1_p90": p90,
                "b32_ips": rate,
                **quality(fn, parts, carried),
            }
        )
        print(_fmt(rows[-1]), flush=True)
    return rows


def _first_batches(parts: Any, n: int):
    from finetune.deploy.quantize import nhwc_batches

    got = 0
    for images, _ in nhwc_batches(parts.loader("test")):
        yield images
        got += len(images)
        if got >= n:
            return


HEAD = "| backend | file MiB | batch-1 ms (median) | p90 | batch-32 img/s | test mAP | macro-F1 carried | re-fitted |"


def _fmt(r: dict[str, Any]) -> str:
    return (
        f"| {r['backend']} | {r['MiB']:.2f} | {r['b1_ms']:.2f} | {r['b1_p90']:.2f} | {r['b32_ips']:.0f} | "
        f"{100 * r['map']:.1f} | {100 * r['f1_carried']:.1f} | {100 * r['f1_refit']:.1f} |"
    )


def exporter_check(run_dir: Path, reps: int) -> None:
    """The TorchScript-based ONNX exporter vs ``torch.onnx.export(dynamo=True)``: outputs, graph size, latency."""
    import onnx

    model, _ = run_classifier(RunDir.open(run_dir))
    x = torch.randint(
        0, 256, (4, model.size, model.size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    legacy = (run_dir / "export" / "model.onnx").read_bytes()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                input_names=["image"],
                output_names=["probabilities"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
            )
            prog.save(str(run_dir / "export" / "model.dynamo.onnx"))
        dynamo = (run_dir / "export" / "model.dynamo.onnx").read_bytes()
    except Exception as err:  # noqa: BLE001 - report the exporter's failure and keep the legacy one
        print(f"dynamo=True: failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
        return
    ref = model(x).detach().numpy()
    for name, data in (("torchscript-based", legacy), ("dynamo=True", dynamo)):
        fn = onnx_backend(data)
        med, p90, rate = timing(fn, x[:1].numpy(), x.numpy().repeat(8, 0), reps)
        nodes = len(onnx.load_from_string(data).graph.node)
        diff = np.abs(fn(x.numpy()) - ref).max()
        print(
            f"{name}: {len(data) / 2**20:.2f} MiB, {nodes} nodes, batch-1 {med:.2f} ms (p90 {p90:.2f}), "
            f"batch-32 {rate:.0f} img/s, max |p - eager| {diff:.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, action="append", help="an existing run directory (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/finetune-export-bench"))
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if not COCO_SMALL.is_dir():
        sys.exit(f"{COCO_SMALL}: not found (this benchmark needs ../shared)")
    runs = args.run or [train(args.out, m) for m in ("efficientnet_lite0", "mobilenetv2_100")]
    for run_dir in runs:
        name = RunDir.open(run_dir).recipe().model.name
        print(f"\n## {name} ({run_dir})\n\n{HEAD}\n|" + "---|" * 8, flush=True)
        bench_run(run_dir, args.reps)
    print("\n## ONNX exporter\n")
    exporter_check(runs[0], args.reps)


if __name__ == "__main__":
    main()
