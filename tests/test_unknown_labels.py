"""Unknown labels ("not checked", NaN targets): the CSV and COCO syntaxes, and every consumer leaving them out.

Each consumer is checked against the same computation on the known entries alone: the losses, AP and counts
(scikit-learn), the thresholds, the probability scaling and ECE / Brier, and the linear probe (scikit-learn's
``LogisticRegression`` on the rows where the class is known).
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, precision_score, recall_score

from finetune.assembly import build_run
from finetune.config import load_recipe
from finetune.errors import UserError
from finetune.eval.metrics import average_precision, prf
from finetune.eval.probabilities import brier, ece, fit_scaling
from finetune.eval.tasks import MULTI_LABEL
from finetune.eval.thresholds import best_thresholds, constrained_thresholds, fit_thresholds
from finetune.hooks.probe import solve_linear_head
from finetune.labels import known_of
from finetune.losses import AsymmetricLoss, BCELoss, FocalLoss
from finetune.runs.predict import predict_run

from .conftest import assert_user_error, run_cli


def _data(seed: int, n: int = 200, c: int = 5, unknown: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Targets with a share of NaN entries and probabilities that rank positives higher (with ties)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(np.float64)
    p = np.round(np.clip(0.35 * y + rng.random((n, c)) * 0.65, 0, 1), 2)
    y[rng.random((n, c)) < unknown] = np.nan
    return y, p


def test_masked_losses_equal_the_loss_on_the_known_entries_alone() -> None:
    y, _ = _data(0)
    logits = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor(y)
    known = torch.tensor(known_of(y))
    pw = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0], dtype=torch.float64)
    got = BCELoss()(logits, t)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits[known], t[known]).item(), rel=1e-12)
    weighted = F.binary_cross_entropy_with_logits(logits[known], t[known], pos_weight=pw.expand_as(logits)[known])
    assert BCELoss(pw)(logits, t).item() == pytest.approx(weighted.item(), rel=1e-12)
    for loss in (FocalLoss(), AsymmetricLoss()):
        alone = loss(logits[known].view(-1, 1), t[known].view(-1, 1))
        assert loss(logits, t).item() == pytest.approx(alone.item(), rel=1e-12), loss
    full = torch.nan_to_num(t)  # no unknowns: torch's own BCE
    assert BCELoss(pw)(logits, full).item() == pytest.approx(
        torch.nn.BCEWithLogitsLoss(pos_weight=pw)(logits, full).item(), rel=1e-12
    )
    logits.requires_grad_(True)
    BCELoss()(logits, t).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~known] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_ap_and_counts_equal_scikit_learn_on_the_known_rows(seed: int) -> None:
    y, p = _data(seed)
    ap, m = average_precision(y, p), prf(y, p, 0.5)
    for c in range(y.shape[1]):
        rows = ~np.isnan(y[:, c])
        assert ap[c] == pytest.approx(average_precision_score(y[rows, c], p[rows, c]), abs=1e-12)
        pred = p[rows, c] >= 0.5
        assert m["precision"][c] == pytest.approx(precision_score(y[rows, c], pred, zero_division=0))
        assert m["recall"][c] == pytest.approx(recall_score(y[rows, c], pred))
        assert m["support"][c] == y[rows, c].sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_equal_a_fit_on_each_class_known_rows(seed: int) -> None:
    y, p = _data(seed)
    thr, f = best_thresholds(y, p)
    rec, reached, met = constrained_thresholds(y, p, "recall_at_least", 0.8)
    pre, _, _ = constrained_thresholds(y, p, "precision_at_least", 0.6)
    cal = fit_thresholds(y, p, min_positives=1)
    for c in range(y.shape[1]):
        rows = ~np.isnan(y[:, c])
        alone = y[rows, c : c + 1], p[rows, c : c + 1]
        t1, f1 = best_thresholds(*alone)
        assert (thr[c], f[c]) == pytest.approx((t1[0], f1[0]))
        assert rec[c] == constrained_thresholds(*alone, "recall_at_least", 0.8)[0][0]
        assert pre[c] == constrained_thresholds(*alone, "precision_at_least", 0.6)[0][0]
        assert cal.support[c] == y[rows, c].sum()
    assert met.all() and (reached >= 0.8).all()


def test_scaling_ece_and_brier_leave_unknown_entries_out() -> None:
    y, p = _data(3)
    p = np.clip(p, 0.01, 0.99)
    for method in ("temperature", "platt"):
        both = fit_scaling(y, p, method)
        for c in range(y.shape[1]):
            rows = ~np.isnan(y[:, c])
            alone = fit_scaling(y[rows, c : c + 1], p[rows, c : c + 1], method)
            assert (both.a[c], both.b[c]) == pytest.approx((alone.a[0], alone.b[0]), abs=1e-6)
    known = ~np.isnan(y)
    assert brier(y, p) == pytest.approx(brier_score_loss(y[known], p[known]))
    assert ece(y, p) == pytest.approx(ece(y[known].reshape(-1, 1), p[known].reshape(-1, 1)))


def test_probe_on_unknown_labels_equals_scikit_learn_on_the_known_rows() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(150, 10))
    y = (rng.random((150, 3)) < 1 / (1 + np.exp(-(x @ rng.normal(size=(10, 3)))))).astype(np.float64)
    y[rng.random(y.shape) < 0.3] = np.nan
    w, b = solve_linear_head(torch.tensor(x), torch.tensor(y), MULTI_LABEL, 0.5)
    for k in range(3):
        rows = ~np.isnan(y[:, k])
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(x[rows], y[rows, k])
        assert np.allclose(w[k].numpy(), ref.coef_[0], atol=2e-4, rtol=1e-3)
        assert b[k].item() == pytest.approx(ref.intercept_[0], abs=2e-4)


def _csv_recipe(tiny_recipe: Path, tmp_path: Path, body: str) -> list[str]:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    for name in ("a", "b", "c"):
        (root / f"{name}.jpg").write_bytes(b"")
    (root / "labels.csv").write_text(body)
    return [f'data.root="{root.as_posix()}"', 'data.format="csv"', 'data.classes=["cat", "dog", "owl"]', 'data.test=""']


@pytest.mark.parametrize(
    "body",
    [
        "path,labels,split\na.jpg,cat|-dog,train\nb.jpg,-cat|-owl,train\nc.jpg,owl,val\n",
        "path,labels,unknown,split\na.jpg,cat,dog,train\nb.jpg,,cat|owl,train\nc.jpg,owl,,val\n",
        "path,cat,dog,owl,split\na.jpg,1,,0,train\nb.jpg,,0,,train\nc.jpg,0,0,1,val\n",
    ],
    ids=["dash-prefix", "unknown-column", "empty-cell"],
)
def test_the_three_unknown_syntaxes_read_alike(tiny_recipe: Path, tmp_path: Path, body: str) -> None:
    sets = _csv_recipe(tiny_recipe, tmp_path, body)
    splits = build_run(load_recipe(tiny_recipe, sets), roles=("train", "val")).splits
    n = np.nan
    np.testing.assert_array_equal(splits["train"].targets, np.array([[1, n, 0], [n, 0, n]], dtype=np.float32))
    np.testing.assert_array_equal(splits["val"].targets, np.array([[0, 0, 1]], dtype=np.float32))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("path,labels,unknown,split\na.jpg,cat|-dog,owl,train\n", "labels.csv:2: unknown labels given both as '-name'"),
        ("path,labels,split\na.jpg,cat|-cat,train\n", "labels.csv:2: 'cat' is both a label and unknown"),
        ("path,cat,dog,owl,unknown,split\na.jpg,1,0,0,dog,train\n", "an 'unknown' column needs a 'labels' column"),
        ("path,labels,split\na.jpg,-yak,train\n", "labels.csv:2: undeclared label 'yak'"),
        ("path,cat,dog,owl,split\na.jpg,1,?,0,train\n", "column 'dog' holds '?'; class columns hold 0, 1 or empty"),
    ],
)
def test_ambiguous_unknown_syntax_is_one_line(tiny_recipe: Path, tmp_path: Path, body: str, needle: str) -> None:
    sets = _csv_recipe(tiny_recipe, tmp_path, body)
    with pytest.raises(UserError, match=needle.replace("|", r"\|").replace(".", r"\.").replace("?", r"\?")):
        _ = build_run(load_recipe(tiny_recipe, sets), roles=("train",)).splits
    if "both as" in needle:  # and through the CLI: exit 2, one line
        assert_user_error(run_cli("validate", str(tiny_recipe), *[a for s in sets for a in ("--set", s)]), "one syntax")


def test_coco_neg_category_ids_mark_the_rest_unknown(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    doc = json.loads((tiny_coco / "annotations" / "instances_val.json").read_text())
    ids = [c["id"] for c in sorted(doc["categories"], key=lambda c: c["id"])]
    doc["images"][0]["neg_category_ids"] = [ids[0]]
    doc["images"][1]["neg_category_ids"] = []
    doc["images"][1]["not_exhaustive_category_ids"] = [ids[1]]
    root = tmp_path / "lvis"
    (root / "annotations").mkdir(parents=True)
    (root / "val").symlink_to(tiny_coco / "val")
    (root / "annotations" / "instances_val.json").write_text(json.dumps(doc))
    plain = build_run(load_recipe(tiny_recipe), roles=("val",)).splits["val"]
    sets = [f'data.root="{root.as_posix()}"', 'data.train="val"', 'data.test=""']
    lvis = build_run(load_recipe(tiny_recipe, sets), roles=("val",)).splits["val"]
    order = sorted(range(len(doc["images"])), key=lambda i: doc["images"][i]["id"])
    first, second = order.index(0), order.index(1)
    want = plain.targets.copy()
    want[first] = np.where((plain.targets[first] == 0) & (np.arange(len(ids)) != 0), np.nan, plain.targets[first])
    want[second] = np.where(plain.targets[second] == 0, np.nan, plain.targets[second])
    np.testing.assert_array_equal(lvis.targets, want)
    assert np.isnan(lvis.targets).sum() > 0 and not np.isnan(np.delete(lvis.targets, [first, second], 0)).any()
    doc["images"][0]["neg_category_ids"] = [999]
    (root / "annotations" / "instances_val.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="neg_category_ids holds 999"):
        _ = build_run(load_recipe(tiny_recipe, sets), roles=("val",)).splits


@pytest.mark.extra("inspect")
def test_label_issues_never_name_an_unknown_entry() -> None:
    from finetune.eval.label_issues import find_issues

    rng = np.random.default_rng(5)
    y = (rng.random((120, 4)) < 0.4).astype(np.float64)
    p = np.clip(np.where(y > 0, 0.85, 0.1) + rng.normal(0, 0.05, y.shape), 0.01, 0.99)
    p[:10, 0] = 1 - p[:10, 0]  # ten confident disagreements on class 0
    y[:5, 0] = np.nan  # five of them not checked: never a suspect
    issues = find_issues(y, p, multi_label=True)
    named = {(s.row, c) for s in issues for c in s.missing + s.extra}
    assert {(r, 0) for r in range(5, 10)} <= named
    assert not named & {(r, 0) for r in range(5)}


def test_a_csv_with_30_percent_unknown_trains_and_is_scored_on_known_entries(
    tiny_recipe: Path, tiny_coco: Path, tmp_path: Path
) -> None:
    splits = build_run(load_recipe(tiny_recipe)).splits
    names = list(splits["train"].classes.names)
    rng = np.random.default_rng(0)
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", *names, "split"])
        for role, s in splits.items():
            for path, row in zip(s.image_paths, s.targets):
                cells = ["" if rng.random() < 0.3 else str(int(v)) for v in row]
                w.writerow([Path(path).relative_to(tiny_coco).as_posix(), *cells, role])
    sets = [f'data.csv="{(tmp_path / "labels.csv").as_posix()}"', 'data.format="csv"', f"data.classes={names}"]
    sets += ["output.name=unknown", "train.epochs=2"]
    proc = run_cli("run", str(tiny_recipe), *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "runs" / "unknown"
    losses = [json.loads(ln)["train_loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(losses).all()
    report = json.loads((run / "report.json").read_text())
    outs, _ = predict_run(run, ["test"])
    y, p = outs["test"].targets, outs["test"].probs
    unknown = np.isnan(y)
    assert 0.2 < unknown.mean() < 0.4 and report["splits"]["test"]["unknown"] == unknown.sum()
    for c, row in enumerate(report["splits"]["test"]["per_class"]):
        rows = ~unknown[:, c]
        assert row["unknown"] == (~rows).sum()
        if y[rows, c].sum() > 0:
            assert row["ap"] == pytest.approx(average_precision_score(y[rows, c], p[rows, c]), abs=1e-6)
        pred = p[rows, c] >= report["splits"]["test"]["threshold"]
        assert row["recall"] == pytest.approx(recall_score(y[rows, c], pred, zero_division=0), abs=1e-6)
    assert "unknown labels" in (run / "report.md").read_text()
