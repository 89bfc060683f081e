"""RunReport: the typed view of report.json reads what write_report wrote, and the writer leaves its input alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.data.split import ClassMap
from finetune.eval.report import write_report
from finetune.eval.run_report import RunReport
from finetune.eval.tasks import MULTI_LABEL, SINGLE_LABEL, VOC_MULTI_LABEL, task_for
from finetune.eval.thresholds import CalibrationSettings
from finetune.predictions import Predictions

CLASSES = ClassMap((1, 2, 3), ("cat", "dog", "car"))


def _outs(seed: int, single: bool = False) -> dict[str, Predictions]:
    rng = np.random.default_rng(seed)
    outs = {}
    for role, n in (("val", 60), ("test", 40)):
        if single:
            y = rng.integers(0, 3, n)
            logits = rng.normal(size=(n, 3)) + 2 * np.eye(3)[y]
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            y = np.eye(3, dtype=np.float32)[y]  # one-hot, as the loaders give them
        else:
            y = (rng.random((n, 3)) < 0.3).astype(np.float32)
            p = 1 / (1 + np.exp(-(3 * y - 1.5 + rng.normal(size=(n, 3)))))  # informative, offset from 0.5
        outs[role] = Predictions(probs=p, targets=y, index=np.arange(n))
    return outs


def test_the_view_reads_what_the_writer_wrote(tmp_path: Path) -> None:
    outs = _outs(0)
    report, scored = write_report(tmp_path, MULTI_LABEL, CLASSES, outs, cs=CalibrationSettings(min_positives=2))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert report.to_json() == on_disk and RunReport.load(tmp_path / "report.json").to_json() == on_disk
    assert scored is outs  # nothing scaled: the caller's predictions come back as they were
    for role in ("val", "test"):
        split = report.splits[role]
        assert split.images == len(outs[role]) == on_disk["splits"][role]["images"]
        assert split.summary == on_disk["splits"][role]["summary"]
        assert split.calibrated_summary == on_disk["splits"][role]["calibrated"]["summary"]
        assert [r["name"] for r in split.per_class] == list(CLASSES.names)
    honest = report.honest
    assert honest is not None and honest.how == on_disk["calibration"]["honest"]["how"] == "test split"
    assert honest.calibrated == on_disk["calibration"]["honest"]["calibrated"]
    assert report.task == "multi_label" and report.threshold == 0.5 and report.shown_split == "test"
    assert report.reject is None and report.sampler is None and report.voc07_map == {}


def test_scaling_returns_new_predictions_and_leaves_the_callers(tmp_path: Path) -> None:
    outs = _outs(1)
    before = {r: o.probs.copy() for r, o in outs.items()}
    cs = CalibrationSettings(min_positives=2, probabilities="platt")
    report, scored = write_report(tmp_path, MULTI_LABEL, CLASSES, outs, cs=cs)
    for role in outs:
        np.testing.assert_array_equal(outs[role].probs, before[role])  # was replaced in place before 0.8
        assert not np.allclose(scored[role].probs, before[role])
    assert report.probabilities is not None and report.probabilities["method"] == "platt"


def test_single_label_and_voc_parts(tmp_path: Path) -> None:
    report, _ = write_report(tmp_path, SINGLE_LABEL, CLASSES, _outs(2, single=True), cs=CalibrationSettings())
    cells = report.splits["test"].confusion
    assert sum(n for _, _, n in cells) == 40 and report.threshold is None and report.honest is None
    assert task_for("voc") is VOC_MULTI_LABEL and task_for("coco") is MULTI_LABEL
    voc = VOC_MULTI_LABEL.report_extras(_outs(3))["voc07_map"]
    assert set(voc) == {"val", "test"} and all(0 < v <= 1 for v in voc.values())


def test_a_view_hands_out_copies() -> None:
    data = {"task": "multi_label", "splits": {"val": {"images": 1, "summary": {"map": 0.5}, "per_class": []}}}
    report = RunReport(data)
    report.splits["val"].summary["map"] = 0.0
    report.to_json()["task"] = "single_label"
    data["task"] = "changed after"
    assert report.splits["val"].summary["map"] == 0.5 and report.task == "multi_label"
    assert RunReport.of(report) is report and RunReport.of(data).task == "changed after"
    with pytest.raises(KeyError):
        _ = RunReport({"splits": {}}).task
