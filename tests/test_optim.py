import math

import pytest
import timm
import torch

from finetune.groups import layer_groups
from finetune.optim import (
    create_optimizer,
    create_scheduler,
    group_lrs,
    group_multipliers,
    param_groups,
    warmup_cosine_factor,
    whole_model_groups,
)


def test_schedule_shape() -> None:
    f = [warmup_cosine_factor(s, 100, 10, 0.01, 0.0) for s in range(101)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0)
    assert f[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert f[55] == pytest.approx(0.5)  # cosine midpoint
    assert f[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(f[:10], f[1:11])) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_whole_model_groups_skip_decay_on_norms_and_biases() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 8, 8))
    opt = create_optimizer(whole_model_groups(model, 0.1, 0.05), "adamw", lr=0.1)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.05]
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0)
    assert all(p.ndim <= 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4


def test_layer_decay_and_lr_mult() -> None:
    groups = layer_groups(timm.create_model("mobilenetv2_035", num_classes=3))
    names = [g.name for g in groups]  # stem, blocks.0-6, head, classifier
    mult = group_multipliers(groups, layer_decay=0.5)
    assert mult["classifier"] == 1.0 and mult["head"] == 0.5 and mult["blocks.6"] == 0.25
    assert mult["stem"] == pytest.approx(0.5 ** (len(names) - 1))
    mult = group_multipliers(groups, lr_mult={"stem": 0.01, "blocks.0:4": 0.1, "head": 2.0})
    assert [mult[n] for n in names] == [0.01, 0.1, 0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 2.0, 1.0]


def test_every_group_follows_the_schedule_times_its_multiplier() -> None:
    model = timm.create_model("mobilenetv2_035", num_classes=3)
    groups = layer_groups(model)
    mult = group_multipliers(groups, layer_decay=0.7)
    opt = create_optimizer(param_groups(model, groups, mult, 0.1, 0.05), "adamw", lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.0 if g["group_name"].endswith(".no_decay") else 0.05)
        if g["weight_decay"] == 0.0:
            assert all(p.ndim <= 1 for p in g["params"])
    sched = create_scheduler(opt, total_steps=20, warmup_steps=4, warmup_factor=0.1, min_factor=0.0)
    for step in range(20):
        factor = warmup_cosine_factor(step, 20, 4, 0.1, 0.0)
        for name, lr in group_lrs(opt).items():
            assert lr == pytest.approx(0.1 * mult[name] * factor)
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.0, abs_tol=1e-12)


def test_sgd_takes_classic_momentum_steps() -> None:
    """Two steps on a constant gradient g: classic momentum moves by lr*g, then lr*1.8g (Nesterov: 1.8g, 2.44g)."""
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    opt = create_optimizer(whole_model_groups(layer, 0.1, 0.0), "sgd", lr=0.1, momentum=0.8)
    g = torch.tensor([[0.5, 1.0]])
    seen = [layer.weight.detach().clone()]
    for _ in range(2):
        layer.weight.grad = g.clone()
        opt.step()
        seen.append(layer.weight.detach().clone())
    torch.testing.assert_close(seen[1] - seen[0], -0.1 * g)
    torch.testing.assert_close(seen[2] - seen[1], -0.1 * 1.8 * g)
