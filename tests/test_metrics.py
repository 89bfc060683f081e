import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from finetune.eval.metrics import average_precision, prf, summarize


def random_case(seed: int, n: int = 300, c: int = 8, decimals: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < rng.uniform(0.02, 0.5, c)
    scores = np.round(np.clip(rng.random((n, c)) * 0.7 + 0.3 * y, 0, 1), decimals)  # rounding makes ties
    y[:, -1] = False  # a class with no positives
    return y, scores


@pytest.mark.parametrize("seed", range(5))
def test_ap_matches_sklearn_with_ties(seed: int) -> None:
    y, s = random_case(seed)
    ours = average_precision(y, s)
    for c in range(y.shape[1]):
        if y[:, c].any():
            assert ours[c] == pytest.approx(average_precision_score(y[:, c], s[:, c]), abs=1e-12)
        else:
            assert np.isnan(ours[c])
    assert summarize(y, s)["map"] == pytest.approx(np.mean([x for x in ours if not np.isnan(x)]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_prf_matches_sklearn(seed: int, threshold: float) -> None:
    y, s = random_case(seed)
    pred = s >= threshold
    m = prf(y, s, threshold)
    kw = {"zero_division": 0}
    np.testing.assert_allclose(m["precision"], precision_score(y, pred, average=None, **kw))
    np.testing.assert_allclose(m["recall"], recall_score(y, pred, average=None, **kw))
    np.testing.assert_allclose(m["f1"], f1_score(y, pred, average=None, **kw))
    has_pos = np.flatnonzero(y.any(0))  # macro = mean over classes that have positives
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=has_pos, **kw))
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", **kw))
    assert m["micro_precision"] == pytest.approx(precision_score(y, pred, average="micro", **kw))
    assert m["micro_recall"] == pytest.approx(recall_score(y, pred, average="micro", **kw))


def test_per_class_thresholds() -> None:
    y, s = random_case(7)
    thr = np.linspace(0.2, 0.8, y.shape[1])
    np.testing.assert_allclose(prf(y, s, thr)["f1"], f1_score(y, s >= thr, average=None, zero_division=0))


def test_bad_inputs() -> None:
    y, s = random_case(0)
    with pytest.raises(ValueError, match="NaN or inf"):
        average_precision(y, np.where(s > 0.9, np.nan, s))
    with pytest.raises(ValueError, match="one shape"):
        prf(y, s[:, :3])


@pytest.mark.parametrize("seed", range(3))
def test_ml_gcn_cp_cr_cf1_op_or_of1(seed: int) -> None:
    y, s = random_case(seed)
    m = summarize(y, s, 0.4)
    pred = s >= 0.4
    has = y.any(0)
    cp = precision_score(y[:, has], pred[:, has], average="macro", zero_division=0)
    cr = recall_score(y[:, has], pred[:, has], average="macro", zero_division=0)
    assert m["cp"] == pytest.approx(cp) and m["cr"] == pytest.approx(cr)
    assert m["cf1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert m["op"] == pytest.approx(precision_score(y, pred, average="micro", zero_division=0))
    assert m["or"] == pytest.approx(recall_score(y, pred, average="micro", zero_division=0))
    assert m["of1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0))


def test_per_sample_thresholds() -> None:
    y, s = random_case(0)
    t = np.random.default_rng(1).uniform(0.2, 0.8, s.shape)
    m = prf(y, s, t)
    assert m["micro_f1"] == pytest.approx(f1_score(y, s >= t, average="micro", zero_division=0))
