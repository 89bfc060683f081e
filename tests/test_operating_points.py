"""Operating points (precision / recall at least a target), against an exhaustive search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.eval.thresholds import constrained_thresholds, cross_fit, fit_thresholds

from .conftest import assert_user_error, run_cli


def _brute(y: np.ndarray, p: np.ndarray, objective: str, target: float) -> tuple[float, float, bool]:
    """Every distinct score tried as the threshold, highest first; the rule of the docstring, written out."""
    if not y.any():
        return np.inf, 0.0, False
    points = []
    for t in sorted(set(p.tolist()), reverse=True):
        pred = p >= t
        tp = int((pred & y).sum())
        precision, recall = tp / pred.sum(), tp / y.sum()
        points.append((t, tp, precision, recall))
    if objective == "recall_at_least":
        ok = [q for q in points if q[1] >= target * y.sum() - 1e-9]
        best = max(ok, key=lambda q: (q[2], q[0]))
        return best[0], best[3], True
    ok = [q for q in points if q[1] > 0 and q[1] >= target * (q[1] / q[2]) - 1e-9]
    if ok:
        best = max(ok, key=lambda q: (q[1], q[2], q[0]))
        return best[0], best[2], True
    with_tp = [q for q in points if q[1] > 0]
    best = max(with_tp, key=lambda q: (round(q[2], 12), q[1], q[0]))
    return best[0], best[2], False


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("objective", ["recall_at_least", "precision_at_least"])
def test_constrained_search_equals_an_exhaustive_one(seed: int, objective: str) -> None:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(5, 60)), 7
    y = rng.random((n, c)) < rng.uniform(0.05, 0.6, c)
    p = np.round(rng.random((n, c)) * 0.6 + 0.4 * y * rng.random((n, c)), int(rng.integers(1, 4)))  # with ties
    y[:, 0] = False  # a class without positives
    for target in (0.3, 0.8, 0.95, 1.0):
        thr, reached, met = constrained_thresholds(y, p, objective, target)
        for j in range(c):
            want = _brute(y[:, j], p[:, j], objective, target)
            assert (thr[j], met[j]) == (want[0], want[2]), (j, target)
            assert reached[j] == pytest.approx(want[1])


def test_fit_thresholds_mixes_objectives_and_keeps_f1_classes_as_before() -> None:
    rng = np.random.default_rng(0)
    y = rng.random((200, 5)) < 0.3
    p = np.clip(0.5 * y + rng.normal(0.3, 0.2, y.shape), 0, 1)
    plain = fit_thresholds(y, p, min_positives=1)
    mixed = fit_thresholds(y, p, min_positives=1, overrides={2: ("recall_at_least", 0.9)})
    assert np.array_equal(np.delete(mixed.thresholds, 2), np.delete(plain.thresholds, 2))
    recall = ((p[:, 2] >= mixed.thresholds[2]) & y[:, 2]).sum() / y[:, 2].sum()
    assert recall >= 0.9 and mixed.objective[2] == "recall_at_least" and mixed.target[2] == 0.9
    margin = fit_thresholds(y, p, "recall_at_least", target=0.9, margin=0.05)
    assert (margin.score >= 0.95 - 1e-9).all()  # aimed at target + margin on the fitting data
    with pytest.raises(ValueError, match="needs a target"):
        fit_thresholds(y, p, "precision_at_least")
    per_row, _ = cross_fit(y, p, 3, 0, metric="recall_at_least", target=0.8)  # cross-fitting passes it through
    assert per_row.shape == p.shape


@pytest.mark.slow
def test_a_run_aims_at_its_targets_and_reports_them_held_out(tiny_recipe: Path, tmp_path: Path) -> None:
    from sklearn.metrics import precision_score, recall_score

    from finetune.runs.predict import predict_run

    sets = ['calibrate.objective="recall_at_least"', "calibrate.target=0.8", "calibrate.min_positives=1"]
    sets += ['calibrate.classes={circle={objective="precision_at_least",target=0.5}}']
    proc = run_cli("run", str(tiny_recipe), *(a for s in sets for a in ("--set", s)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    assert not (run / "report.html").exists()  # the tests' recipe sets output.html = false
    doc = json.loads((run / "thresholds.json").read_text())
    by_name = {c["name"]: c for c in doc["classes"]}
    assert by_name["circle"]["objective"] == "precision_at_least" and by_name["square"]["target"] == 0.8
    targets = json.loads((run / "report.json").read_text())["calibration"]["targets"]
    assert targets["classes"] == 10 and "operating points" in proc.stdout + proc.stderr
    outs, classes = predict_run(run, ["test"])
    y, p = outs["test"].targets > 0, outs["test"].probs
    for r in targets["rows"]:  # the held-out numbers, recomputed with scikit-learn from the test predictions
        j = classes.names.index(r["name"])
        pred = p[:, j] >= r["threshold"]
        if r["held_out"] is None:
            assert not y[:, j].any()
            continue
        score = recall_score if r["objective"] == "recall_at_least" else precision_score
        assert r["held_out"] == pytest.approx(score(y[:, j], pred, zero_division=0))
        assert r["met_held_out"] == (r["held_out"] >= r["target"] - 1e-9)
    assert targets["met_held_out"] == sum(bool(r["met_held_out"]) for r in targets["rows"])


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (['calibrate.objective="recall_at_least"', "calibrate.target=1.5"], "calibrate.target"),
        (['calibrate.objective="recall_at_least"', "calibrate.target=0.0"], "calibrate.target"),
        (['calibrate.objective="recall_at_least"'], "needs a target"),
        (['calibrate.classes={unicorn={objective="recall_at_least",target=0.9}}'], "calibrate.classes.unicorn"),
    ],
)
def test_bad_operating_points_are_one_line(tiny_recipe: Path, sets: list[str], needle: str) -> None:
    assert_user_error(run_cli("validate", str(tiny_recipe), *(a for s in sets for a in ("--set", s))), needle)


def test_a_single_label_run_cannot_aim_at_a_recall(folder_data: Path) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "imagenette_standard.toml"
    sets = [f'data.root="{folder_data.as_posix()}"', 'calibrate.objective="recall_at_least"', "calibrate.target=0.9"]
    assert_user_error(run_cli("validate", str(recipe), *(a for s in sets for a in ("--set", s))), "single-label")
