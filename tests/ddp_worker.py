"""Run by the DDP tests under torchrun (2 processes, gloo): train, stop, resume, evaluate; dumps per-rank state.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py MODE RECIPE OUT [SET ...]

MODE: ``train`` (a run; each rank saves its weights at fit start and end to OUT/rank<r>.pt, and rank 0 the gathered
val predictions of best.pt to OUT/gathered.pt), ``interrupt`` (Ctrl-C after step 5, in epoch 2), ``resume`` (RECIPE is
the run directory), ``elastic`` (rank 1 SIGKILLs itself at the start of epoch 2 of torchrun's first attempt; run with
``--max-restarts 1``, the restarted workers resume).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from finetune import distributed
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.eval.predict import predict_loader
from finetune.train.assembly import build_from_run
from finetune.train.loop import Hook, Loop
from finetune.train.run import run_recipe
from finetune.train.rundir import RunDir


class Dump(Hook):
    """Each rank's model state (parameters and buffers) at fit start and fit end."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path, self.saved = out / f"rank{rank}.pt", {}

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        self.saved["start"] = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}

    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        self.saved["end"] = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
        torch.save(self.saved, self.path)


class Interrupt(Hook):
    """Ctrl-C after the fifth optimizer step (epoch 2's second of three), on every rank."""

    def on_step_end(self, loop: Loop) -> None:  # noqa: D102
        if loop.state.step == 5:
            raise KeyboardInterrupt


class KillRank1(Hook):
    """SIGKILL of rank 1 at the start of the second epoch, on torchrun's first attempt only (after rank 0's last.pt)."""

    def on_epoch_start(self, loop: Loop) -> None:  # noqa: D102
        if loop.epoch == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            torch.distributed.barrier()  # rank 0 has written epoch 1's last.pt
            if torch.distributed.get_rank() == 1:
                os.kill(os.getpid(), signal.SIGKILL)


def gathered_eval(run_dir: Path, out: Path, d: distributed.Dist) -> None:
    """best.pt on the val split, each rank predicting its shard, gathered (rank 0 saves it)."""
    parts = build_from_run(RunDir.open(run_dir), ["val"])
    parts.distributed = True  # this rank's shard of val
    mine = predict_loader(parts.model, parts.loader("val", shard=True), parts.eval_settings, allow_empty=True)
    joined = distributed.gather(mine, d)
    if d.main:
        torch.save({k: torch.as_tensor(v) for k, v in joined.items()}, out / "gathered.pt")


def main() -> None:
    """Parse the arguments and run the mode."""
    mode, target, out, *sets = sys.argv[1:]
    out = Path(out)
    d = distributed.setup("cpu")
    if mode == "resume":
        run_dir = Path(target)
        run_recipe(RunDir.open(run_dir).resume_recipe(), resume=run_dir, hooks=[Dump(out, d.rank)])
    else:
        extra = {"interrupt": [Interrupt()], "elastic": [KillRank1()]}.get(mode, [])
        hooks: list[Hook] = [Dump(out, d.rank), *extra]
        try:
            run_dir = run_recipe(load_recipe(target, sets), hooks=hooks)
        except UserError as err:
            if mode != "interrupt" or "interrupted" not in str(err):
                raise
        else:
            if mode == "train":
                gathered_eval(run_dir, out, d)
    distributed.teardown()


if __name__ == "__main__":
    main()
