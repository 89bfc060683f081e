"""Soak test (run by hand, not CI): kill short runs at random moments with random signals, resume, compare bitwise.

    python benchmarks/soak.py [--kills 30] [--seed 0] [--out /tmp/soak]

Each kill starts ``finetune run`` on a generated 48-image dataset (3 epochs, ``train.checkpoint_every = 1``, mixup,
EMA, dropout, one DataLoader worker), waits a random time inside the run, and sends one of: SIGINT, SIGTERM, SIGKILL
of the main process, SIGKILL of a DataLoader worker. It then resumes with ``finetune run --resume`` until the run ends
(a kill before the first checkpoint restarts it), and compares ``last.pt``'s weights and EMA weights with those of the
uninterrupted twin (same recipe and seed). It prints one line per kill and the totals; the target is every kill
ending bitwise equal to its twin.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from finetune.data.demo import write_demo

RECIPE = """
[data]
root = "{root}"
test = "test"
image_size = 32
batch_size = 8
num_workers = 1
[data.augment]
mixup = 0.4
[model]
name = "mobilenetv2_035"
drop_rate = 0.3
[optim]
lr = 1e-3
warmup_epochs = 0.5
[train]
epochs = 3
precision = "fp32"
checkpoint_every = 1
ema = 0.9
[output]
dir = "{runs}"
name = "twin"
html = false
"""
SIGNALS = ["SIGINT", "SIGTERM", "SIGKILL main", "SIGKILL worker"]
FINETUNE = [sys.executable, "-m", "finetune"]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    saved = torch.load(run / "last.pt", weights_only=True)
    return {"model": saved["model"], "eval_model": saved.get("eval_model", {})}


def _equal(a: dict, b: dict) -> bool:
    return all(a[p].keys() == b[p].keys() and all(torch.equal(a[p][k], b[p][k]) for k in a[p]) for p in a)


def _finish(recipe: Path, run: Path, name: str) -> int:
    """Resume (or restart) until the run has its report; returns how many commands that took."""
    for attempt in range(1, 4):
        if (run / "report.json").is_file():
            return attempt - 1
        if (run / "recipe.toml").is_file():
            cmd = [*FINETUNE, "run", "--resume", str(run)]
        else:
            cmd = [*FINETUNE, "run", str(recipe), "--set", f"output.name={name}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            print(f"    resume failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return 3


def main() -> None:
    """Run the kills and print the totals."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/soak"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root, runs = args.out / "data", args.out / "runs"
    if not root.is_dir():
        write_demo(root, {"train": 48, "val": 16, "test": 16}, size=48, seed=1)
    recipe = args.out / "soak.toml"
    recipe.write_text(RECIPE.format(root=root.as_posix(), runs=runs.as_posix()))
    twin = runs / "twin"
    start = time.perf_counter()
    timing = args.out / "twin_seconds.txt"
    if not (twin / "report.json").is_file() or not timing.is_file():
        shutil.rmtree(twin, ignore_errors=True)
        subprocess.run([*FINETUNE, "run", str(recipe)], check=True, capture_output=True, timeout=600)
        timing.write_text(f"{time.perf_counter() - start:.3f}")
    span = float(timing.read_text())
    reference, rows = _weights(twin), []
    print(f"twin: {span:.1f} s uninterrupted; killing {args.kills} runs at a random moment in [1 s, {span:.1f} s]")
    for k in range(args.kills):
        name, how, wait = f"kill{k:02d}", rng.choice(SIGNALS), rng.uniform(1.0, span)
        run = runs / name
        proc = subprocess.Popen(
            [*FINETUNE, "run", str(recipe), "--set", f"output.name={name}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # A process started in the background inherits SIGINT ignored, and Python then never raises Ctrl-C:
            # give the run the default disposition a terminal's foreground job has.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(wait)
        landed = proc.poll() is None
        if landed and how == "SIGKILL worker":
            workers = _children(proc.pid)
            landed = bool(workers)
            if workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
        elif landed:
            proc.send_signal(signal.SIGKILL if how == "SIGKILL main" else getattr(signal, how))
        _, err = proc.communicate(timeout=600)
        line = err.strip().splitlines()[-1] if err.strip() else ""
        one_line = proc.returncode in (0, -9) or (proc.returncode == 2 and "Traceback" not in err)
        resumes = _finish(recipe, run, name)
        equal = (run / "last.pt").is_file() and _equal(_weights(run), reference)
        rows.append(
            {
                "kill": name,
                "signal": how,
                "at_s": round(wait, 2),
                "landed": landed,
                "exit": proc.returncode,
                "one_line": one_line,
                "resumes": resumes,
                "bitwise": equal,
                "line": line[:160],
            }
        )
        print(
            f"{name} {how:15s} at {wait:5.1f} s  landed={landed!s:5}  exit={proc.returncode:3d}  "
            f"resumes={resumes}  bitwise={equal}  {line[:90]}"
        )
    elapsed = time.perf_counter() - start
    landed = [r for r in rows if r["landed"]]
    print(
        f"\n{len(rows)} kills, {len(landed)} landed while running; bitwise equal to the twin: "
        f"{sum(r['bitwise'] for r in rows)}/{len(rows)} ({sum(r['bitwise'] for r in landed)}/{len(landed)} of those "
        f"that landed); one-line exits: {sum(r['one_line'] for r in rows)}/{len(rows)}; {elapsed / 60:.1f} min"
    )
    by = {s: [r for r in landed if r["signal"] == s] for s in SIGNALS}
    print("  " + ", ".join(f"{s}: {sum(r['bitwise'] for r in v)}/{len(v)}" for s, v in by.items()))
    (args.out / "soak.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
