"""The loop itself, in process: an interrupted and resumed run equals an uninterrupted one."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import trainer, training
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.rundir import RunDir


@pytest.mark.parametrize("extra", [[], ["data.augment.mixup=0.4", "model.drop_path_rate=0.2"]], ids=["plain", "mixup"])
def test_resume_is_exact(extra: list[str], tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = training.run(load_recipe(tiny_recipe, ["train.epochs=2", "output.name=straight", *extra]))

    real = trainer.train_one_epoch

    def interrupt_in_epoch_2(*args, **kwargs):
        if args[0].state.epoch == 1:  # state.epoch == epochs completed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt_in_epoch_2)
    with pytest.raises(UserError, match="interrupted; continue with `finetune run --resume"):
        training.run(load_recipe(tiny_recipe, ["train.epochs=2", "output.name=cut", *extra]))
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


def test_hflip_tta_averages_the_logits_of_the_image_and_its_mirror() -> None:
    from finetune.loop import EvalSettings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    batch = {"image": images, "target": torch.zeros(6, 5), "index": torch.arange(6), "errors": []}
    batch["norm"] = [[0.5] * 3] * 2
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(3))
    settings = EvalSettings(device=torch.device("cpu"))
    out = trainer.predict(model, [batch], settings)
    np.testing.assert_allclose(out["probs"], torch.sigmoid(plain).numpy(), atol=1e-6)
    settings.tta = "hflip"
    out = trainer.predict(model, [batch], settings)
    np.testing.assert_allclose(out["probs"], torch.sigmoid((plain + mirrored) / 2).numpy(), atol=1e-6)
    assert not np.allclose(torch.sigmoid(plain).numpy(), out["probs"], atol=1e-4)  # the mirror changed something
