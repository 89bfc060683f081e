"""A held-out pool drawn in two: a selection half and a scoring half that nothing is fitted on.

    [data.holdout]
    seed = 0          # on: the pool (data.val) is split in two by this seed
    selection = 0.5   # the share that becomes the val role (checkpoints, the probe's C, calibration)
    scoring = true    # false: no test role at all (a sweep's trials never read the scoring half)

The rest of the pool becomes the test role, read only for the numbers reported. The draw depends on the pool's
image order and the seed alone, so every recipe given the same data and seed gets the same halves: that is what
makes ``finetune compare`` paired. The split itself is :func:`halves`.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from finetune.schema import Section


class HoldoutConfig(Section):
    """``[data.holdout]``: draw the val and test roles from one pool."""

    seed: int | None = Field(None, description="on: the pool (data.val) is split in two halves by this seed")
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
