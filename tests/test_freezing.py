"""Freezing on a real MobileNetV2: frozen weights and BN statistics stay bitwise fixed, stages unfreeze, LRs follow."""

import json
from pathlib import Path

import pytest
import timm
import torch

from finetune.assembly import build_run
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.groups import layer_groups
from finetune.hooks.freezing import BNStatsDrift, FreezePolicy, Stage, plan_stages
from finetune.optim import create_optimizer, group_multipliers, param_groups, warmup_cosine_factor
from finetune.runs.run import run_recipe, seed_everything

from .conftest import interrupt_then_resume
from .helpers import NO_AUGMENT, plain_and_cached

TOP = ("blocks.5", "blocks.6", "head", "classifier")


def _setup(bn: str = "frozen", train_bn: bool = False):
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_035", num_classes=3, drop_rate=0.0)
    groups = layer_groups(model)
    names = tuple(g.name for g in groups)
    stages = [Stage(0, 1, ("classifier",)), Stage(1, 2, TOP), Stage(2, 3, names)]
    policy = FreezePolicy(model, groups, stages, bn=bn, train_bn=train_bn)
    opt = create_optimizer(param_groups(model, groups, group_multipliers(groups), 0.01, 0.05), "adamw", 0.01)
    return model, groups, policy, opt


def _steps(model, policy, opt, n: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        model.train()  # what the trainer does every epoch: must not unfreeze BN statistics
        x = torch.randn(4, 3, 32, 32, generator=gen) * 2 + 0.5
        y = (torch.rand(4, 3, generator=gen) > 0.5).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(before, model, prefix: str) -> list[str]:
    now = model.state_dict()
    return [k for k in now if k.startswith(prefix) and not torch.equal(before[k], now[k])]


def _group_prefix(name: str) -> tuple[str, ...]:
    return {"stem": ("conv_stem.", "bn1."), "head": ("conv_head.", "bn2."), "classifier": ("classifier.",)}.get(
        name, (name + ".",)
    )


def _changed_in(before, model, group: str, kind: str) -> list[str]:
    keys = [k for p in _group_prefix(group) for k in _changed(before, model, p)]
    stats = [k for k in keys if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    return stats if kind == "stats" else [k for k in keys if k not in stats]


def test_stages_freeze_weights_and_bn_stats_bitwise_then_unfreeze() -> None:
    model, groups, policy, opt = _setup()
    before = _snapshot(model)
    policy.apply(0)
    assert policy.prefix == len(groups) - 1  # everything below the classifier runs under no_grad
    _steps(model, policy, opt)
    policy.check_bn(0)
    for g in groups[:-1]:
        assert not _changed_in(before, model, g.name, "params"), g.name
        assert not _changed_in(before, model, g.name, "stats"), g.name
    assert _changed_in(before, model, "classifier", "params")

    before = _snapshot(model)
    policy.apply(1)
    _steps(model, policy, opt)
    policy.check_bn(1)
    for g in groups:
        params, stats = _changed_in(before, model, g.name, "params"), _changed_in(before, model, g.name, "stats")
        if g.name in TOP:
            assert params, g.name  # newly unfrozen: weights move
            assert stats or g.name == "classifier", g.name  # ... and so do their BN statistics
        else:
            assert not params and not stats, g.name

    before = _snapshot(model)
    policy.apply(2)
    _steps(model, policy, opt)
    assert _changed_in(before, model, "stem", "params") and _changed_in(before, model, "stem", "stats")


def test_bn_none_lets_frozen_groups_update_their_statistics_but_not_their_weights() -> None:
    model, groups, policy, opt = _setup(bn="none")
    before = _snapshot(model)
    policy.apply(0)
    _steps(model, policy, opt)
    assert _changed_in(before, model, "blocks.2", "stats")
    assert not _changed_in(before, model, "blocks.2", "params")


def test_bn_all_freezes_statistics_of_trainable_groups_too() -> None:
    model, groups, policy, opt = _setup(bn="all")
    before = _snapshot(model)
    policy.apply(2)  # everything trains
    _steps(model, policy, opt)
    policy.check_bn(2)
    assert _changed_in(before, model, "stem", "params")
    assert not any(_changed_in(before, model, g.name, "stats") for g in groups)


def test_train_bn_trains_only_the_affine_parameters_of_frozen_groups() -> None:
    model, groups, policy, opt = _setup(train_bn=True)
    before = _snapshot(model)
    policy.apply(0)
    assert policy.prefix == 0  # the stem's BN affine trains, so nothing can run without gradients
    _steps(model, policy, opt)
    policy.check_bn(0)
    changed = _changed_in(before, model, "blocks.2", "params")
    assert changed and all(".bn" in k for k in changed)
    assert not _changed_in(before, model, "blocks.2", "stats")


def test_drift_is_detected_and_the_hook_is_what_prevents_it() -> None:
    model, groups, policy, opt = _setup()
    policy.apply(0)
    policy.remove()  # without the pre-forward hook, model.train() puts frozen BN layers back into training mode
    _steps(model, policy, opt, n=1)
    with pytest.raises(BNStatsDrift, match="frozen BatchNorm layer"):
        policy.check_bn(0)


def test_frozen_prefix_forward_gives_the_same_output_and_gradients() -> None:
    model, groups, policy, opt = _setup()
    policy.apply(1)
    assert policy.prefix == len(groups) - 4  # stem, blocks.0-4
    model.train()
    x = torch.randn(4, 3, 32, 32)
    bn_state = _snapshot(model)
    y_full = model(x)
    y_full.sum().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.zero_grad(set_to_none=True)
    model.load_state_dict(bn_state)  # the first forward updated the trainable groups' BN statistics
    y_pref = policy.forward(x)
    y_pref.sum().backward()
    pref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(y_full, y_pref, atol=1e-6)
    assert full.keys() == pref.keys() and all(torch.allclose(full[k], pref[k], atol=1e-6) for k in full)


def test_plan_stages() -> None:
    assert plan_stages([(2, []), (3, []), (None, [])], 10) == [(0, 2), (2, 5), (5, 10)]
    with pytest.raises(ValueError, match="add up to 5 epochs but train.epochs = 6"):
        plan_stages([(2, []), (3, [])], 6)
    with pytest.raises(ValueError, match="take 5 of train.epochs = 5"):
        plan_stages([(2, []), (3, []), (None, [])], 5)


STAGES = (
    'freeze.stages=[{epochs = 1, train = ["classifier"]}, {epochs = 2, train = ["blocks.5:", "head", "classifier"]},'
    ' {train = ["all"]}]'
)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_run_logs_each_groups_lr_as_base_times_multiplier_times_schedule(tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe, ["train.epochs=4", STAGES, "optim.layer_decay=0.5", "output.name=lrs"])
    lines = _metrics(run_recipe(recipe))
    assert [m["stage"] for m in lines] == [1, 2, 2, 3]
    names = list(lines[0]["lr_groups"])
    total, warmup = lines[-1]["step"], round(0.5 * lines[0]["step"])
    for m in lines:
        factor = warmup_cosine_factor(m["step"], total, warmup, 0.01, 0.0)
        for i, name in enumerate(names):
            assert m["lr_groups"][name] == pytest.approx(1e-3 * 0.5 ** (len(names) - 1 - i) * factor, abs=1e-15)
    assert all(m["bn_frozen_checksum"] != 0 for m in lines[:3]) and lines[3]["bn_frozen_checksum"] == 0


@pytest.mark.slow
def test_resume_inside_stage_2_is_exact(tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = ["train.epochs=4", STAGES, "optim.lr_mult={stem = 0.1, head = 2.0}"]
    straight = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=straight"]))
    cut = interrupt_then_resume(tiny_recipe, sets, 2, monkeypatch)  # Ctrl-C in epoch 3
    a, b = _metrics(straight), _metrics(cut)
    for key in ("stage", "lr_groups", "train_loss", "val_map", "bn_frozen_checksum", "step"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    wa = torch.load(straight / "last.pt", weights_only=True)["model"]
    wb = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_cached_features_train_the_head_like_the_full_network(tiny_recipe: Path) -> None:
    sets = ["train.epochs=2", 'freeze.stages=[{train = ["classifier"]}]']
    plain, cached = plain_and_cached(tiny_recipe, sets, "cache_features")
    a, b = _metrics(plain), _metrics(cached)
    assert [m["cached_features"] for m in b] == [True, True] and not a[0]["cached_features"]
    for ma, mb in zip(a, b):
        assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-4)
        assert mb["val_loss"] == pytest.approx(ma["val_loss"], rel=1e-4)
    wa = torch.load(plain / "last.pt", weights_only=True)["model"]
    wb = torch.load(cached / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa if not k.startswith("classifier."))
    assert torch.allclose(wa["classifier.weight"], wb["classifier.weight"], atol=1e-5)


@pytest.mark.parametrize("bn", ["frozen", "all"])
def test_cached_maps_train_the_top_blocks_like_the_frozen_prefix(tiny_recipe: Path, bn: str) -> None:
    """A top-blocks stage on cached boundary maps equals the same stage run through the frozen prefix.

    The same images in the same order (no augmentation): the stage's forward on the maps is the training forward's
    tail, so the trained weights agree to float tolerance (asserted: 1e-5 absolute, 1e-4 relative; the prefix runs
    in other batch sizes when caching, which may round differently), and the frozen prefix is untouched bitwise.
    """
    sets = [
        "train.epochs=3",
        f'freeze.bn="{bn}"',
        'freeze.stages=[{epochs = 1, train = ["classifier"]}, {train = ["blocks.5:", "head", "classifier"]}]',
    ]
    plain, cached = plain_and_cached(tiny_recipe, sets, "cache_maps")
    a, b = _metrics(plain), _metrics(cached)
    assert [m["cached_features"] for m in b] == [True, True, True] and not any(m["cached_features"] for m in a)
    assert [m.get("cached_prefix") for m in b] == [None, "blocks.4", "blocks.4"]
    for ma, mb in zip(a, b):
        assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-4)
        assert mb["val_loss"] == pytest.approx(ma["val_loss"], rel=1e-4)
    wa = torch.load(plain / "last.pt", weights_only=True)["model"]
    wb = torch.load(cached / "last.pt", weights_only=True)["model"]
    top = ("blocks.5.", "blocks.6.", "conv_head.", "bn2.", "classifier.")
    assert all(torch.equal(wa[k], wb[k]) for k in wa if not k.startswith(top))  # the frozen prefix, bitwise
    moved = [k for k in wa if k.startswith(top) and wa[k].is_floating_point() and not torch.equal(wa[k], wb[k])]
    for k in moved:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
    seed_everything(0)  # the run's starting weights: the stage did train the top blocks, and only them
    start = build_run(load_recipe(tiny_recipe, [*sets, *NO_AUGMENT])).model.state_dict()
    assert all(torch.equal(wa[k], start[k]) for k in wa if not k.startswith(top) and k.endswith("weight"))
    assert not torch.equal(wa["blocks.5.0.conv_pw.weight"], start["blocks.5.0.conv_pw.weight"])


def test_cache_maps_is_refused_where_nothing_can_be_cached(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match="freeze.cache_maps: no stage has a frozen prefix"):
        run_recipe(load_recipe(tiny_recipe, ["freeze.cache_maps=true", 'freeze.stages=[{train = ["all"]}]']))
    with pytest.raises(UserError, match="freeze.cache_maps"):
        sets = ['freeze.bn="none"', 'freeze.stages=[{train = ["blocks.5:", "head", "classifier"]}]']
        run_recipe(load_recipe(tiny_recipe, ["freeze.cache_maps=true", *sets]))


def test_freeze_config_errors(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match="add up to 3 epochs but train.epochs = 1"):
        run_recipe(load_recipe(tiny_recipe, ['freeze.stages=[{epochs = 3, train = ["all"]}]']))
    with pytest.raises(UserError, match=r"freeze.stages\[0\].train: unknown layer group 'heads'"):
        run_recipe(load_recipe(tiny_recipe, ['freeze.stages=[{train = ["heads"]}]']))
    with pytest.raises(UserError, match="freeze.cache_features: no stage trains only"):
        run_recipe(load_recipe(tiny_recipe, ["freeze.cache_features=true"]))
    with pytest.raises(UserError, match="resnet18 has no stem/blocks/head/classifier"):
        run_recipe(load_recipe(tiny_recipe, ['model.name="resnet18"', 'freeze.until="blocks.3"']))
