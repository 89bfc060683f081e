"""Threshold calibration against a brute-force search and scikit-learn; edge cases; honest cross-fitting."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import fbeta_score, precision_recall_curve

from finetune.eval.thresholds import Calibration, best_thresholds, cross_fit, fit_thresholds, global_threshold


def case(seed: int, n: int = 200, c: int = 6, decimals: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < rng.uniform(0.03, 0.5, c)
    p = np.round(np.clip(rng.random((n, c)) * 0.6 + 0.35 * y, 0, 1), decimals)  # rounding makes ties
    return y, p


def brute_force(y: np.ndarray, p: np.ndarray, beta: float = 1.0, sklearn: bool = False) -> tuple[float, float]:
    """Try every distinct probability as a threshold (highest first); keep the first best F-beta.

    The F-beta of each threshold is counted directly, or (``sklearn``) by scikit-learn's ``fbeta_score``.
    """
    best_t, best_f = np.inf, -1.0
    for t in np.unique(p)[::-1]:
        pred = p >= t
        if sklearn:
            f = fbeta_score(y, pred, beta=beta, zero_division=0)
        else:
            tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
            b2 = beta * beta
            f = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp) if tp else 0.0
        if f > best_f + 1e-12:
            best_t, best_f = t, f
    return best_t, best_f


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_thresholds_equal_brute_force(seed: int, beta: float) -> None:
    y, p = case(seed, decimals=2 if seed % 2 else 6)
    thr, score = best_thresholds(y, p, beta)
    for c in range(y.shape[1]):
        t, f = brute_force(y[:, c], p[:, c], beta, sklearn=seed < 2 and c < 2)  # sklearn's F-beta on a few
        assert thr[c] == t and score[c] == pytest.approx(f, abs=1e-12), c


@pytest.mark.parametrize("seed", range(4))
def test_best_f1_equals_argmax_over_sklearn_precision_recall_curve(seed: int) -> None:
    y, p = case(seed, n=500)
    thr, score = best_thresholds(y, p)
    for c in range(y.shape[1]):
        prec, rec, cand = precision_recall_curve(y[:, c], p[:, c])
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.nan_to_num(2 * prec * rec / (prec + rec))[:-1]
        assert score[c] == pytest.approx(f.max(), abs=1e-12)
        assert f[np.searchsorted(cand, thr[c])] == pytest.approx(f.max(), abs=1e-12)


def test_global_threshold_maximises_micro_f1() -> None:
    y, p = case(3)
    g, f = global_threshold(y, p)
    t, bf = brute_force(y.ravel(), p.ravel())
    assert g == t and f == pytest.approx(bf)


def test_edge_cases_behave_as_documented() -> None:
    y = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0]], dtype=bool)
    p = np.array([[0.9, 0.2, 0.6, 0.3], [0.4, 0.1, 0.6, 0.2], [0.7, 0.8, 0.6, 0.9], [0.2, 0.3, 0.1, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak to the user
        cal = fit_thresholds(y, p, min_positives=1)
        thr, score = best_thresholds(y, p)
    assert thr[0] == 0.2 and score[0] == 1.0  # all positive: the lowest probability, everything predicted positive
    assert np.isinf(thr[1]) and score[1] == 0.0  # no positives: nothing to fit ...
    assert cal.source[1] == "global" and cal.thresholds[1] == cal.global_threshold  # ... so the global threshold
    assert thr[2] == 0.6 and score[2] == pytest.approx(0.8)  # a tie group is one threshold: 0.6 takes all three
    one = fit_thresholds(np.array([[True, False]]), np.array([[0.3, 0.7]]))
    assert one.thresholds[0] == 0.3 and one.source == ["fitted", "global"]
    with pytest.raises(ValueError, match="NaN or inf .* sample 1, class 0"):
        fit_thresholds(y, np.where(np.arange(4)[:, None] == 1, np.nan, p))


def test_min_positives_and_shrinkage() -> None:
    y, p = case(1, n=300)
    support = y.sum(0)
    plain = fit_thresholds(y, p)
    k = int(np.sort(support)[2])  # the two rarest classes fall below it
    rare = fit_thresholds(y, p, min_positives=k)
    assert [s == "global" for s in rare.source] == list(support < k)
    assert np.all(rare.thresholds[support < k] == rare.global_threshold)
    shrunk = fit_thresholds(y, p, shrink=10.0)
    expected = (support * plain.thresholds + 10.0 * plain.global_threshold) / (support + 10.0)
    assert np.allclose(shrunk.thresholds, expected)
    fb = fit_thresholds(y, p, metric="fbeta", beta=2.0)
    assert np.all(fb.thresholds <= plain.thresholds + 1e-12)  # beta > 1 favours recall: never a higher threshold


def test_cross_fitting_never_scores_a_fold_with_its_own_thresholds() -> None:
    y, p = case(2, n=103)
    seen: list[set[int]] = []

    def spy(yf: np.ndarray, pf: np.ndarray, **kw) -> Calibration:
        rows = {int(r) for r in np.round(pf[:, -1] * 1e6)}  # the last column carries each row's id
        seen.append(rows)
        cal = fit_thresholds(yf, pf, **kw)
        cal.thresholds = np.full(pf.shape[1], float(len(seen)))  # tag: which fit produced the thresholds
        return cal

    p = p.copy()
    p[:, -1] = np.arange(len(p)) / 1e6
    per_row, fold = cross_fit(y, p, folds=5, seed=0, fit=spy)
    assert len(seen) == 5 and sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    for i in range(len(p)):
        fit_id = int(per_row[i, 0])
        assert i not in seen[fit_id - 1]  # the fit that scored row i never saw it
        assert fit_id - 1 == fold[i]
    assert all(len(s) == len(p) - np.sum(fold == f) for f, s in enumerate(seen))


def test_calibration_round_trips_through_json() -> None:
    y, p = case(0)
    cal = fit_thresholds(y, p, min_positives=5)
    cal.names = [f"c{i}" for i in range(y.shape[1])]
    back = Calibration.from_json(cal.to_json())
    assert np.array_equal(back.thresholds, cal.thresholds) and back.names == cal.names and back.source == cal.source


def test_auto_shrink_keeps_micro_f1_and_maximises_macro_f1_out_of_fold() -> None:
    from finetune.eval.metrics import summarize
    from finetune.eval.thresholds import SHRINK_CANDIDATES, choose_shrink, cross_fit

    rng = np.random.default_rng(3)
    y = (rng.random((300, 6)) < [0.5, 0.3, 0.1, 0.05, 0.03, 0.02]).astype(int)
    p = np.clip(0.35 * y + rng.normal(0.3, 0.2, y.shape), 0.001, 0.999)
    k, scores = choose_shrink(y, p, 0.5, folds=4, seed=0, min_positives=3)
    floor = summarize(y, p, 0.5)["micro_f1"] - 0.005
    for c in SHRINK_CANDIDATES:  # recompute every candidate independently
        per_row, _ = cross_fit(y, p, 4, 0, min_positives=3, shrink=c)
        assert summarize(y, p, per_row)["macro_f1"] == pytest.approx(scores[c]["macro_f1"])
    keeping = [c for c in SHRINK_CANDIDATES if scores[c]["micro_f1"] >= floor]
    assert keeping and k in keeping
    assert scores[k]["macro_f1"] == max(scores[c]["macro_f1"] for c in keeping)
