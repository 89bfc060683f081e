"""Every export backend on one run, on real JPEGs: file size, latency, throughput and held-out quality.

    python benchmarks/export_speed.py [--run RUN ...] [--out DIR] [--reps 50]

A thin caller of ``finetune benchmark`` (:func:`finetune.deploy.benchmark.benchmark_run`), which a user runs on
their own run; this script adds the two reference runs and the ONNX exporter check.

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
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer import COCO_SMALL, FLAGSHIP, WEIGHTS, make_root  # noqa: E402

from finetune import runfiles  # noqa: E402
from finetune.config import load_recipe  # noqa: E402
from finetune.deploy.benchmark import benchmark_markdown, benchmark_run, timing  # noqa: E402
from finetune.deploy.export import onnx_backend, run_classifier  # noqa: E402
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


def exporter_check(run_dir: Path, reps: int) -> None:
    """The TorchScript-based ONNX exporter vs ``torch.onnx.export(dynamo=True)``: outputs, graph size, latency."""
    import onnx

    model, _ = run_classifier(RunDir.open(run_dir))
    x = torch.randint(
        0, 256, (4, model.size, model.size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    legacy = (run_dir / runfiles.BENCHMARK_DIR / "onnx" / "model.onnx").read_bytes()  # benchmark_run exported it
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
            prog.save(str(run_dir / runfiles.BENCHMARK_DIR / "onnx" / "model.dynamo.onnx"))
        dynamo = (run_dir / runfiles.BENCHMARK_DIR / "onnx" / "model.dynamo.onnx").read_bytes()
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
        doc = benchmark_run(run_dir, images=32, reps=args.reps)
        print(f"\n## {name} ({run_dir}, scored on the {doc['scored_on']})\n\n{benchmark_markdown(doc)}", flush=True)
    print("\n## ONNX exporter\n")
    exporter_check(runs[0], args.reps)


if __name__ == "__main__":
    main()
