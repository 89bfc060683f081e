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
    with pytest.raises(UserError, match="no tensor matches"):
        create_model("mobilenetv2_035", 3, checkpoint=str(other))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": Path("x")}, evil)  # a non-tensor object needs full unpickling
    with pytest.raises(UserError, match="cannot read weights"):
        load_weights(torch.nn.Linear(1, 1), evil)


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
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True))  # fmt: skip
