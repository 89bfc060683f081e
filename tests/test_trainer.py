"""The loop itself, in process: an interrupted and resumed run equals an uninterrupted one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.eval.predict import predict_loader
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe
from finetune.train import fit as trainer
from finetune.train.loop import Hook


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["data.augment.mixup=0.4", "model.drop_path_rate=0.2", "train.ema=0.9"]],  # EMA: its copy must not draw RNG
    ids=["plain", "mixup-droppath-ema"],
)
def test_resume_is_exact(extra: list[str], tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = run_recipe(load_recipe(tiny_recipe, ["train.epochs=2", "output.name=straight", *extra]))

    real = trainer.train_one_epoch

    def interrupt_in_epoch_2(*args, **kwargs):
        if args[0].state.epoch == 1:  # state.epoch == epochs completed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt_in_epoch_2)
    with pytest.raises(UserError, match="interrupted; continue with `finetune run --resume"):
        run_recipe(load_recipe(tiny_recipe, ["train.epochs=2", "output.name=cut", *extra]))
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    cut = tmp_path / "runs" / "cut"
    run_recipe(RunDir.open(cut).recipe(), resume=cut)

    def metrics(d: Path) -> list[dict]:
        return [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]

    a, b = metrics(straight), metrics(cut)
    assert [m["epoch"] for m in b] == [1, 2]
    for key in ("train_loss", "val_loss", "val_map", "lr", "step"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    wa = torch.load(straight / "last.pt", weights_only=True)["model"]
    wb = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_mixup_matches_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    from timm.data import Mixup

    x, y = torch.randn(6, 3, 8, 8), (torch.rand(6, 5) > 0.5).float()
    mixed, soft = trainer.mix_batch(x, y, 0.4, (3, 1, 2))
    lam = float(np.random.default_rng([3, 1, 2]).beta(0.4, 0.4))
    assert 0.0 < lam < 1.0 and not torch.equal(mixed, x)
    ref = Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=5, multi_label=True)
    monkeypatch.setattr(ref, "_params_per_batch", lambda: (lam, False))
    ref_x, ref_y = ref(x.clone(), y)
    torch.testing.assert_close(mixed, ref_x)
    torch.testing.assert_close(soft, ref_y)
    again, _ = trainer.mix_batch(x, y, 0.4, (3, 1, 2))
    assert torch.equal(again, mixed)  # the same (seed, epoch, batch) draws the same lam
    other, _ = trainer.mix_batch(x, y, 0.4, (3, 1, 3))
    assert not torch.equal(other, mixed)


def test_grad_accumulation_and_clipping_run(tiny_recipe: Path) -> None:
    run_dir = run_recipe(load_recipe(tiny_recipe, ["train.accum_steps=2", "train.grad_clip=1.0", "output.name=acc"]))
    (line,) = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 2  # 3 batches of 8 -> ceil(3 / 2) optimizer steps


class _ConvDtypes(Hook):
    """Records the dtype of the first convolution's output in every training forward."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_fit_start(self, loop) -> None:  # noqa: ANN001
        conv = next(m for m in loop.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype) if m.training else None)


@pytest.mark.slow
def test_bf16_autocast_on_cpu(tiny_recipe: Path) -> None:
    """bf16 really runs the convolutions in bf16, and lands near (not on) the fp32 run's loss."""
    seen = {p: _ConvDtypes() for p in ("bf16", "fp32")}
    losses = {}
    for precision, hook in seen.items():
        run_dir = run_recipe(
            load_recipe(tiny_recipe, [f"train.precision={precision}", f"output.name={precision}"]), hooks=[hook]
        )
        (line,) = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = line["train_loss"]
    assert seen["bf16"].dtypes == {torch.bfloat16} and seen["fp32"].dtypes == {torch.float32}
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_gradient_clipping_bounds_the_update(clip: float) -> None:
    """With SGD at lr 1 and no momentum, one step moves the weights by exactly the clipped gradient."""
    from finetune.train.loop import FitSettings, Loop

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batch = {"image": torch.randn(4, 3, 2, 2) * 10, "target": torch.ones(4, 3), "index": torch.arange(4), "errors": []}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loop = Loop(
        model=model,
        loss_fn=torch.nn.BCEWithLogitsLoss(),
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        train_loader=[batch],
        val_loader=[batch],
        settings=FitSettings(device=torch.device("cpu"), epochs=1, grad_clip=clip),
        run_dir=Path("unused"),
    )
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    loop.loss_fn(model(batch["image"]), batch["target"]).backward()
    raw = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
    trainer.train_one_epoch(loop)
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before))).item()
    assert raw > 0.05 * 4
    assert moved == pytest.approx(clip if clip else raw, rel=1e-4)


def test_fp16_on_cpu_is_a_user_error(tiny_recipe: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(UserError, match='train.precision: "fp16" needs a CUDA GPU'):
        run_recipe(load_recipe(tiny_recipe, ["train.precision=fp16"]))


def test_hflip_tta_averages_the_logits_of_the_image_and_its_mirror() -> None:
    from finetune.eval.predict import EvalSettings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    batch = {"image": images, "target": torch.zeros(6, 5), "index": torch.arange(6), "errors": []}
    batch["norm"] = [[0.5] * 3] * 2
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(3))
    settings = EvalSettings(device=torch.device("cpu"))
    out = predict_loader(model, [batch], settings)
    np.testing.assert_allclose(out.probs, torch.sigmoid(plain).numpy(), atol=1e-6)
    settings.tta = "hflip"
    out = predict_loader(model, [batch], settings)
    np.testing.assert_allclose(out.probs, torch.sigmoid((plain + mirrored) / 2).numpy(), atol=1e-6)
    assert not np.allclose(torch.sigmoid(plain).numpy(), out.probs, atol=1e-4)  # the mirror changed something


class _FirstLr(Hook):
    """The top group's LR when training starts (after a resume has restored and re-planned the schedule)."""

    lr = None

    def on_fit_start(self, loop) -> None:  # noqa: ANN001
        self.lr = loop.optimizer.param_groups[-1]["lr"]


@pytest.mark.slow
def test_resume_with_more_epochs_replans_the_schedule_and_says_so(tiny_recipe: Path) -> None:
    import io

    from rich.console import Console

    from finetune.optim import warmup_cosine_factor

    run_dir = run_recipe(load_recipe(tiny_recipe, ["output.name=short", "optim.warmup_epochs=0"]))
    buf, first = io.StringIO(), _FirstLr()
    recipe = RunDir.open(run_dir).resume_recipe(["train.epochs=3"])
    run_recipe(recipe, resume=run_dir, console=Console(file=buf, width=300), hooks=[first])
    text = buf.getvalue()
    # 24 images / 8 = 3 steps per epoch: the old plan ended at step 3 (LR 0), the new one is 9 steps long.
    assert "train.epochs = 3: the LR schedule is re-planned over 3 epochs, not continued" in text
    assert first.lr == pytest.approx(1e-3 * warmup_cosine_factor(3, 9, 0, 0.01, 0.0), rel=1e-12)
    assert "goes from 0 to" in text


FAULTS = """
import resource, torch
from finetune.allocator import reuse_freed_memory
print(reuse_freed_memory())
def step():  # what each training step does with its activations: 64 MB, above glibc's largest mmap threshold
    x = torch.empty(16 * 2**20); x.fill_(1.0)
for _ in range(5):  # the heap grows to what a step needs
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_memory_is_reused_without_page_faults_unless_turned_off() -> None:
    """20 steps allocating 64 MB: glibc maps fresh pages every step (16,384 faults each); reuse, a few."""
    import os
    import subprocess
    import sys

    faults = {}
    for setting in ("reuse", "default"):
        env = {**os.environ, "FINETUNE_MALLOC": setting}
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        assert applied == str(setting == "reuse")
        faults[setting] = int(count)
    assert faults["default"] > 200_000 and faults["reuse"] < faults["default"] / 4, faults  # a few steps, not every
