"""Metric loggers as hooks: every epoch's record to JSON lines, CSV, TensorBoard, MLflow or Weights & Biases.

``metrics.jsonl`` is always written: it is the run's own record (``report``, ``--resume`` and the tests read it).
``[log] to`` adds the others. Each logger drops what a resumed run will write again: lines past the checkpoint's
epoch (JSONL, CSV), TensorBoard events from that step on (``purge_step``); an MLflow or W&B run is continued by its
id. W&B runs offline (``WANDB_MODE=offline``) unless the environment sets a mode: nothing leaves the machine unasked.
"""

from __future__ import annotations

import csv
import io
import math
import os
import secrets
from pathlib import Path
from typing import Any

from finetune import runfiles
from finetune.errors import UserError
from finetune.io import append_jsonl, atomic_write_text
from finetune.train.loop import Hook, Loop


def flat(record: dict[str, Any]) -> dict[str, float]:
    """Numeric entries of a record, nested dicts flattened (``lr_groups`` -> ``lr_groups/head``); NaN left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flat(value).items()})
        elif isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, int | float) and not math.isnan(value):
            out[key] = float(value)
    return out


class JsonlLogger(Hook):
    """``metrics.jsonl``: one JSON line per epoch, the record as it is (a resume trims it: RunDir.trim_metrics)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        append_jsonl(self.path, record)


class CsvLogger(Hook):
    """``metrics.csv``: one row per epoch, numeric columns only (``lr_groups`` flattened)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows: list[dict[str, float]] = []

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        if self.path.is_file():
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            self._rows = [{k: float(v) for k, v in r.items() if v != ""} for r in rows]
            self._rows = [r for r in self._rows if r.get("epoch", 0) <= loop.state.epoch]

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        self._rows.append(flat(record))
        columns = list(dict.fromkeys(k for r in self._rows for k in r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(self.path, buf.getvalue())  # rewritten whole: columns may appear in a later stage


class TensorBoardLogger(Hook):
    """TensorBoard event files under ``<run>/tensorboard``, one scalar per numeric key, the epoch as the step."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.log_dir), purge_step=loop.state.epoch + 1)

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        for key, value in flat(record).items():
            if key != "epoch":
                self._writer.add_scalar(key, value, global_step=record["epoch"])
        self._writer.flush()

    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        if self._writer is not None:
            self._writer.close()


class MlflowLogger(Hook):
    """An MLflow run in the local file store ``<run>/mlruns`` (experiment = the run's name), continued on resume."""

    def __init__(self, store: Path, experiment: str, params: dict[str, Any]) -> None:
        self.store, self.experiment, self.params = Path(store), experiment, params
        self._client: Any = None
        self._run_id = ""

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked; it is what a run directory
        # can hold without a database server (mlflow-skinny has no SQLAlchemy for sqlite).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.store.resolve().as_uri())
        id_file = self.store / "run_id.txt"
        if id_file.is_file():
            self._run_id = id_file.read_text().strip()
            self._client.update_run(self._run_id, status="RUNNING")
            return
        exp = self._client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self._client.create_experiment(self.experiment)
        self._run_id = self._client.create_run(exp_id, run_name=self.experiment).info.run_id
        for key, value in flat_params(self.params).items():
            self._client.log_param(self._run_id, key, value)
        atomic_write_text(id_file, self._run_id + "\n")

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        for key, value in flat(record).items():
            if key != "epoch":
                self._client.log_metric(self._run_id, key.replace("/", "."), value, step=int(record["epoch"]))

    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        if self._client is not None:
            self._client.set_terminated(self._run_id)


class WandbLogger(Hook):
    """A Weights & Biases run under ``<run>/wandb`` (``wandb sync`` uploads an offline one), continued on resume."""

    def __init__(self, run_dir: Path, name: str, params: dict[str, Any]) -> None:
        self.run_dir, self.name, self.params = Path(run_dir), name, params
        self._run: Any = None

    def on_fit_start(self, loop: Loop) -> None:  # noqa: D102
        os.environ.setdefault("WANDB_MODE", "offline")  # the user's own mode (online, disabled) wins
        try:
            import wandb
        except ImportError:
            raise UserError("log.to: \"wandb\" needs Weights & Biases: pip install -e '.[wandb]'") from None
        id_file = self.run_dir / runfiles.WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B's id form
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
        self._run = wandb.init(
            project="finetune",
            name=self.name,
            id=run_id,
            dir=str(self.run_dir),
            config=self.params,
            resume="allow",
            settings=settings,
        )
        atomic_write_text(id_file, run_id + "\n")

    def on_epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:  # noqa: D102
        self._run.log({k: v for k, v in flat(record).items() if k != "epoch"}, step=int(record["epoch"]))

    def on_fit_end(self, loop: Loop) -> None:  # noqa: D102
        if self._run is not None:
            self._run.finish()
            self._run = None


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A recipe dict as MLflow params: ``optim.lr`` -> ``"0.001"`` (values shortened to MLflow's limit)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def make_loggers(names: list[str], run_dir: Path, experiment: str, params: dict[str, Any]) -> list[Hook]:
    """The logger hooks for ``[log] to`` (``jsonl`` is always on)."""
    hooks: list[Hook] = [JsonlLogger(run_dir / runfiles.METRICS)]
    if "csv" in names:
        hooks.append(CsvLogger(run_dir / runfiles.METRICS_CSV))
    if "tensorboard" in names:
        hooks.append(TensorBoardLogger(run_dir / "tensorboard"))
    if "mlflow" in names:
        hooks.append(MlflowLogger(run_dir / "mlruns", experiment, params))
    if "wandb" in names:
        hooks.append(WandbLogger(run_dir, experiment, params))
    return hooks


LOGGERS = (JsonlLogger, CsvLogger, TensorBoardLogger, MlflowLogger, WandbLogger)
