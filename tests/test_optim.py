import math

import pytest
import torch

from finetune.optim import create_optimizer, create_scheduler, warmup_cosine_factor


def test_schedule_shape() -> None:
    f = [warmup_cosine_factor(s, 100, 10, 0.01, 0.0) for s in range(101)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0)
    assert f[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert f[55] == pytest.approx(0.5)  # cosine midpoint
    assert f[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(f[:10], f[1:11])) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_every_group_follows_the_schedule_proportionally() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 8, 8))
    opt = create_optimizer(model, "adamw", lr=0.1, weight_decay=0.05)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.05]  # norm weights and biases get no weight decay
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0)
    assert all(p.ndim <= 1 for p in no_decay["params"])
    sched = create_scheduler(opt, total_steps=20, warmup_steps=4, warmup_factor=0.1, min_factor=0.0)
    for step in range(20):
        expected = 0.1 * warmup_cosine_factor(step, 20, 4, 0.1, 0.0)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expected)
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.0, abs_tol=1e-12)


def test_sgd_has_momentum() -> None:
    opt = create_optimizer(torch.nn.Linear(2, 2), "sgd", lr=0.1, momentum=0.8)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
