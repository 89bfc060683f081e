"""The loop itself, in process: an interrupted and resumed run equals an uninterrupted one."""

import json
import math
from pathlib import Path

import pytest
import torch

from finetune import trainer, training
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.rundir import RunDir


def test_resume_is_exact(tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = training.run(load_recipe(tiny_recipe, ["train.epochs=2", "output.name=straight"]))

    real = trainer.train_one_epoch

    def interrupt_in_epoch_2(*args, **kwargs):
        if args[0].state.epoch == 1:  # state.epoch == epochs completed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt_in_epoch_2)
    with pytest.raises(UserError, match="interrupted; continue with `finetune run --resume"):
        training.run(load_recipe(tiny_recipe, ["train.epochs=2", "output.name=cut"]))
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    cut = tmp_path / "runs" / "cut"
    training.run(RunDir.open(cut).recipe(), resume=cut)

    def metrics(d: Path) -> list[dict]:
        return [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]

    a, b = metrics(straight), metrics(cut)
    assert [m["epoch"] for m in b] == [1, 2]
    for key in ("train_loss", "val_loss", "val_map", "lr", "step"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    wa = torch.load(straight / "last.pt", weights_only=True)["model"]
    wb = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grad_accumulation_and_clipping_run(tiny_recipe: Path) -> None:
    run_dir = training.run(load_recipe(tiny_recipe, ["train.accum_steps=2", "train.grad_clip=1.0", "output.name=acc"]))
    (line,) = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 2  # 3 batches of 8 -> ceil(3 / 2) optimizer steps


def test_bf16_autocast_on_cpu(tiny_recipe: Path) -> None:
    run_dir = training.run(load_recipe(tiny_recipe, ["train.precision=bf16", "output.name=bf16"]))
    (line,) = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(line["train_loss"]) and math.isfinite(line["val_loss"])


def test_fp16_on_cpu_is_a_user_error(tiny_recipe: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(UserError, match='train.precision: "fp16" needs a CUDA GPU'):
        training.run(load_recipe(tiny_recipe, ["train.precision=fp16"]))
