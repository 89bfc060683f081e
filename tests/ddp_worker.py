"""Run by the DDP tests under torchrun (2 processes, gloo): train, stop, resume, evaluate; dumps per-rank state.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py MODE RECIPE OUT [SET ...]

MODE: ``train`` (a run; each rank saves its weights at fit start and end to OUT/rank<r>.pt, and rank 0 the gathered
val predictions of best.pt to OUT/gathered.pt), ``elastic`` (rank 1 SIGKILLs itself after step 5, mid-epoch 2, on
torchrun's first attempt; run with ``--max-restarts 1``: the restarted workers resume from the newest checkpoint).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from finetune import distributed
from finetune.assembly import build_from_run
from finetune.config import load_recipe
from finetune.eval.predict import predict_loader
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe
from finetune.train.loop import Hook, Loop


class Dump(Hook):
    """Each rank's model state (parameters and buffers) at fit start and fit end."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path, self.saved = out / f"rank{rank}.pt", {}

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        self.saved["start"] = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}

    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        self.saved["end"] = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
        torch.save(self.saved, self.path)


class KillRank1(Hook):
    """SIGKILL of rank 1 after step 5 (epoch 2's second of three), on torchrun's first attempt only."""

    def on_step_end(self, loop: Loop) -> None:  # noqa: D102
        if loop.state.step == 5 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            torch.distributed.barrier()  # rank 0 has written step 4's checkpoint
            if torch.distributed.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)


def gathered_eval(run_dir: Path, out: Path, d: distributed.Dist) -> None:
    """best.pt on the val split, each rank predicting its shard, gathered (rank 0 saves it)."""
    parts = build_from_run(RunDir.open(run_dir), ["val"], distributed=True)  # this rank's shard of val
    mine = predict_loader(parts.model, parts.loader("val", shard=True), parts.eval_settings, allow_empty=True)
    joined = distributed.gather(mine, d)
    if d.main:
        torch.save({k: torch.as_tensor(getattr(joined, k)) for k in ("probs", "targets", "index")}, out / "gathered.pt")


def main() -> None:
    """Parse the arguments and run the mode."""
    mode, target, out, *sets = sys.argv[1:]
    out = Path(out)
    d = distributed.setup("cpu")
    hooks: list[Hook] = [Dump(out, d.rank)] + ([KillRank1()] if mode == "elastic" else [])
    run_dir = run_recipe(load_recipe(target, sets), hooks=hooks)
    if mode == "train":
        gathered_eval(run_dir, out, d)
    distributed.teardown()


if __name__ == "__main__":
    main()
