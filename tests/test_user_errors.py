"""A user's mistake or the machine's limit is one clear line and exit 2, never a traceback or a misleading message."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch
from rich.console import Console

from finetune.cli import app as cli
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.eval.run_report import RunReport
from finetune.eval.tables import SUMMARY_KEYS, print_report
from finetune.runs.run import run_recipe
from finetune.train import fit as trainer

from .conftest import assert_user_error, run_cli


def _main(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``finetune ARGV`` in this process: its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["finetune", *argv])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


class _NaNWeights(trainer.Hook):
    def on_fit_start(self, loop: trainer.Loop) -> None:  # noqa: D102 - as a broken model.checkpoint would start
        with torch.no_grad():
            next(loop.model.parameters()).fill_(float("nan"))


# validate refuses what run refuses.
@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["freeze.stages=[{epochs=1, train=['classifier']}, {epochs=3, train=['all']}]"], "freeze.stages"),
        (["freeze.stages=[{epochs=1, train=['blocks.9:']}]"], "blocks.9:"),
        (["model.name='resnet18'", "freeze.stages=[{epochs=1, train=['classifier']}]"], "resnet18"),
    ],
)
def test_validate_refuses_what_run_refuses(tiny_recipe: Path, sets: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("[", r"\[")) as from_run:
        run_recipe(load_recipe(tiny_recipe, sets))
    with pytest.raises(UserError) as from_validate:
        cli.validate(tiny_recipe, sets, check_images=False)
    assert str(from_validate.value) == str(from_run.value)


@pytest.mark.slow
def test_one_line_errors_in_a_subprocess(tiny_recipe: Path, tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    assert_user_error(run_cli("run", str(tmp_path / "dir.toml")), "is a directory")
    (tmp_path / "latin1.toml").write_bytes(b'[data]\nroot = "caf\xe9"\n')
    assert_user_error(run_cli("validate", str(tmp_path / "latin1.toml")), "not UTF-8")
    assert_user_error(run_cli("run", str(tiny_recipe), "--set", "optim.lr=inf"), "optim.lr", "finite")
    assert_user_error(run_cli("summary", "--model", "mobilenetv2_035", "--batch", "-1"), "--batch -1")
    (tmp_path / "afile").write_text("x")
    assert_user_error(run_cli("data", "demo", str(tmp_path / "afile" / "demo")), "is a file, not a folder")


def test_a_full_disk_is_one_line(
    tiny_recipe: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(path: str | Path, state: dict) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(trainer, "save_checkpoint", full)
    code, err = _main(["run", str(tiny_recipe)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert "runs/tiny/best.pt: no space left on the device; free space or choose another output.dir" in err


def test_a_nan_loss_is_one_line(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune.assembly import training as build

    real = build.build_loss

    class _Nan(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.inner(logits, target) * float("nan")

    monkeypatch.setattr(build, "build_loss", lambda *args, **kwargs: _Nan(real(*args, **kwargs)))
    with pytest.raises(UserError, match="the loss became nan at epoch 1, batch 1: training diverged; lower optim.lr"):
        run_recipe(load_recipe(tiny_recipe))


def test_markup_in_names_prints_as_text() -> None:
    row = {"name": "[/b]odd [bold]", "support": 1, "ap": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    summary = dict.fromkeys(SUMMARY_KEYS, 0.5)
    report = {
        "run": "runs/[x]",
        "splits": {"val": {"summary": summary, "threshold": 0.5, "images": 3, "per_class": [row]}},
    }
    out = StringIO()
    print_report(RunReport(report), Console(file=out, width=200))  # was a rich MarkupError
    assert "[/b]odd [bold]" in out.getvalue() and "runs/[x]" in out.getvalue()


@pytest.mark.slow
def test_a_recipe_error_does_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[data]\nroot = "x"\nbogus = 1\n')
    code = (
        "import sys; from finetune.cli import app as cli; sys.argv = ['finetune', 'run', sys.argv[1]]\n"
        "try:\n    cli.main()\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bad.toml")], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert "data.bogus: unknown key" in proc.stderr
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("finetune 0.")


def test_under_torchrun_only_rank_0_prints_a_user_error(tmp_path: Path) -> None:
    said = run_cli("run", str(tmp_path / "missing.toml"), env={"RANK": "1"})
    assert said.returncode == 2 and said.stderr == ""
    said = run_cli("run", str(tmp_path / "missing.toml"), env={"RANK": "0"})
    assert said.returncode == 2 and "missing.toml: recipe file not found" in said.stderr


def test_os_errors_name_the_real_file_and_only_run_says_resume(tmp_path: Path) -> None:
    import errno

    from finetune.errors import os_error_line

    full = OSError(errno.ENOSPC, "No space left", str(tmp_path / ".model.onnx.ab12cd.tmp"))
    assert os_error_line(full, "export") == (
        f"{tmp_path / 'model.onnx'}: no space left on the device; free space or write to another folder"
    )
    assert os_error_line(full, "run").endswith("free space or choose another output.dir, then --resume")


def test_a_file_that_cannot_be_read_is_not_blamed_on_a_folder_that_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from finetune.errors import os_error_line

    ann = tmp_path / "instances_train.json"
    ann.write_text("{}")
    ann.chmod(0)
    if os.geteuid() == 0:  # root reads anything; os.access then answers as it would for an ordinary user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(ann) else real(p, mode, **kw))
    denied = PermissionError(errno.EACCES, "Permission denied", str(ann))
    assert os_error_line(denied, "run") == (
        f"{ann}: permission denied reading it; fix its permissions (chmod u+r) or use a copy you can read"
    )
    folder = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs" / "tiny"))
    assert os_error_line(folder, "run").endswith("choose a folder you can write (output.dir) or fix its permissions")


def test_out_of_memory_is_one_line(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def allocate(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 8 TB")

    monkeypatch.setattr(trainer, "train_one_epoch", allocate)
    with pytest.raises(UserError, match=r"^out of memory \(.*can't allocate memory.*\): lower data.batch_size or"):
        run_recipe(load_recipe(tiny_recipe))
    for size, needle in (("1x32x32", "C must be 3"), ("3x100000x100000", "at most 4096 pixels a side")):
        said = run_cli("summary", "--model", "mobilenetv2_035", "--input-size", size)
        assert said.returncode == 2 and needle in said.stderr and "Traceback" not in said.stderr, said.stderr


def test_nan_starting_weights_are_blamed_on_the_weights_not_the_lr(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match=r"^the starting weights hold NaN or inf \(.*\): model.checkpoint"):
        run_recipe(load_recipe(tiny_recipe), hooks=[_NaNWeights()])


def test_model_arch_on_a_timm_model_is_refused(tiny_recipe: Path) -> None:
    with pytest.raises(UserError, match=r"model.arch: only mobilenetv2_standard and mobilenetv2_reduced read it"):
        load_recipe(tiny_recipe, ["model.arch.width=0.5"])  # was: accepted; mobilenetv2_035 kept its width
    own = load_recipe(tiny_recipe, ['model.name="mobilenetv2_reduced"', "model.arch.width=0.5"])
    assert own.model.arch.width == 0.5


def test_validate_estimates_the_training_memory_and_warns_past_the_machine(tiny_recipe: Path) -> None:
    said = run_cli("validate", str(tiny_recipe))
    assert said.returncode == 0 and "GiB to train" in said.stdout and "run out of memory" not in said.stderr
    said = run_cli("validate", str(tiny_recipe), "--set", "data.batch_size=100000")  # was: valid, without a word
    assert "will run out of memory; lower data.batch_size or data.image_size" in " ".join(said.stderr.split())


def test_a_recipe_with_a_utf8_bom_reads(tiny_recipe: Path) -> None:
    tiny_recipe.write_bytes(b"\xef\xbb\xbf" + tiny_recipe.read_bytes())  # what Windows Notepad writes
    assert load_recipe(tiny_recipe).train.epochs == 1  # was: "Invalid statement (at line 1, column 1)"
