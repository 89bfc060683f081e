"""The Predictions type: joining DDP shards, taking rows, and never writing into its caller's arrays."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from finetune.predictions import Predictions


def _shard(index: list[int], loss: float | None = None) -> Predictions:
    idx = np.asarray(index, dtype=np.int64)
    probs = np.stack([idx / 10, 1 - idx / 10], 1) if len(idx) else np.zeros((0, 2))
    targets = (probs > 0.5).astype(np.float32)
    return Predictions(probs=probs, targets=targets, index=idx, loss=loss)


def test_join_puts_rows_in_dataset_order_once_and_weights_the_loss() -> None:
    # Two ranks of a padded sampler: rank 1 repeats image 0 to even out the shards; a third rank got nothing.
    joined = Predictions.join([_shard([0, 2, 4], 1.0), _shard([1, 3, 0], 4.0), _shard([], 9.0)])
    assert joined.index.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(joined.probs[:, 0], np.arange(5) / 10)
    assert joined.loss == pytest.approx((3 * 1.0 + 3 * 4.0) / 6)  # the empty shard does not count
    assert Predictions.join([_shard([1]), _shard([])]).index.tolist() == [1]
    assert Predictions.join([_shard([0]), _shard([1])]).loss is None  # nobody asked for the loss


def test_rows_paths_and_unknown() -> None:
    p = _shard([3, 1, 2])
    assert p.take(np.array([True, False, True])).index.tolist() == [3, 2]
    assert p.paths(["a", "b", "c", "d"]) == ["d", "b", "c"]
    with_nan = dataclasses.replace(p, targets=np.array([[np.nan, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    assert with_nan.unknown.tolist() == [[True, False], [False, False], [False, False]]
    assert not Predictions(probs=np.ones((2, 3)) / 3, targets=np.eye(3)[[0, 2]]).unknown.any()  # single-label


def test_with_probs_leaves_the_original_alone() -> None:
    p = _shard([0, 1])
    before = p.probs.copy()
    q = p.with_probs(p.probs**2)
    np.testing.assert_array_equal(p.probs, before)
    assert q.index is p.index and not np.array_equal(q.probs, p.probs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.probs = before  # type: ignore[misc]


def test_string_keys_still_read_with_a_deprecation_warning() -> None:
    p = _shard([0, 1], loss=0.5)
    with pytest.warns(DeprecationWarning, match=r"use \.probs"):
        assert p["probs"] is p.probs
    with pytest.warns(DeprecationWarning):
        assert p["loss"] == 0.5
    with pytest.raises(KeyError):
        p["logits"]
    assert "probs" in p and "loss" in p and "logits" not in p and "loss" not in _shard([0, 1])


def test_a_report_still_reads_as_a_dict_with_a_deprecation_warning() -> None:
    from finetune.eval.run_report import RunReport

    report = RunReport({"task": "multi_label", "threshold": 0.5, "splits": {"val": {"summary": {"mAP": 0.5}}}})
    with pytest.warns(DeprecationWarning, match="RunReport"):
        splits = report["splits"]
    splits["val"]["summary"]["mAP"] = 1.0  # a copy: the report is not changed through it
    assert report.splits["val"].summary["mAP"] == 0.5 and "threshold" in report and "calibration" not in report
