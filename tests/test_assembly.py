"""The one assembly: validate refuses exactly what run refuses; hooks get explicit parts and a checked order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.assembly import build_run
from finetune.assembly.hooks import check_hooks
from finetune.cli.app import validate
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.hooks.early_stopping import EarlyStopping
from finetune.hooks.ema import EmaHook
from finetune.hooks.freezing import FreezeHook
from finetune.hooks.loggers import JsonlLogger
from finetune.hooks.probe import ProbeHook
from finetune.runs.run import run_recipe

PROBE = 'freeze.stages=[{train = ["classifier"], solver = "lbfgs"}, {train = ["all"]}]'
HEAD_ONLY = 'freeze.stages=[{train = ["classifier"]}]'
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="refused only on a machine without CUDA")

# (overrides, a piece of the one line both refuse with; None: both accept). Add a case here when run learns a refusal.
CACHE = ["freeze.cache_features=true", HEAD_ONLY]
CASES = [
    pytest.param([PROBE, 'model.head="mlp"'], 'set model.head = "linear"', id="probe-with-mlp-head"),
    pytest.param(
        ['data.augment.normalize="dataset"', "freeze.cache_features=true", HEAD_ONLY], None, id="dataset-norm-cache"
    ),
    pytest.param(['data.augment.normalize="dataset"'], None, id="dataset-norm"),
    pytest.param([PROBE], None, id="probe", marks=pytest.mark.slow),
    pytest.param(['freeze.stages=[{epochs = 2, train = ["classifier"]}]'], "add up to 2 epochs", id="stage-epochs"),
    pytest.param(['freeze.until="classifier"'], "leaves nothing to train", id="until-last-group"),
    pytest.param(["freeze.cache_features=true"], "nothing can be cached", id="cache-without-head-stage"),
    pytest.param(["optim.lr_mult={nope = 0.1}"], "optim.lr_mult.nope", id="lr-mult-selector"),
    pytest.param(['freeze.stages=[{train = ["blocks.99"]}]'], "freeze.stages[0].train", id="stage-selector"),
    pytest.param(['model.checkpoint="no/such/weights.safetensors"'], "no/such/weights.safetensors", id="checkpoint"),
    pytest.param(['model.name="no_such_model_xyz"'], "no_such_model_xyz", id="model-name"),
    pytest.param(['data.test="nope"'], "instances_nope.json", id="missing-split"),
    pytest.param(["loss.pos_weight=[1.0, 2.0]"], "loss.pos_weight", id="pos-weight-length"),
    pytest.param(['model.name="resnet10t"', PROBE], "layer groups", id="probe-without-groups"),
    pytest.param(['model.name="resnet10t"', "optim.layer_decay=0.5"], "layer groups", id="layer-decay-without-groups"),
    pytest.param(['train.device="cuda"'], "no CUDA GPU is visible", id="cuda", marks=NO_GPU),
    pytest.param(['train.precision="fp16"'], '"fp16" needs a CUDA GPU', id="fp16-on-cpu", marks=NO_GPU),
    pytest.param(["model.drop_path_rate=0.1", 'model.name="resnet10t"', "optim.l2sp=0.01"], None, id="l2sp-no-groups"),
]


def _outcome(fn, *args, **kwargs) -> str | None:
    try:
        fn(*args, **kwargs)
    except UserError as err:
        return str(err)
    return None


@pytest.mark.parametrize(("overrides", "refusal"), CASES)
def test_validate_refuses_exactly_what_run_refuses(
    overrides: list[str], refusal: str | None, tiny_recipe: Path, tmp_path: Path
) -> None:
    sets = [*overrides, f'output.dir="{(tmp_path / "runs").as_posix()}"']
    by_validate = _outcome(validate, tiny_recipe, sets, False)
    by_run = _outcome(run_recipe, load_recipe(tiny_recipe, sets))
    assert by_validate == by_run
    if refusal is None:
        assert by_run is None
    else:
        assert by_run is not None and refusal in by_run, by_run


def test_l2sp_keeps_the_classifier_out_of_the_anchor_without_layer_groups(tiny_recipe: Path, tmp_path: Path) -> None:
    """A model without layer groups (resnet10t): the classifier keeps its weight decay and is never pulled to w0.

    Before the assembly passed explicit parameters, L2-SP chose by optimizer group name; the one group "all" held the
    classifier too, so the classifier lost its decay and was anchored, against the module's own docstring.
    """
    recipe = load_recipe(tiny_recipe, ['model.name="resnet10t"', "optim.l2sp=0.01", "optim.weight_decay=0.05"])
    parts = build_run(recipe)
    loop, hooks = parts.training(tmp_path / "run")
    l2sp = next(h for h in hooks if type(h).__name__ == "L2SPHook")
    l2sp.on_fit_start(loop)
    head = {n for n, _ in parts.model.get_classifier().named_parameters(prefix="fc")}
    assert head == {"fc.weight", "fc.bias"}
    assert not head & set(l2sp.anchor) and "conv1.0.weight" in l2sp.anchor
    names = {id(p): n for n, p in parts.model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in loop.optimizer.param_groups for p in g["params"]}
    assert decay["fc.weight"] == 0.05 and decay["conv1.0.weight"] == 0.0 and decay["fc.bias"] == 0.0


def test_a_hook_list_in_the_wrong_order_is_an_error(tiny_recipe: Path, tmp_path: Path) -> None:
    recipe = load_recipe(tiny_recipe, [PROBE, "train.ema=0.9", "train.patience=2"])
    loop, hooks = build_run(recipe).training(tmp_path / "run")
    assert [type(h) for h in hooks[:4]] == [FreezeHook, ProbeHook, EmaHook, EarlyStopping]
    check_hooks(hooks)  # the assembly's own order passes
    with pytest.raises(ValueError, match="ProbeHook must come before EmaHook"):
        check_hooks([hooks[0], hooks[2], hooks[1], *hooks[3:]])
    with pytest.raises(ValueError, match="FreezeHook must come before ProbeHook"):
        check_hooks([hooks[1], hooks[0], *hooks[2:]])
    with pytest.raises(ValueError, match="loggers go last"):
        check_hooks([JsonlLogger(tmp_path / "m.jsonl"), *hooks[:3]])


def test_run_refuses_extra_hooks_that_break_the_order(tiny_recipe: Path) -> None:
    probe = ProbeHook(None, None, None, cs=[1.0])  # never run: the order is checked before anything trains
    with pytest.raises(UserError, match="ProbeHook must come before EmaHook"):
        run_recipe(load_recipe(tiny_recipe, ["train.ema=0.9"]), hooks=[probe])


def test_each_part_is_built_once(tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.assembly import data, training

    calls: dict[str, int] = {}
    for module, name in ((data, "build_device"), (training, "build_groups"), (training, "build_stages")):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    stages = 'freeze.stages=[{epochs = 1, train = ["classifier"]}, {train = ["all"]}]'
    run_recipe(load_recipe(tiny_recipe, [stages, "train.epochs=2", f'output.dir="{tmp_path.as_posix()}"']))
    assert calls == {"build_device": 1, "build_groups": 1, "build_stages": 1}


def test_run_parts_are_read_only_once_built(tiny_recipe: Path) -> None:
    parts = build_run(load_recipe(tiny_recipe))
    for name, value in (("weights", "none"), ("console", None), ("distributed", True), ("note", "x")):
        with pytest.raises(AttributeError, match="read-only once built"):
            setattr(parts, name, value)
    assert parts.note == "" and parts.recipe is parts.recipe and parts.weights == "recipe"  # parts still build, once


def test_the_augmented_feature_cache_reads_the_train_split_in_order(tiny_recipe: Path) -> None:
    """``cache_augment = K``: the cache extracts augmented passes, every image once, in dataset order."""
    parts = build_run(load_recipe(tiny_recipe, [*CACHE, "freeze.cache_augment=2"]))
    source = parts.feature_cache.source
    assert any(type(t).__name__ == "RandomResizedCrop" for t in source.dataset.transform.transforms)
    assert torch.cat([b["index"] for b in source]).tolist() == list(range(24))  # no shuffle, nothing dropped
    train = parts.loader("train", augment=True)
    assert train is not source and torch.cat([b["index"] for b in train]).tolist() != list(range(24))


def test_eval_size_is_what_every_prediction_sees(tiny_recipe: Path, tmp_path: Path) -> None:
    parts = build_run(load_recipe(tiny_recipe, ["data.eval_size=40"]))
    assert next(iter(parts.loader("val")))["image"].shape[-2:] == (40, 40)  # val, test, the probe's features
    assert next(iter(parts.loader("train", augment=True)))["image"].shape[-2:] == (32, 32)  # training crops
    assert parts.image_size == 40  # what exports and model.json take
    assert build_run(load_recipe(tiny_recipe)).image_size == 32
