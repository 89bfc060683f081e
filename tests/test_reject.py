"""The single-label reject option: the threshold search against brute force, the curve, labels and the recipe rules."""

from pathlib import Path

import numpy as np
import pytest

from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.eval.reject import coverage_accuracy, curve, fit_reject, reject_threshold
from finetune.eval.thresholds import CalibrationSettings
from finetune.labels import label_indices
from finetune.predictions import Predictions

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _data(seed: int, n: int = 300, c: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """One-hot targets and softmax rows whose confidence tracks correctness (rounded, so tops tie)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.5 * np.eye(c)[labels] * rng.random((n, 1))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return np.eye(c)[labels], np.round(p, 2)


def _brute(targets: np.ndarray, probs: np.ndarray, target: float) -> float:
    """Every distinct top probability as a threshold: the lowest (most coverage) whose answers meet the target."""
    top, correct = probs.max(1), probs.argmax(1) == targets.argmax(1)
    ok = [t for t in np.unique(top) if correct[top >= t].mean() >= target - 1e-12]
    return min(ok) if ok else np.inf


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("target", [0.5, 0.6, 0.8, 0.95])
def test_reject_threshold_equals_a_brute_force_search(seed: int, target: float) -> None:
    y, p = _data(seed)
    thr, reached, met = reject_threshold(y, p, target)
    want = _brute(y, p, target)
    if np.isfinite(want):
        assert thr == want and met and reached >= target - 1e-12
        assert coverage_accuracy(y, p, thr)[1] == pytest.approx(reached)
    else:  # out of reach: the stated fallback is the most accurate point there is
        assert not met
        top, correct = p.max(1), p.argmax(1) == y.argmax(1)
        assert reached == pytest.approx(max(correct[top >= t].mean() for t in np.unique(top)))


def test_the_lowest_threshold_that_meets_the_target_wins() -> None:
    y = np.eye(2)[[0, 0, 0, 0]]
    p = np.array([[0.9, 0.1], [0.85, 0.15], [0.2, 0.8], [0.3, 0.7]])  # tops 0.9 right, 0.85 right, 0.8 / 0.7 wrong
    assert reject_threshold(y, p, 0.5) == (0.7, 0.5, True)  # answering all four still meets 0.5
    assert reject_threshold(y, p, 0.6)[0] == 0.8 and reject_threshold(y, p, 0.7)[0] == 0.85
    assert reject_threshold(np.eye(2)[[1, 1]], p[:2], 0.9) == (np.nextafter(0.9, 1), 0.0, False)  # none right


def test_the_curve_is_coverage_and_accuracy_at_each_threshold() -> None:
    y, p = _data(7)
    c = curve(y, p, points=25)
    assert len(c["threshold"]) <= 25 and c["coverage"][-1] == 1.0
    assert np.all(np.diff(c["coverage"]) > 0) and np.all(np.diff(c["threshold"]) < 0)
    for t, cov, acc in zip(c["threshold"], c["coverage"], c["accuracy"]):
        assert (cov, acc) == pytest.approx(coverage_accuracy(y, p, t))


def test_held_out_numbers_are_measured_on_the_test_split() -> None:
    y, p = _data(1)
    yt, pt = _data(2)
    cs = CalibrationSettings(metric="accuracy_at_least", target=0.8, margin=0.05)
    r = fit_reject(cs, {"val": Predictions(probs=p, targets=y), "test": Predictions(probs=pt, targets=yt)})
    assert r["threshold"] == reject_threshold(y, p, 0.85)[0]
    cov, acc = coverage_accuracy(yt, pt, r["threshold"])
    assert r["held_out"]["how"] == "test split" and (r["held_out"]["coverage"], r["held_out"]["accuracy"]) == (cov, acc)
    assert r["answer_all"]["coverage"] == 1.0
    folds = fit_reject(cs, {"val": Predictions(probs=p, targets=y)})
    assert folds["held_out"]["how"].startswith("5-fold cross-fitting on val")


def test_single_label_labels_are_none_below_the_reject_threshold() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert label_indices(probs, False, 0.0) == [[0], [0]]
    assert label_indices(probs, False, 0.5) == [[0], []]
    assert label_indices(probs, False, np.array([0.5, 0.5, 0.5])) == [[0], []]


@pytest.mark.parametrize(
    ("recipe", "sets", "needle"),
    [
        ("coco_multilabel_focal.toml", ['calibrate.objective="accuracy_at_least"', "calibrate.target=0.9"],
         "is the single-label reject option"),
        ("imagenette_standard.toml", ['calibrate.objective="accuracy_at_least"'], "needs a target in (0, 1]"),
        ("imagenette_standard.toml", ['calibrate.objective="recall_at_least"', "calibrate.target=0.9"],
         '"accuracy_at_least" sets a reject option'),
        ("coco_multilabel_focal.toml", ['calibrate.classes={person={objective="accuracy_at_least", target=0.9}}'],
         "not one class"),
    ],
)  # fmt: skip
def test_reject_option_rules_are_one_line_errors(recipe: str, sets: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(RECIPES / recipe, sets)


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (['calibrate.objective="accuracy_at_least"', "calibrate.target=0.9", "calibrate.enabled=false"],
         "calibrate.objective does nothing with calibrate.enabled = false"),
        (['calibrate.probabilities="temperature"', "calibrate.enabled=false"],
         "calibrate.probabilities does nothing with calibrate.enabled = false"),
        (['calibrate.probabilities="platt"'], 'it takes one "temperature"'),
    ],
)  # fmt: skip
def test_calibration_settings_that_would_do_nothing_are_refused(sets: list[str], needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        load_recipe(RECIPES / "imagenette_standard.toml", sets)
    load_recipe(RECIPES / "imagenette_standard.toml", sets[:-1] if "enabled=false" in sets[-1] else [])
