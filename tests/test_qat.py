"""Quantization-aware training: the simulated rounding against torch's BN fusion and plain rounding, and the runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.rundir.directory import RunDir
from finetune.runs.qat import qat_recipe
from finetune.runs.run import run_recipe
from finetune.train.fit import load_checkpoint
from finetune.train.qat import QuantSim

from .conftest import TINY_RECIPE, assert_user_error, run_cli
from .helpers import StopAtStep


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_035", num_classes=4).eval()
    for mod in model.modules():  # statistics and scales away from the identity, as a trained network has them
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
    return model


def _int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even of ``w`` per output channel to [-127, 127] steps of ``max|w| / 127``, in NumPy."""
    a = w.detach().double().numpy()
    scale = np.abs(a.reshape(len(a), -1)).max(1).reshape(-1, *[1] * (a.ndim - 1)) / 127
    return torch.from_numpy(np.clip(np.round(a / scale), -127, 127) * scale).float()


def _plain(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution as a plain ``nn.Conv2d`` (torch's fusion takes one)."""
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    out.load_state_dict(conv.state_dict())
    return out.eval()


def _bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """timm's BatchNormAct2d as a plain ``nn.BatchNorm2d`` (without its activation)."""
    out = nn.BatchNorm2d(bn.num_features, eps=bn.eps)
    out.load_state_dict(bn.state_dict(), strict=False)
    return out.eval()


def test_a_folded_convolution_is_torchs_fused_conv_bn_with_the_weight_rounded_to_int8() -> None:
    model, x = _model(), torch.randn(2, 3, 64, 64)
    sim = QuantSim(model, x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sim.folds["conv_stem"] == "bn1" and len(sim.folds) == n_bn
    assert sim.weights == ["classifier"] and sim.inputs[0] == "conv_stem" and "classifier" in sim.inputs
    sim.calibrate(model, [x])  # the plain network's ranges, then the rounding in place
    sim.attach(model)

    # The reference: torch's own BN fusion, the weight rounded in NumPy, the rounded input and output ranges.
    conv = model.conv_stem
    fused = fuse_conv_bn_eval(_plain(conv), _bn(model.bn1))
    image = sim.quantizers["in:conv_stem"](x)
    logits = nn.functional.conv2d(image, _int8_per_channel(fused.weight), fused.bias, conv.stride, conv.padding)
    want = sim.quantizers["out:bn1"](model.bn1.act(logits))
    seen: dict[str, torch.Tensor] = {}
    handle = model.bn1.register_forward_hook(lambda mod, args, out: seen.setdefault("out", out))
    with torch.no_grad():
        model(x)
    handle.remove()
    torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=0)
    q = seen["out"] / sim.quantizers["out:bn1"].scale
    assert len(torch.unique(seen["out"])) <= 256 and torch.allclose(q, q.round(), atol=1e-3)  # on the uint8 grid


def test_the_simulation_keeps_the_state_dict_and_comes_out_exactly() -> None:
    model, x = _model(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    keys = list(model.state_dict())
    sim = QuantSim(model, x)
    sim.calibrate(model, [x])  # the plain network's ranges, then the rounding in place
    sim.attach(model)
    assert list(model.state_dict()) == keys  # checkpoints load into the plain network
    with torch.no_grad():
        rounded = model(x)
    assert not torch.equal(rounded, plain) and (rounded - plain).abs().max() < plain.abs().max()

    twin = _model()  # a copy of the architecture (the EMA's) rounds the same way, with the same ranges
    sim.attach(twin)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), rounded, atol=0, rtol=0)

    model.train()  # gradients pass through the rounding (straight-through) into the weights and BN's scale
    for mod in model.modules():  # BN statistics fixed, as freeze.bn = "all" keeps them
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
    model(x).sum().backward()
    assert model.conv_stem.weight.grad.abs().sum() > 0 and model.bn1.weight.grad.abs().sum() > 0
    QuantSim.detach(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain)
    assert type(model.conv_stem) is nn.Conv2d and type(model.classifier) is nn.Linear


@pytest.fixture(scope="module")
def base_run(tiny_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qat")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(root=tiny_coco.as_posix(), runs=(folder / "runs").as_posix()))
    return run_recipe(load_recipe(recipe, ['freeze.bn="all"', "train.ema=0.9"]))


def test_finetune_qat_trains_a_run_beside_the_finished_one_whose_int8_export_works(base_run: Path) -> None:
    proc = run_cli("qat", str(base_run), "--epochs", "2", "--lr", "5e-4")
    assert proc.returncode == 0, proc.stderr
    qat = base_run.parent / f"{base_run.name}-qat"
    assert "quantization-aware training: " in proc.stderr and str(qat) in proc.stdout
    recipe = RunDir.open(qat).recipe()
    assert recipe.quantize.aware and recipe.train.epochs == 2 and recipe.optim.lr == 5e-4
    assert recipe.model.checkpoint == (base_run / "best.pt").resolve().as_posix()
    assert [s.train for s in recipe.freeze.stages] == [["all"]] and recipe.freeze.bn == "all"

    last = load_checkpoint(qat / "last.pt")  # the activation ranges are kept for a resume
    ranges = last["hooks"]["qat"]["quantizers"]
    assert any(k.endswith("scale") for k in ranges) and all(torch.isfinite(v).all() for v in ranges.values())
    before, after = load_checkpoint(base_run / "best.pt")["model"], last["model"]
    assert list(before) == list(after)  # the plain network's keys: no simulation in the weights
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])

    proc = run_cli("export", str(qat), "--format", "onnx", "--int8")
    assert proc.returncode == 0, proc.stderr
    assert (qat / "export" / "model.int8.onnx").is_file()


def test_qat_refuses_what_it_cannot_do(base_run: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match='quantize.aware: .*freeze.bn = "all"'):
        load_recipe(tiny_recipe, ["quantize.aware=true"])
    assert_user_error(run_cli("qat", str(tmp_path)), "not a run directory")
    assert_user_error(run_cli("qat", str(base_run), "--epochs", "0"), "--epochs 0")
    with pytest.raises(UserError, match="--lr"):
        qat_recipe(base_run, lr=0.0)


def test_run_qat_from_python(base_run: Path) -> None:
    import finetune

    qat = finetune.Run.load(base_run).qat(epochs=1, name="from-python")
    assert qat.dir == base_run.parent / "from-python" and qat.metrics["val"]
    assert RunDir.open(qat.dir).recipe().quantize.aware


def test_a_qat_run_resumes_bitwise_with_its_activation_ranges(tiny_recipe: Path) -> None:
    sets = ["train.epochs=2", "train.checkpoint_every=1", "train.ema=0.9", 'freeze.bn="all"', "quantize.aware=true"]
    straight = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=straight"]))
    with pytest.raises(UserError, match="interrupted"):
        run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=cut"]), hooks=[StopAtStep(4)])
    cut = tiny_recipe.parent / "runs" / "cut"
    done = run_cli("run", "--resume", str(cut))
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (load_checkpoint(d / "last.pt") for d in (straight, cut))
    for part in ("model", "eval_model"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    ranges = a["hooks"]["qat"]["quantizers"], b["hooks"]["qat"]["quantizers"]
    assert all(torch.equal(ranges[0][k], ranges[1][k]) for k in ranges[0])


def test_the_ranges_and_first_layers_are_onnxruntimes_own(base_run: Path, tmp_path: Path) -> None:
    """onnxruntime's INT8 file (its quantizer, its runtime: an independent implementation) is what is imitated.

    Calibrated on the export's images, every range equals onnxruntime's; the first quantized tensors, read out of the
    INT8 graph, equal the simulation's to the step, but for the rare value float arithmetic rounds the other way (the
    integer kernels and a float convolution disagree at exact half steps; deeper layers compound them).
    """
    import onnx
    import onnxruntime

    from finetune.assembly import build_from_run
    from finetune.deploy.export import export_run, run_classifier
    from finetune.deploy.exported import int8_name
    from finetune.deploy.quantize import calibration_loader, nhwc_batches

    out = int8_name(export_run(base_run, "onnx", tmp_path / "model.onnx", int8=True, card=False).path)
    graph = onnx.load(out)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    rounded = {n.input[0]: n for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in init}
    parts = build_from_run(RunDir.open(base_run), ("train", "val"), ["data.num_workers=0"])
    classifier, _ = run_classifier(RunDir.open(base_run))
    sim = QuantSim(classifier.model, torch.zeros(2, 3, parts.image_size, parts.image_size))
    calibration = np.concatenate([b for b, _ in nhwc_batches(calibration_loader(parts))])  # the export's images
    sim.calibrate(classifier.model, [torch.from_numpy(calibration)], forward=classifier)
    first = {  # the graph's tensor (TorchScript exporter names) -> the simulation's quantizer and module
        "/Div_output_0": ("in:conv_stem", "conv_stem"),
        "/model/bn1/act/Clip_output_0": ("out:bn1", "bn1"),
        "/model/blocks/blocks.0/blocks.0.0/bn1/act/Clip_output_0": ("out:blocks.0.0.bn1", "blocks.0.0.bn1"),
        "/model/blocks/blocks.0/blocks.0.0/conv_pw/Conv_output_0": ("out:blocks.0.0.bn2", "blocks.0.0.bn2"),
        "/model/bn2/act/Clip_output_0": ("out:bn2", "bn2"),
        "/model/classifier/Gemm_output_0": ("out:classifier", "classifier"),
    }
    for tensor, (key, _) in first.items():
        fq, q = sim.quantizers[key.replace(".", "/")], rounded[tensor]
        assert fq.scale.item() == pytest.approx(float(init[q.input[1]]), rel=1e-5), key
        assert fq.zero_point.item() == int(init[q.input[2]]), key

    sim.attach(classifier.model)
    for tensor in list(first)[:4]:  # read the dequantized tensors out of the INT8 graph
        dq = next(
            n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == rounded[tensor].output[0]
        )
        graph.graph.output.append(onnx.helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None))
    images = np.concatenate([b for b, _ in nhwc_batches(parts.loader("val"))])
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: images})
    seen: dict[str, torch.Tensor] = {}
    hooks = [classifier.model.conv_stem.register_forward_pre_hook(lambda m, a: seen.setdefault("conv_stem", a[0]))]
    for _, name in list(first.values())[1:4]:
        mod = classifier.model.get_submodule(name)
        hooks.append(mod.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, o)))
    with torch.no_grad():
        classifier(torch.from_numpy(images))
    for h in hooks:
        h.remove()
    for i, (tensor, (key, name)) in enumerate(list(first.items())[:4]):
        step = sim.quantizers[key.replace(".", "/")].scale.item()
        off = np.abs(seen[name].numpy() - values[1 + i]) > 0.5 * step
        assert off.mean() < 0.01, (tensor, off.mean())
