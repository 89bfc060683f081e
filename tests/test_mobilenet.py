"""The paper's MobileNetV2 presets and the model summary's counts, against the block tables and FlopCounterMode."""

import json
from pathlib import Path

import pytest
import timm
import torch

from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.groups import layer_groups
from finetune.mobilenet import PRESETS, mobilenetv2
from finetune.models import create_model
from finetune.summary import flop_counter_macs, summarize_model

from .conftest import assert_user_error, run_cli


def _stages(model) -> list[tuple[float, int, int, int]]:
    """(t, c, n, s) per stage, read back from the built modules."""
    rows = []
    for stage in model.blocks:
        first = stage[0]
        if hasattr(first, "conv_pwl"):  # inverted residual: t = expanded / input channels
            t = first.conv_pw.out_channels / first.conv_pw.in_channels
            c = first.conv_pwl.out_channels
        else:
            t, c = 1, first.conv_pw.out_channels
        rows.append((t, c, len(stage), first.conv_dw.stride[0]))
    return rows


@pytest.mark.parametrize("preset", ["standard", "reduced"])
def test_presets_build_the_block_table_exactly(preset: str) -> None:
    model = mobilenetv2(10, preset)
    assert _stages(model) == [tuple(r) for r in PRESETS[preset]["blocks"]]
    assert model.conv_stem.out_channels == 32 and model.conv_stem.stride == (2, 2)
    assert model.conv_head.out_channels == PRESETS[preset]["head"]
    size = PRESETS[preset]["input_size"]
    final = model.forward_features(torch.zeros(1, 3, size, size)).shape[-1]
    assert final == {"standard": 7, "reduced": 8}[preset]  # the tables' last feature-map sides
    groups = [g.name for g in layer_groups(model)]
    assert groups == ["stem", *[f"blocks.{i}" for i in range(len(PRESETS[preset]["blocks"]))], "head", "classifier"]


def test_arch_options() -> None:
    m = mobilenetv2(5, "standard", expansion=4, output_stride=8, bn_momentum=0.01, bn_eps=1e-3, act="relu")
    assert {t for t, *_ in _stages(m)[1:]} == {4.0}
    assert m.forward_features(torch.zeros(1, 3, 224, 224)).shape[-1] == 28  # dilated instead of strided
    assert m.bn1.momentum == 0.01 and m.bn1.eps == 1e-3 and isinstance(m.bn1.act, torch.nn.ReLU)
    per_row = mobilenetv2(5, "reduced", expansion=[6, 4, 2])
    assert [t for t, *_ in _stages(per_row)] == [6, 4, 2]
    wide = mobilenetv2(5, "reduced", width=1.4)
    assert wide.conv_stem.out_channels == 48 and wide.blocks[0][0].conv_pwl.out_channels == 88


def test_recipe_builds_a_preset_and_rejects_keras_momentum(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[model]\nname = "mobilenetv2_reduced"\n[model.arch]\nbn_momentum = 0.01\nbn_eps = 1e-3\n')
    recipe = load_recipe(path)
    model, _ = create_model(recipe.model.name, 10, arch=recipe.model.arch.model_dump())
    assert model.bn2.momentum == 0.01 and model.get_classifier().out_features == 10
    path.write_text('[model]\nname = "mobilenetv2_reduced"\n[model.arch]\nbn_momentum = 0.99\n')
    with pytest.raises(UserError, match=r"model.arch.bn_momentum: 0.99 is a Keras-style value;.* 0.99 is 0.01 here"):
        load_recipe(path)
    path.write_text('[model]\nname = "mobilenetv2_standard"\n[model.arch]\nblocks = [[6, 24, 2]]\n')
    with pytest.raises(UserError, match=r"model.arch.blocks: each row is \[t, c, n, s\]"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("name", "size", "params"),
    [("mobilenetv2_100", 224, 3_504_872), ("mobilenetv2_140", 224, 6_108_776), ("mobilenetv2_reduced", 32, None)],
)
def test_summary_counts_parameters_and_macs_like_flop_counter(name: str, size: int, params: int | None) -> None:
    model = mobilenetv2(1000, "reduced") if name == "mobilenetv2_reduced" else timm.create_model(name)
    totals = summarize_model(model, (3, size, size))["totals"]
    assert totals["parameters"] == (params or sum(p.numel() for p in model.parameters()))
    ref = flop_counter_macs(model, (3, size, size))
    assert abs(totals["macs_per_image"] - ref) / ref < 0.02
    if name == "mobilenetv2_100":
        assert 290e6 < totals["macs_per_image"] < 310e6  # Sandler et al.: 300M multiply-adds


def test_depthwise_is_counted_as_depthwise() -> None:
    conv = torch.nn.Sequential(torch.nn.Conv2d(96, 96, 3, padding=1, groups=96))
    (row,) = summarize_model(conv, (96, 8, 8))["layers"]
    assert row["macs"] == 8 * 8 * 96 * 9  # not 8 * 8 * 96 * 96 * 9 (the paper's Table A2 way)


@pytest.mark.slow
def test_summary_cli(tiny_recipe: Path) -> None:
    proc = run_cli("summary", "--model", "mobilenetv2_100", "--input-size", "3x224x224", "--json")
    assert proc.returncode == 0, proc.stderr
    totals = json.loads(proc.stdout)["totals"]
    assert totals["parameters"] == 3_504_872 and totals["memory"]["gradients"] == 4 * 3_504_872
    stages = 'freeze.stages=[{train = ["classifier"]}]'
    proc = run_cli("summary", str(tiny_recipe), "--set", stages, "--json")
    t = json.loads(proc.stdout)["totals"]
    assert t["input"] == [8, 3, 32, 32] and t["trainable"] == 1280 * 10 + 10 and t["frozen"] > 0
    assert t["memory"]["optimizer_state"] == 2 * 4 * t["trainable"]
    proc = run_cli("summary", "--model", "mobilenetv2_reduced")
    assert proc.returncode == 0 and "MACs per image" in proc.stdout and "3x32x32" in proc.stdout.replace(" ", "")
    assert_user_error(run_cli("summary", "--model", "mobilenetv2_100", "--input-size", "224"), "--input-size")
