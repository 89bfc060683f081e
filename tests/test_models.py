from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.errors import UserError
from finetune.models import create_model, load_weights

from .conftest import LITE0_WEIGHTS


@pytest.mark.parametrize("name", ["mobilenetv2_035", "mobilenetv2_100", "mobilenetv2_140"])
def test_head_replaced_for_classes(name: str) -> None:
    model, report = create_model(name, 7, drop_rate=0.3)
    assert report is None
    assert model.get_classifier().out_features == 7 and model.drop_rate == 0.3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("name", ["mobilenetv2_100", "mobilenetv2_standard"])
def test_stochastic_depth_as_timm_builds_it(name: str) -> None:
    from timm.layers import DropPath

    model, _ = create_model(name, 7, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    # timm's rule: block i of n gets rate * i / n, so the rates rise with depth and stay under the setting.
    assert rates and rates == sorted(rates) and 0.15 < max(rates) < 0.2
    plain, _ = create_model(name, 7)
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    model.train()
    x = torch.randn(4, 3, 64, 64)
    assert not torch.equal(model(x), model(x))  # branches dropped at random in training
    model.eval()
    assert torch.equal(model(x), model(x))
    with pytest.raises(UserError, match="model.drop_path_rate: vgg11 has no stochastic depth"):
        create_model("vgg11", 7, drop_path_rate=0.2)


def test_local_checkpoint_loads_and_drops_other_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("mobilenetv2_035", num_classes=1000)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model, report = create_model("mobilenetv2_035", 5, checkpoint=str(path))
    assert sorted(report.dropped) == ["classifier.bias", "classifier.weight"]
    assert not report.missing and not report.unexpected
    for key, value in source.state_dict().items():
        if not key.startswith("classifier"):
            assert torch.equal(model.state_dict()[key], value), key
    # The same weights wrapped like a training checkpoint, in a torch file, with DataParallel prefixes.
    wrapped = tmp_path / "w.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, wrapped)
    again, report2 = create_model("mobilenetv2_035", 5, checkpoint=str(wrapped))
    assert report2.loaded == report.loaded
    torch.testing.assert_close(again.conv_stem.weight, source.conv_stem.weight)


def test_weights_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="weights file not found; check model.checkpoint"):
        create_model("mobilenetv2_035", 3, checkpoint=str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read weights"):
        create_model("mobilenetv2_035", 3, checkpoint=str(junk))
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(UserError, match="only 0 of the model's .* weight tensors match"):
        create_model("mobilenetv2_035", 3, checkpoint=str(other))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.pt: the file is empty \(0 bytes\)"):
        create_model("mobilenetv2_035", 3, checkpoint=str(empty))


@pytest.mark.parametrize("source", ["resnet18", "mobilenetv2_100"])
def test_a_checkpoint_of_another_architecture_is_refused(source: str, tmp_path: Path) -> None:
    """BN's num_batches_tracked scalars fit any BN network: they must not make another architecture's file load."""
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model(source, num_classes=10).state_dict(), str(path))
    with pytest.raises(UserError, match="weight tensors match the file; is model.name the architecture"):
        create_model("mobilenetv2_035", 3, checkpoint=str(path))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Path("x")}, evil)  # a non-tensor object needs full unpickling
    with pytest.raises(UserError, match=r"refused: it holds a pickled Python object \(pathlib.PosixPath\)") as info:
        load_weights(torch.nn.Linear(1, 1), evil)
    assert "weights_only" not in str(info.value) and "False" not in str(info.value)  # no advice to load it unsafely


def test_unknown_model_name() -> None:
    with pytest.raises(UserError, match="model.name: unknown timm model 'mobilenetv9_100'"):
        create_model("mobilenetv9_100", 3)


def test_pretrained_offline_says_use_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without internet gets, without waiting on sockets
    with pytest.raises(UserError, match=r"model.pretrained: could not fetch .* model.checkpoint"):
        create_model("mobilenetv2_035", 3, pretrained=True)


@pytest.mark.skipif(not LITE0_WEIGHTS.is_file(), reason="../shared/weights not present")
def test_real_imagenet_weights_efficientnet_lite0() -> None:
    model, report = create_model("efficientnet_lite0", 80, checkpoint=str(LITE0_WEIGHTS))
    assert sorted(report.dropped) == ["classifier.bias", "classifier.weight"]
    assert not report.missing and not report.unexpected
    # Same backbone features as timm loading the file itself with a 1000-class head.
    ref = timm.create_model("efficientnet_lite0", pretrained=True, pretrained_cfg_overlay={"file": str(LITE0_WEIGHTS)})
    x = torch.randn(2, 3, 96, 96)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_head(model.forward_features(x), pre_logits=True),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
        )


@pytest.mark.parametrize("width", [1.0, 0.5])
def test_torchvision_mobilenet_v2_state_dict_gives_identical_outputs(width: float, tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(weights=None, width_mult=width)
    for m in tv.modules():  # non-trivial BN statistics, so a mis-mapped BN layer cannot go unnoticed
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_()
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    name = {1.0: "mobilenetv2_100", 0.5: "mobilenetv2_050"}[width]
    model, report = create_model(name, 1000, checkpoint=str(path))
    assert report.remapped == "torchvision" and not report.missing and not report.unexpected and not report.dropped
    x = torch.randn(2, 3, 96, 96)
    assert torch.allclose(model.eval()(x), tv.eval()(x), atol=1e-5)


def test_mlp_head_and_notice_for_another_class_count(tmp_path: Path) -> None:
    source = timm.create_model("mobilenetv2_035", num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model, report = create_model("mobilenetv2_035", 4, checkpoint=str(path), head="mlp", head_hidden=32)
    assert isinstance(model.classifier, torch.nn.Sequential) and model.classifier[-1].out_features == 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert "head dropped (the file's classifier has 10 outputs, this model's 4)" in report.summary()
    _, same = create_model("mobilenetv2_035", 10, checkpoint=str(path))
    assert same.head_note == ""


def test_blog_init() -> None:
    torch.manual_seed(0)
    model, _ = create_model("mobilenetv2_100", 80, init="blog")
    w = model.classifier.weight
    assert abs(w.std().item() - 0.01) < 1e-3 and model.classifier.bias.abs().sum() == 0
    conv = model.blocks[3][0].conv_pw.weight  # He, fan-out: std = sqrt(2 / (k*k*out))
    assert abs(conv.std().item() - (2 / conv.shape[0]) ** 0.5) / (2 / conv.shape[0]) ** 0.5 < 0.05
    assert torch.equal(model.bn2.weight, torch.ones_like(model.bn2.weight))


def test_a_run_directory_is_a_checkpoint_source(tmp_path: Path) -> None:
    source = timm.create_model("mobilenetv2_035", num_classes=6)
    torch.save({"model": source.state_dict(), "train_state": {"epoch": 1}}, tmp_path / "best.pt")
    model, report = create_model("mobilenetv2_035", 6, checkpoint=str(tmp_path))
    assert report.loaded == len(source.state_dict()) and report.path.endswith("best.pt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())


def test_pretrained_without_a_reachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, huggingface_hub would retry for about a minute; the toolkit answers in well under 2 s."""
    import time

    import finetune.models as models

    monkeypatch.setattr(models, "hub_reachable", lambda timeout=1.5: False)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"model.pretrained: could not fetch mobilenetv2_100 .* model.checkpoint"):
        create_model("mobilenetv2_100", 3, pretrained=True)
    assert time.perf_counter() - start < 2.0
