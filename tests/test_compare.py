"""``finetune compare``: paired draws, the bootstrap interval, resuming a stopped compare, and its refusals."""

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.assembly.data import build_splits, split_name
from finetune.config import load_recipe
from finetune.config.holdout import halves
from finetune.data.demo import write_demo
from finetune.errors import UserError
from finetune.eval.bootstrap import METRICS, Scored, paired_bootstrap
from finetune.runs import compare as cmp

from .conftest import assert_user_error, run_cli

FAST = ["freeze.solver_c=[1.0]", 'freeze.solver_select="val"']  # the probe row: one C, no k-fold


def test_halves_are_disjoint_and_cover_the_pool() -> None:
    for seed in range(5):
        sel, sco = halves(23, seed, 0.5)
        assert len(sel) == 12 and len(sco) == 11 and not set(sel) & set(sco) and sorted([*sel, *sco]) == list(range(23))
    assert not np.array_equal(halves(23, 0)[0], halves(23, 1)[0])
    with pytest.raises(ValueError, match="cannot give both halves"):
        halves(1, 0)


def test_every_row_gets_the_same_draw_per_seed(tiny_recipe: Path, tmp_path: Path) -> None:
    entries = cmp.plan([tiny_recipe], FAST, ["wider=data.image_size=48"])
    assert [e.label for e in entries] == ["probe-32", "probe-48", "tiny", "wider"]
    pool = build_splits(load_recipe(tiny_recipe), roles=("val",), check=False)["val"].image_ids
    for seed in (0, 1):
        ids = set()
        for e in entries:
            splits = build_splits(e.recipe(seed, tmp_path), roles=("train", "val", "test"), check=False)
            sel, sco = splits["val"].image_ids, splits["test"].image_ids
            ids.add((tuple(sel), tuple(sco)))
            assert not set(sel) & set(sco) and sorted(sel + sco) == sorted(pool)
            assert not set(sel + sco) & set(splits["train"].image_ids)
        assert len(ids) == 1  # identical across rows
    draws = cmp.check_data(entries, [0, 1], tmp_path)
    assert draws[0] != draws[1]


def _scored(seed: int, boost: float) -> Scored:
    rng = np.random.default_rng(seed)
    y = (rng.random((80, 6)) < 0.3).astype(np.float64)
    p = np.clip(rng.random((80, 6)) * 0.8 + boost * y, 0, 1)
    return Scored(y, p, np.full(6, 0.5))


def test_the_bootstrap_interval_of_a_recipe_against_itself_covers_zero_and_a_planted_gap_does_not() -> None:
    a = [_scored(s, 0.1) for s in range(3)]
    same = paired_bootstrap(a, a, METRICS["map"], resamples=300)
    assert same["diff"] == 0 and same["low"] <= 0 <= same["high"] and not same["distinguishable"]
    b = [Scored(s.targets, np.clip(s.probs + 0.25 * s.targets, 0, 1), s.thresholds) for s in a]
    gap = paired_bootstrap(b, a, METRICS["map"], resamples=300)
    assert gap["diff"] > 0.1 and gap["low"] > 0 and gap["distinguishable"]
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(a, [_scored(9, 0.1)] * 3, METRICS["map"])
    # a small gap the pairing sees: the same images for both rows cancel the images' own noise
    small = [Scored(s.targets, np.clip(s.probs + 0.02 * s.targets, 0, 1), s.thresholds) for s in a]
    assert paired_bootstrap(small, a, METRICS["map"], resamples=300)["distinguishable"]
    # better on two seeds, as much worse on the third: the seeds' spread is in the interval
    mixed = [*b[:2], Scored(a[2].targets, np.clip(a[2].probs - 0.3 * a[2].targets, 0, 1), a[2].thresholds)]
    spread = paired_bootstrap(mixed, a, METRICS["map"], resamples=1000)
    assert spread["per_seed"][2] < 0 < spread["per_seed"][0] and not spread["distinguishable"]


def test_a_trial_recipe_has_no_test_split(tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe, ['data.test=""', "data.holdout.seed=0", "data.holdout.scoring=false"])
    assert set(build_splits(recipe, check=False)) == {"train", "val"} and not recipe.data.has_test
    with pytest.raises(UserError, match="this run has no test split"):
        split_name(recipe, "test")


@pytest.mark.slow
def test_a_stopped_compare_resumes_and_gives_the_same_table(
    tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = []
    real_train = cmp._train
    monkeypatch.setattr(cmp, "_train", lambda r, d, log: (trained.append(d.name), real_train(r, d, log)))
    entries = cmp.plan([tiny_recipe], FAST, [])
    whole = cmp.compare(entries, [0], tmp_path / "whole", resamples=200)
    assert trained == ["probe-32-s0", "tiny-s0"]
    cmp.compare(entries, [0], tmp_path / "whole", resamples=200)
    assert len(trained) == 2  # a finished compare is read back, nothing trains
    (tmp_path / "whole").rename(tmp_path / "moved")  # moved elsewhere, it keeps its finished rows
    results = tmp_path / "moved" / "results"
    (results / "probe-32-s0.plan.json").write_text("{")  # broken bookkeeping: the row is redone, not a traceback
    (results / "tiny-s0.npz").write_bytes(b"PK\x03\x04 truncated")
    weights = {p: p.stat().st_mtime_ns for p in (tmp_path / "moved" / "runs").glob("*/best.pt")}
    again = cmp.compare(entries, [0], tmp_path / "moved", resamples=200)
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in whole["rows"]]
    assert {p: p.stat().st_mtime_ns for p in weights} == weights and len(weights) == 2  # scored again, not trained
    del trained[2:]
    (tmp_path / "moved").rename(tmp_path / "whole")
    changed = cmp.plan([tiny_recipe], [*FAST, "optim.lr=0.01"], [])
    with pytest.raises(UserError, match="holds a probe-32 seed 0 made from another recipe; use a new --out"):
        cmp.compare(changed, [0], tmp_path / "whole", resamples=200)
    calls = []
    real = cmp.run_entry

    def stop_at_the_third(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[:2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cmp, "run_entry", stop_at_the_third)
    with pytest.raises(UserError, match="compare stopped at tiny seed 0; run the same command to continue"):
        cmp.compare(entries, [0], tmp_path / "resumed", resamples=200)
    done = [p.name for p in (tmp_path / "resumed" / "results").glob("*.json") if not p.name.endswith(".plan.json")]
    assert done == ["probe-32-s0.json"]
    monkeypatch.setattr(cmp, "run_entry", real)
    resumed = cmp.compare(entries, [0], tmp_path / "resumed", resamples=200)
    assert trained[2:] == ["probe-32-s0", "tiny-s0"]  # the probe before the stop, only the rest after it
    for a, b in zip(whole["rows"], resumed["rows"]):
        assert a["label"] == b["label"] and a["metrics"] == b["metrics"]
    assert [p["map"] for p in whole["pairs"]] == [p["map"] for p in resumed["pairs"]]
    assert whole["draws"] == resumed["draws"]
    doc = json.loads((tmp_path / "resumed" / "compare.json").read_text())
    assert (
        doc["rows"][0]["label"] == "probe-32"
        and "not distinguishable" in (tmp_path / "resumed" / "compare.md").read_text()
    )


def test_bad_compares_are_one_line(tiny_recipe: Path, tiny_coco: Path, tmp_path: Path) -> None:
    write_demo(tmp_path / "elsewhere", {"train": 8, "val": 8}, size=32, seed=2)
    other = tmp_path / "other.toml"
    other.write_text(tiny_recipe.read_text().replace(tiny_coco.as_posix(), (tmp_path / "elsewhere").as_posix()))
    names = list(build_splits(load_recipe(tiny_recipe), roles=("train",), check=False)["train"].classes.names)
    csv_sets = ['data.format="csv"', f'data.csv="{(tmp_path / "labels.csv").as_posix()}"', 'data.test=""']
    with (tmp_path / "labels.csv").open("w") as f:
        f.write("path,labels,split\n")
        for role in ("train", "val"):
            for p in sorted((tiny_coco / role).iterdir()):
                f.write(f"{role}/{p.name},{names[0]},{role}\n")
    reordered = tmp_path / "reordered.toml"
    reordered.write_text(tiny_recipe.read_text())
    csv_args = [a for s in csv_sets for a in ("--set", s)]
    cases = [
        ([str(tiny_recipe), str(other)], "compare recipes on the same data"),
        (
            [str(tiny_recipe), str(reordered), *csv_args, "--variant", f"flip=data.classes={json.dumps(names[::-1])}"],
            "have different classes",
        ),
        ([str(tiny_recipe), "--seeds", ""], "--seeds: give at least one seed"),
        ([str(tiny_recipe), "--seeds", "0,1,0"], "a seed is repeated"),
        ([str(tiny_recipe), "--seeds", "0,x"], "seeds are integers"),
        ([str(tiny_recipe), "--set", "data.holdout.selection=0.01"], "cannot give both halves an image"),
        ([str(tiny_recipe), "--variant", "oops"], "expected NAME=KEY=VALUE"),
        ([str(tiny_recipe), "--variant", "tiny=train.epochs=2"], "names a recipe or probe row"),
        ([str(tiny_recipe), "--variant", "probe-32=train.epochs=2"], "names a recipe or probe row"),
        ([str(tiny_recipe), "--variant", "a/b=train.epochs=2"], "row name 'a/b'"),
        ([str(tiny_recipe), "--resamples", "10"], "--resamples 10: use 100 to"),
        ([str(tmp_path / "missing.toml")], "no such recipe file"),
    ]
    for args, needle in cases:
        assert_user_error(run_cli("compare", *args, "--out", str(tmp_path / "c")), needle)
