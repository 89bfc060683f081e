"""A held-out pool drawn in two: a selection half and a scoring half that nothing is fitted on.

    [data.holdout]
    seed = 0          # on: the pool (data.val) is split in two by this seed
    selection = 0.5   # the share that becomes the val role (checkpoints, the probe's C, calibration)
    scoring = true    # false: no test role at all (a sweep's trials never read the scoring half)

The rest of the pool becomes the test role, read only for the numbers reported. The draw depends on the pool's
image order and the seed alone, so every recipe given the same data and seed gets the same halves: that is what
makes ``finetune compare`` paired. The split itself is :func:`halves`.

A dataset with a train and a test split and nothing else (CIFAR-10) draws its val role from train instead:

    [data]
    train = "train"
    val = ""          # drawn from train
    test = "test"     # only scores
    [data.holdout]
    source = "train"
    seed = 0
    selection = 0.1   # 5,000 of CIFAR-10's 50,000 train images; the other 45,000 train

Single-label data is drawn stratified (every class keeps its share, scikit-learn's ``train_test_split``); multi-label
data is drawn at random. The train role is what is left: no image is in two roles.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from finetune.config.schema import Section


class HoldoutConfig(Section):
    """``[data.holdout]``: draw the val and test roles from one pool (or the val role from train)."""

    source: Literal["val", "train"] = Field(
        "val", description='"val": val and test halves of data.val; "train": val is a held-out part of data.train'
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="on: the pool (data.val) is split in two halves by this seed"
    )
    selection: float = Field(0.5, gt=0.0, lt=1.0, description="the pool's share that becomes val; the rest is test")
    scoring: bool = Field(True, description="false: the scoring half is left out entirely (a sweep's trials)")


def halves(n: int, seed: int, selection: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a pool of ``n`` images: the selection half and the scoring half, disjoint, sorted, together all.

    Raises:
        ValueError: When either half would be empty.
    """
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(selection * n))
    if k < 1 or k > n - 1:
        raise ValueError(f"a pool of {n} images cannot give both halves an image")
    return np.sort(order[:k]), np.sort(order[k:])


def held_out(targets: np.ndarray, seed: int, share: float, single_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train split: the part that trains and the held-out part (``share`` of it), disjoint, sorted.

    Single-label targets (one-hot rows) are drawn stratified by class, multi-label ones at random.

    Raises:
        ValueError: When either part would be empty, or a class is too small to stratify.
    """
    from sklearn.model_selection import train_test_split

    n = len(targets)
    k = int(round(share * n))
    if k < 1 or k > n - 1:
        raise ValueError(f"a split of {n} images cannot give both parts an image")
    strata = targets.argmax(1) if single_label and targets.ndim == 2 else None
    keep, held = train_test_split(np.arange(n), test_size=k, random_state=seed, stratify=strata)
    return np.sort(keep), np.sort(held)
