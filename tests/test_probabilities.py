"""Per-class temperature and Platt scaling, ECE and Brier, against independent references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from finetune.eval.probabilities import brier, ece, fit_scaling, fold_into, logits_of, smoothed_targets


def _data(seed: int, n: int = 300, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < rng.uniform(0.1, 0.5, c)
    z = rng.normal(0, 1, (n, c)) + 3.0 * y - 1.5  # overconfident logits: scaled by 2.5 below
    return y, 1 / (1 + np.exp(-2.5 * z))


@pytest.mark.parametrize("seed", range(3))
def test_platt_equals_logistic_regression_on_the_logit(seed: int) -> None:
    y, p = _data(seed)
    s = fit_scaling(y, p, "platt")
    z, t = logits_of(p), smoothed_targets(y)
    for j in range(y.shape[1]):  # soft targets as two weighted copies of every row
        x = np.concatenate([z[:, j], z[:, j]])[:, None]
        labels = np.concatenate([np.ones(len(z)), np.zeros(len(z))])
        weights = np.concatenate([t[:, j], 1 - t[:, j]])
        lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x, labels, sample_weight=weights)
        assert s.a[j] == pytest.approx(lr.coef_[0, 0], abs=1e-4)
        assert s.b[j] == pytest.approx(lr.intercept_[0], abs=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_temperature_equals_a_brute_force_search(seed: int) -> None:
    y, p = _data(seed)
    s = fit_scaling(y, p, "temperature")
    z, t = logits_of(p), smoothed_targets(y)

    def loss(a: float, j: int) -> float:
        q = np.clip(1 / (1 + np.exp(-a * z[:, j])), 1e-15, 1 - 1e-15)
        return float(-(t[:, j] * np.log(q) + (1 - t[:, j]) * np.log(1 - q)).mean())

    for j in range(y.shape[1]):
        grid = np.exp(np.linspace(np.log(0.01), np.log(10), 2001))
        lo, hi = (
            grid[max(np.argmin([loss(a, j) for a in grid]) - 1, 0)],
            grid[np.argmin([loss(a, j) for a in grid]) + 1],
        )
        for _ in range(100):  # golden-section refinement of the grid's bracket
            m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
            lo, hi = (lo, m2) if loss(m1, j) < loss(m2, j) else (m1, hi)
        assert s.a[j] == pytest.approx((lo + hi) / 2, abs=1e-4) and s.b[j] == 0


def test_scaling_lowers_ece_and_brier_and_keeps_the_ranking() -> None:
    y, p = _data(0, n=2000)
    s = fit_scaling(y[:1000], p[:1000], "platt")
    after = s.apply(p[1000:])
    assert ece(y[1000:], after) < 0.5 * ece(y[1000:], p[1000:])
    assert brier(y[1000:], after) < brier(y[1000:], p[1000:])
    assert (np.argsort(after, 0, kind="stable") == np.argsort(p[1000:], 0, kind="stable")).all()


@pytest.mark.parametrize("seed", range(3))
def test_ece_and_brier_equal_scikit_learn(seed: int) -> None:
    y, p = _data(seed)
    flat_y, flat_p = y.ravel(), p.ravel()
    true, pred = calibration_curve(flat_y, flat_p, n_bins=15, strategy="uniform")
    counts = np.histogram(flat_p, bins=np.linspace(0, 1, 16))[0]
    want = (counts[counts > 0] / len(flat_p) * np.abs(true - pred)).sum()
    assert ece(y, p) == pytest.approx(want, abs=1e-12)
    assert brier(y, p) == pytest.approx(brier_score_loss(flat_y, flat_p), abs=1e-12)


def test_the_scaling_folds_into_the_classifier() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    probs = torch.sigmoid(layer(x)).detach().numpy()
    s = fit_scaling(np.random.default_rng(0).random((20, 3)) < 0.4, probs, "platt")
    fold_into(layer, s)
    np.testing.assert_allclose(torch.sigmoid(layer(x)).detach().numpy(), s.apply(probs), atol=1e-9)


def test_a_class_without_positives_is_left_alone() -> None:
    y, p = _data(1)
    y[:, 2] = False
    s = fit_scaling(y, p, "platt")
    assert (s.a[2], s.b[2]) == (1.0, 0.0)


@pytest.mark.slow
def test_a_scaled_run_and_its_exports_give_the_calibrated_probabilities(tiny_recipe: Path, tiny_coco: Path) -> None:
    from finetune.assembly import build_from_run
    from finetune.config import load_recipe
    from finetune.deploy.export import export_run
    from finetune.deploy.predictor import Predictor
    from finetune.eval.probabilities import Scaling
    from finetune.rundir.directory import RunDir
    from finetune.runs.evaluate import evaluate_run
    from finetune.runs.predict import predictions
    from finetune.runs.run import run_recipe

    run_dir = run_recipe(load_recipe(tiny_recipe, ['calibrate.probabilities="platt"']))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["probabilities"]["how"] == "test split" and (run_dir / "reliability.png").is_file()
    scaling = Scaling.from_json(json.loads((run_dir / "probabilities.json").read_text()))
    run = RunDir.open(run_dir)
    raw = predictions(build_from_run(run, ["test"], scaled=False), ["test"])["test"].probs
    folded = predictions(build_from_run(run, ["test"]), ["test"])["test"].probs
    np.testing.assert_allclose(folded, scaling.apply(raw), atol=1e-5, rtol=0)  # the model itself is scaled
    # the report scored the scaled probabilities: its calibrated test numbers are what `eval` gets from the model, up
    # to a probability within float32 rounding of a threshold (a 1-epoch model's scaled scores sit close together)
    evaluated = evaluate_run(run_dir, "test").splits["test"].calibrated_summary
    assert evaluated["micro_f1"] == pytest.approx(
        report["splits"]["test"]["calibrated"]["summary"]["micro_f1"], abs=0.01
    )
    export_run(run_dir, "onnx")
    export_run(run_dir, "torchscript")
    images = sorted((tiny_coco / "train").iterdir())[:16]
    ours = Predictor.from_run(run_dir).predict(images)
    want = np.array([list(r.probabilities.values()) for r in ours])
    for path in ("model.onnx", "model.pt"):
        got = np.array(
            [list(r.probabilities.values()) for r in Predictor.load(run_dir / "export" / path).predict(images)]
        )
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # INT8 is quantized from the scaled ONNX: within the INT8 export's own tolerance of the scaled fp32 model
    from finetune.deploy.quantize import backend_outputs

    from .test_device_export import INT8_MAX, INT8_MEAN, _onnx

    export_run(run_dir, "onnx", int8=True)
    test = build_from_run(run, ("test",))
    int8, fp32 = (_onnx(run_dir / "export" / name)[0] for name in ("model.int8.onnx", "model.onnx"))
    diff = np.abs(backend_outputs(int8, test, ["test"])["test"].probs - folded)
    assert np.abs(backend_outputs(fp32, test, ["test"])["test"].probs - folded).max() < 1e-5
    assert diff.max() <= INT8_MAX and diff.mean() <= INT8_MEAN, (diff.max(), diff.mean())


def _softmax_data(seed: int, n: int = 400, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """One-hot labels and overconfident softmax probabilities (logits scaled by 3)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    z = 3.0 * (rng.normal(size=(n, c)) + 1.2 * np.eye(c)[labels])
    p = np.exp(z - z.max(1, keepdims=True))
    return np.eye(c)[labels], p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", range(3))
def test_single_label_temperature_equals_a_brute_force_search(seed: int) -> None:
    y, p = _softmax_data(seed)
    s = fit_scaling(y, p, "temperature", softmax=True)
    logp, n, c = np.log(p), len(y), y.shape[1]
    t = np.where(y > 0, (n + 1) / (n + 2), 1 / ((n + 2) * (c - 1)))  # Platt's smoothing, as documented

    def nll(a: float) -> float:
        z = a * logp
        z = z - z.max(1, keepdims=True)
        return float(-(t * (z - np.log(np.exp(z).sum(1, keepdims=True)))).sum(1).mean())

    grid = np.exp(np.linspace(np.log(0.01), np.log(10), 4001))
    best = int(np.argmin([nll(a) for a in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[best + 1]
    for _ in range(100):
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, m2) if nll(m1) < nll(m2) else (m1, hi)
    assert np.allclose(s.a, (lo + hi) / 2, atol=1e-4) and (s.b == 0).all() and s.softmax
    after = s.apply(p)
    assert np.allclose(after.sum(1), 1) and (after.argmax(1) == p.argmax(1)).all()
    assert s.a[0] < 1  # overconfident: the temperature softens
    with pytest.raises(ValueError, match="temperature scaling only"):
        fit_scaling(y, p, "platt", softmax=True)
    right = np.eye(y.shape[1])[p.argmax(1)]  # a split the model gets all right: a finite temperature, no saturation
    assert 0.05 < fit_scaling(right, p, "temperature", softmax=True).a[0] < 20


@pytest.mark.parametrize("seed", range(2))
def test_top_label_ece_and_multiclass_brier_equal_scikit_learn(seed: int) -> None:
    y, p = _softmax_data(seed)
    hit, conf = (p.argmax(1) == y.argmax(1)).astype(float), p.max(1)
    true, pred = calibration_curve(hit, conf, n_bins=15, strategy="uniform")
    counts = np.histogram(conf, bins=np.linspace(0, 1, 16))[0]
    assert ece(y, p, softmax=True) == pytest.approx((counts[counts > 0] / len(conf) * np.abs(true - pred)).sum())
    per_class = sum(brier_score_loss(y[:, k], p[:, k]) for k in range(y.shape[1]))
    assert brier(y, p, softmax=True) == pytest.approx(per_class, abs=1e-12)


def test_a_softmax_temperature_folds_into_the_classifier() -> None:
    torch.manual_seed(1)
    layer = torch.nn.Linear(8, 4).double()
    x = torch.randn(30, 8, dtype=torch.float64)
    probs = torch.softmax(layer(x), 1).detach().numpy()
    y = np.eye(4)[np.random.default_rng(1).integers(0, 4, 30)]
    s = fit_scaling(y, probs, "temperature", softmax=True)
    assert json.loads(json.dumps(s.to_json()))["activation"] == "softmax"
    fold_into(layer, s)
    np.testing.assert_allclose(torch.softmax(layer(x), 1).detach().numpy(), s.apply(probs), atol=1e-9)
