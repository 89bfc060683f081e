"""Layer groups from timm's group_matcher, selectors, and the frozen-prefix forward."""

import pytest
import timm
import torch

from finetune.errors import UserError
from finetune.groups import forward_fns, layer_groups, resolve


@pytest.mark.parametrize("name", ["mobilenetv2_035", "mobilenetv2_140", "efficientnet_lite0"])
def test_groups_cover_every_parameter_once_in_forward_order(name: str) -> None:
    model = timm.create_model(name, num_classes=4)
    groups = layer_groups(model)
    n_blocks = len(model.blocks)
    assert [g.name for g in groups] == ["stem", *[f"blocks.{i}" for i in range(n_blocks)], "head", "classifier"]
    params = [p for g in groups for p in g.params]
    assert sorted(params) == sorted(n for n, _ in model.named_parameters())
    assert groups[-1].params == ["classifier.weight", "classifier.bias"]
    assert set(groups[-2].params) == {"conv_head.weight", "bn2.weight", "bn2.bias"}


def test_selectors() -> None:
    groups = layer_groups(timm.create_model("mobilenetv2_035", num_classes=4))  # blocks.0 .. blocks.6
    assert resolve(["blocks.5:", "head", "classifier"], groups, "k") == ["blocks.5", "blocks.6", "head", "classifier"]
    assert resolve(["blocks.0:4"], groups, "k") == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert resolve(["blocks.:2", "stem"], groups, "k") == ["stem", "blocks.0", "blocks.1"]
    assert resolve(["blocks.-2:"], groups, "k") == ["blocks.5", "blocks.6"]
    assert resolve(["all"], groups, "k") == [g.name for g in groups]
    with pytest.raises(UserError, match=r"freeze.stages\[0\].train: unknown layer group 'block.1'"):
        resolve(["block.1"], groups, "freeze.stages[0].train")
    with pytest.raises(UserError, match="selects no block; this model has blocks.0 to blocks.6"):
        resolve(["blocks.9:"], groups, "k")


def test_a_model_without_groups_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.name: resnet18 has no stem/blocks/head/classifier layer groups"):
        layer_groups(timm.create_model("resnet18", num_classes=2), "resnet18")


def test_group_functions_compose_to_the_model() -> None:
    model = timm.create_model("mobilenetv2_050", num_classes=5, drop_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    y = x
    for fn in forward_fns(model, layer_groups(model)):
        y = fn(y)
    assert torch.equal(y, model(x))
