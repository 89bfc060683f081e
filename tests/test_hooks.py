"""Hooks around the loop: a user's own hook, the metric loggers read back, early stopping and its resume."""

import csv
import json
from pathlib import Path

import pytest

from finetune.config import load_recipe
from finetune.hooks.early_stopping import EarlyStopping
from finetune.runs.run import run_recipe
from finetune.train.loop import FitSettings, Hook, Loop, TrainState


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_custom_hook_counts_steps_without_touching_the_package(tiny_recipe: Path) -> None:
    class CountSteps(Hook):
        def __init__(self) -> None:
            self.steps, self.epochs = 0, []

        def on_step_end(self, loop: Loop) -> None:
            self.steps += 1

        def on_epoch_end(self, loop: Loop, record: dict) -> None:
            self.epochs.append(record["epoch"])
            record["counted_steps"] = self.steps

    counter = CountSteps()
    run_dir = run_recipe(load_recipe(tiny_recipe, ["train.epochs=2"]), hooks=[counter])
    lines = _metrics(run_dir)
    assert counter.epochs == [1, 2] and counter.steps == lines[-1]["step"] == 6  # 24 images / batch 8, 2 epochs
    assert [m["counted_steps"] for m in lines] == [3, 6]  # the loggers run after a user's hooks


@pytest.mark.slow
def test_loggers_write_the_same_numbers_as_metrics_jsonl(tiny_recipe: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = ["train.epochs=2", 'log.to=["jsonl", "csv", "tensorboard", "mlflow"]', 'freeze.until="blocks.3"']
    run_dir = run_recipe(load_recipe(tiny_recipe, sets))
    lines = _metrics(run_dir)
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_map"]) for r in rows] == [m["val_map"] for m in lines]
    assert [float(r["lr_groups/classifier"]) for r in rows] == [m["lr_groups"]["classifier"] for m in lines]

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("val_map")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([m["val_map"] for m in lines], rel=1e-6)  # stored as float32

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run_id = (run_dir / "mlruns" / "run_id.txt").read_text().strip()
    history = client.get_metric_history(run_id, "train_loss")
    assert [(h.step, h.value) for h in history] == [(m["epoch"], m["train_loss"]) for m in lines]
    assert client.get_run(run_id).data.params["optim.lr"] == "0.001"


def _loop(epochs: int, state: TrainState) -> Loop:
    settings = FitSettings(device=None, epochs=epochs, select="map")  # type: ignore[arg-type]
    return Loop(
        model=None,
        loss_fn=None,
        optimizer=None,
        scheduler=None,
        scaler=None,
        train_loader=None,
        val_loader=None,
        settings=settings,
        run_dir=Path("."),
        state=state,
    )  # type: ignore[arg-type]


def test_early_stopping_reads_only_the_saved_state() -> None:
    hook = EarlyStopping(patience=2)
    for epoch, best, stops in ((3, 2, False), (4, 2, True), (5, 5, False), (10, 8, False)):
        state = TrainState(epoch=epoch, best_epoch=best)
        record: dict = {}
        hook.on_epoch_end(_loop(10, state), record)
        assert bool(state.stop_reason) == stops and ("stop_reason" in record) == stops, (epoch, best)
    state = TrainState(epoch=10, best_epoch=1)  # the last epoch: nothing left to stop
    hook.on_epoch_end(_loop(10, state), {})
    assert not state.stop_reason


@pytest.mark.slow
def test_early_stopping_ends_the_run_and_a_resume_trains_no_more(tiny_recipe: Path) -> None:
    # A learning rate of 1e-30 and every BN statistic frozen: the weights cannot move, so val mAP never improves.
    sets = ["train.epochs=4", "train.patience=1", "optim.lr=1e-30", 'freeze.bn="all"']
    run_dir = run_recipe(load_recipe(tiny_recipe, sets))
    assert [m["epoch"] for m in _metrics(run_dir)] == [1, 2]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["best_epoch"] == 1 and "early stopping after epoch 2" in report["stop_reason"]
    from finetune.rundir.directory import RunDir

    run_recipe(RunDir.open(run_dir).recipe(), resume=run_dir)
    assert [m["epoch"] for m in _metrics(run_dir)] == [1, 2]


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB's log format (32 KiB blocks, each record
    a 7-byte header of CRC, length and type: 1 whole, 2 first, 3 middle, 4 last piece). wandb 0.31 writes it from Go
    and ships no Python reader, so the test reads the documented format itself."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, records, pieces = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # the block's zero-filled tail
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            records.append(pieces)
    return records


def _wandb_history(run_dir: Path) -> list[dict]:
    """The ``history`` rows of a run's offline W&B files, parsed with W&B's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for data in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


@pytest.mark.extra("wandb")
def test_wandb_logs_offline_the_numbers_of_metrics_jsonl(tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = run_recipe(load_recipe(tiny_recipe, ["train.epochs=2", 'log.to=["wandb"]']))
    lines = _metrics(run_dir)
    history = _wandb_history(run_dir)
    assert [h["_step"] for h in history] == [1, 2]
    assert [h["val_map"] for h in history] == [m["val_map"] for m in lines]
    assert [h["train_loss"] for h in history] == [m["train_loss"] for m in lines]
    assert (run_dir / "wandb_id.txt").read_text().strip() in str(next(run_dir.glob("wandb/offline-run-*")))
