"""``[data.holdout] source = "train"``: a seeded, stratified val part of the train split, disjoint from the rest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from finetune.assembly import build_run
from finetune.config import load_recipe
from finetune.config.holdout import held_out

from .conftest import assert_user_error, run_cli

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(folder_data: Path, *extra: str) -> list[str]:
    return [
        f'data.root="{folder_data.as_posix()}"',
        'data.val=""',
        'data.test="test"',
        'data.holdout.source="train"',
        "data.holdout.seed=3",
        "data.holdout.selection=0.25",
        *extra,
    ]


def test_held_out_is_stratified_disjoint_and_sklearns_draw() -> None:
    targets = np.eye(4)[np.repeat(np.arange(4), [40, 20, 20, 8])]
    keep, held = held_out(targets, seed=7, share=0.25, single_label=True)
    assert set(keep).isdisjoint(held) and len(keep) + len(held) == len(targets)
    assert Counter(targets[held].argmax(1)) == {0: 10, 1: 5, 2: 5, 3: 2}  # every class keeps its share
    _, ref = train_test_split(np.arange(88), test_size=22, random_state=7, stratify=targets.argmax(1))
    assert held.tolist() == sorted(ref.tolist())
    _, again = held_out(targets, seed=7, share=0.25, single_label=True)
    assert again.tolist() == held.tolist()  # the seed alone decides
    multi = (np.random.default_rng(0).random((50, 3)) < 0.3).astype(float)
    keep, held = held_out(multi, seed=1, share=0.2, single_label=False)
    assert len(held) == 10 and set(keep).isdisjoint(held)


def test_a_recipe_draws_val_from_train_and_scores_on_test(folder_data: Path) -> None:
    recipe = load_recipe(RECIPES / "imagenette_standard.toml", _recipe(folder_data))
    splits = build_run(recipe).splits
    train, val, test = (splits[r] for r in ("train", "val", "test"))
    assert (len(train.targets), len(val.targets), len(test.targets)) == (27, 9, 12)  # 36 train images: 1/4 held
    assert set(map(str, train.image_paths)).isdisjoint(map(str, val.image_paths))
    assert all("/train/" in str(p) for p in val.image_paths) and all("/test/" in str(p) for p in test.image_paths)
    assert val.targets.sum(0).tolist() == [3.0, 3.0, 3.0]  # stratified: 3 of each class's 12


def test_holdout_from_train_mistakes_are_one_line(folder_data: Path) -> None:
    recipe = str(RECIPES / "imagenette_standard.toml")
    sets = [x for s in _recipe(folder_data) for x in ("--set", s)]
    proc = run_cli("validate", recipe, *sets, "--set", 'data.val="val"')
    assert_user_error(proc, "holdout.source", "leave data.val empty")
    no_seed = [x for s in _recipe(folder_data) if "seed" not in s for x in ("--set", s)]
    assert_user_error(run_cli("validate", recipe, *no_seed), "set holdout.seed")
    assert_user_error(run_cli("validate", recipe, *sets, "--set", "data.holdout.selection=0.001"), "data.holdout")


@pytest.mark.slow
def test_the_transfer_recipe_validates_on_tiny_generated_data(folder_data: Path) -> None:
    proc = run_cli(
        "validate",
        str(RECIPES / "cifar10_transfer.toml"),
        "--set",
        f'data.root="{folder_data.as_posix()}"',
        "--set",
        'model.checkpoint=""',
    )
    assert proc.returncode == 0, proc.stderr
    assert "32 images" in proc.stdout and "4 images" in proc.stdout  # 36 train images, 10 % held out
