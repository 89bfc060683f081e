"""Issue 13's fault sweep, one test per finding: each failed before its fix (silent garbage, tracebacks, lost runs)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from finetune import io as ckpt
from finetune.cli import app as cli
from finetune.config import load_recipe
from finetune.data.coco import read_coco_split
from finetune.data.dataset import ImageDataset
from finetune.data.split import check_images, read_rgb
from finetune.data.stats import compute_stats
from finetune.errors import UserError
from finetune.eval import plots
from finetune.eval.run_report import RunReport
from finetune.eval.tables import SUMMARY_KEYS, print_report
from finetune.rundir.directory import RunDir
from finetune.runs.run import run_recipe
from finetune.train import fit as trainer

from .conftest import assert_user_error, run_cli


def _copy_data(tiny_coco: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_coco, root)
    return root


def _recipe(tiny_recipe: Path, root: Path) -> Path:
    """``tiny_recipe`` pointed at another copy of the data."""
    text = tiny_recipe.read_text()
    lines = [f'root = "{root.as_posix()}"' if ln.startswith("root = ") else ln for ln in text.splitlines()]
    path = tiny_recipe.with_name("copy.toml")
    path.write_text("\n".join(lines) + "\n")
    return path


# 1. Memory that grows with the square of the class count.
def test_plots_stay_bounded_at_500_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 500
    cm = rng.integers(0, 3, (n, n))
    names = [f"class {i}" for i in range(n)]
    start = time.perf_counter()
    plots.confusion_png(cm, names, tmp_path / "cm.png", "test")
    plots.f1_bars(rng.random(n), rng.random(n), names, tmp_path / "f1.png", "f1")
    assert time.perf_counter() - start < 20  # was 103 s and 19.4 GB for the confusion matrix alone
    for name in ("cm.png", "f1.png"):
        with Image.open(tmp_path / name) as img:
            assert max(img.size) < 3000, (name, img.size)
    keep = plots.most_confused(cm)
    errors = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    assert len(keep) == plots.MAX_PLOTTED and errors[keep].min() >= np.delete(errors, keep).max()


# 3. Silent garbage with exit 0.
@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I", ".tif")])
def test_16_bit_grayscale_keeps_its_values(mode: str, suffix: str, tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    img = Image.fromarray(ramp.astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    path = (tmp_path / "deep").with_suffix(suffix)
    img.save(path)
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257), atol=1)  # was 255 everywhere
    assert not check_images([path], decode=True)


def test_a_decompression_bomb_is_a_bad_image_not_a_crash(
    tiny_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = read_coco_split(tiny_coco, "val")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 48x48 image is now over twice the limit
    sample = ImageDataset(split.image_paths, split.targets, split.classes)[0]
    assert "DecompressionBombError" in sample["error"] and "image" not in sample
    assert "DecompressionBombError" in check_images(split.image_paths[:1], decode=True)[0]


def test_an_empty_train_split_is_refused(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    root = _copy_data(tiny_coco, tmp_path)
    ann = root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    ann.write_text(json.dumps({**doc, "images": [], "annotations": []}))
    with pytest.raises(UserError, match="data.train: the 'train' split has no images"):
        run_recipe(load_recipe(_recipe(tiny_recipe, root)))


def test_a_train_split_with_no_readable_image_stops(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    root = _copy_data(tiny_coco, tmp_path)
    for path in (root / "train").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(UserError, match="epoch 1: not one training image could be read"):
        run_recipe(load_recipe(_recipe(tiny_recipe, root)))  # was: a best.pt "trained" at loss 0.0000
    assert not (tmp_path / "runs" / "tiny" / "best.pt").exists()


def test_stats_follow_on_bad_image(tiny_coco: Path, tmp_path: Path) -> None:
    split = read_coco_split(_copy_data(tiny_coco, tmp_path), "train")
    split.image_paths[0].write_bytes(b"not an image")
    stats = compute_stats(split, 32)
    assert stats["skipped"] == 1 and stats["images"] == 24
    with pytest.raises(UserError, match="cannot read image .*data.on_bad_image"):
        compute_stats(split, 32, on_bad_image="error")


# 4. A val split without a positive: NaN mAP must still leave a best.pt and a report.
@pytest.mark.slow
def test_val_without_positives_still_selects_and_reports(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    root = _copy_data(tiny_coco, tmp_path)
    ann = root / "annotations" / "instances_val.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "annotations": []}))
    out = StringIO()
    run_dir = run_recipe(load_recipe(_recipe(tiny_recipe, root), ["train.epochs=2"]), console=Console(file=out))
    assert "no image of the val split has a label" in out.getvalue()
    assert torch.load(run_dir / "best.pt", weights_only=True)["train_state"]["best_epoch"] == 2
    assert (run_dir / "report.json").is_file()


# 5. validate refuses what run refuses.
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


# 6. Tracebacks instead of one line.
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


def _main(argv: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``finetune ARGV`` in this process: its exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["finetune", *argv])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


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


# 7. A run stopped before its first checkpoint can be rerun, or resumed.
def test_a_run_stopped_in_epoch_1_can_be_rerun_or_resumed(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer.train_one_epoch

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt)
    for _ in range(2):  # the second rerun finds the first one's leftovers
        with pytest.raises(UserError, match="interrupted"):
            run_recipe(load_recipe(tiny_recipe))
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "recipe.toml").is_file() and not (run_dir / "last.pt").exists()
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    run_recipe(RunDir.open(run_dir).resume_recipe(), resume=run_dir)  # was: "no last.pt to resume from"
    assert (run_dir / "report.json").is_file()
    with pytest.raises(UserError, match="already holds a run"):  # a run with a checkpoint is still never rerun
        run_recipe(load_recipe(tiny_recipe))


# 8. metrics.jsonl: a kill between the log line and the checkpoint, and a partial last line.
@pytest.mark.slow
def test_metrics_survive_a_kill_between_log_and_checkpoint(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer.checkpoint_state

    def killed(loop, hooks=()):
        if loop.state.epoch == 2:
            raise KeyboardInterrupt  # epoch 2 is logged, but its last.pt is never written
        return real(loop, hooks)

    monkeypatch.setattr(trainer, "checkpoint_state", killed)
    with pytest.raises(UserError, match="interrupted"):
        run_recipe(load_recipe(tiny_recipe, ["train.epochs=3"]))
    monkeypatch.setattr(trainer, "checkpoint_state", real)
    run_dir = tmp_path / "runs" / "tiny"
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "val_lo')  # and a kill in the middle of a line
    (run_dir / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    run_recipe(RunDir.open(run_dir).resume_recipe(), resume=run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


# 9. --resume --set, and eval --threshold.
@pytest.mark.slow
def test_resume_refuses_settings_that_change_the_run(tiny_recipe: Path, tmp_path: Path) -> None:
    run_dir = run_recipe(load_recipe(tiny_recipe, ["train.epochs=2"]))
    before = (run_dir / "recipe.toml").read_text()
    for bad in ("optim.lr=0.1", "data.batch_size=4", "model.name='mobilenetv2_050'"):
        with pytest.raises(UserError, match=rf"--set {bad.split('=')[0]}: cannot change on --resume"):
            RunDir.open(run_dir).resume_recipe([bad])
    with pytest.raises(UserError, match="train.epochs = 1: .* has already trained 2 epochs"):
        run_recipe(RunDir.open(run_dir).resume_recipe(["train.epochs=1"]), resume=run_dir)
    assert (run_dir / "recipe.toml").read_text() == before
    with pytest.raises(UserError, match="--threshold 1.5: a probability threshold is between 0 and 1"):
        cli.evaluate(run_dir, "test", 1.5)


# 10. File modes follow the umask, like an ordinary open().
def test_atomic_writes_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ckpt.atomic_write_text(tmp_path / "a.json", "{}")
        with (tmp_path / "b.json").open("w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644


# 11. Usability.
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


@pytest.mark.slow
def test_relative_root_and_second_calibrate(
    tiny_recipe: Path, tiny_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune.runs.evaluate import calibrate_run

    data = _copy_data(tiny_coco, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    recipe = _recipe(tiny_recipe, Path(os.path.relpath(data, work)))
    monkeypatch.chdir(work)
    run_dir = run_recipe(load_recipe(recipe))
    assert load_recipe(run_dir / "recipe.toml").data.root == str(data.resolve())
    written = [(run_dir / "thresholds.json").read_bytes()]
    monkeypatch.chdir(tmp_path)  # from another folder: the saved root is absolute
    for split in ("train", "val"):
        calibrate_run(run_dir, split, Console(file=StringIO()))
        written.append((run_dir / "thresholds.json").read_bytes())
    assert (run_dir / "thresholds.run.json").read_bytes() == written[0]  # the training's own, kept after two
    assert (run_dir / "thresholds.prev.json").read_bytes() == written[1]


SLOW_EPOCH_2 = """
import pathlib, sys, time
from finetune.train import fit as trainer
mark = pathlib.Path(sys.argv[1])
real = trainer.train_one_epoch
def slow(*args, **kwargs):
    if args[0].state.epoch == 1:  # in epoch 2: say so, then wait for the signal
        mark.write_text("epoch 2")
        time.sleep(120)
    return real(*args, **kwargs)
trainer.train_one_epoch = slow
from finetune.cli.app import main
sys.argv = ["finetune", "run", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
def test_sigterm_resumes_exactly_and_a_second_run_is_refused(tiny_recipe: Path, tmp_path: Path) -> None:
    import signal

    sets = ["train.epochs=3"]
    straight = run_recipe(load_recipe(tiny_recipe, [*sets, "output.name=straight"]))
    mark = tmp_path / "in-epoch-2"
    args = [str(tiny_recipe), *(a for s in [*sets, "output.name=cut"] for a in ("--set", s))]
    cmd = [sys.executable, "-c", SLOW_EPOCH_2, str(mark), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not mark.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert mark.exists(), proc.communicate()[1][-2000:]
    cut = tmp_path / "runs" / "cut"
    # Issue 24: while it trains, a second run into its directory (another seed) and a command that writes there are
    # refused in one line naming the holder; nothing of the first run's is touched.
    before = {p.name: p.stat().st_mtime_ns for p in cut.iterdir()}
    for other in (["run", str(tiny_recipe), *args[1:], "--set", "train.seed=1"], ["eval", str(cut)]):
        second = run_cli(*other)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert f"{cut} is in use by finetune run (pid {proc.pid} on " in " ".join(second.stderr.split())
    assert {p.name: p.stat().st_mtime_ns for p in cut.iterdir()} == before
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == f"error: terminated (SIGTERM); continue with `finetune run --resume {cut}`"
    assert RunDir.open(cut).checkpoint("last")["train_state"]["epoch"] == 1  # epoch 1 checkpoint, whole
    run_recipe(RunDir.open(cut).recipe(), resume=cut)
    wa, wb = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (straight, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
