"""Batch mixing: mixup and CutMix, each image paired with the batch reversed (as timm's ``Mixup`` pairs them).

Draws are seeded by (seed, epoch, batch), so a resumed run mixes the same. Multi-label CutMix weights each label by
the kept area of its objects' boxes (``data.augment.cutmix_labels = "area"``), since a cut can remove an object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def mix_batch(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float, seed: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., ICLR 2018) as timm's ``Mixup`` pairs images: each with the batch reversed.

    ``lam ~ Beta(alpha, alpha)`` from a generator seeded by ``seed`` (the run's seed, epoch and batch, so a resumed
    run draws the same); inputs and targets (multi-hot or one-hot) become ``lam * a + (1 - lam) * reversed``.
    """
    lam = float(np.random.default_rng(list(seed)).beta(alpha, alpha))
    targets = targets.float()
    mixed = inputs.mul(lam).add_(inputs.flip(0), alpha=1.0 - lam)
    return mixed, targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)


def cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Timm's ``rand_bbox``: a box of about ``1 - lam`` of the image, centred anywhere, clipped: (x0, y0, x1, y1)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(x0), int(y0), int(x1), int(y1)


def _box_shares(b: torch.Tensor, cut: tuple[int, int, int, int]) -> torch.Tensor:
    """The share of each box (``[k, 5]`` rows: class, x0, y0, x1, y1) that lies inside ``cut``; NaN for no area."""
    x0, y0, x1, y1 = cut
    area = (b[:, 3] - b[:, 1]).clamp(min=0) * (b[:, 4] - b[:, 2]).clamp(min=0)
    w = (b[:, 3].clamp(max=x1) - b[:, 1].clamp(min=x0)).clamp(min=0)
    h = (b[:, 4].clamp(max=y1) - b[:, 2].clamp(min=y0)).clamp(min=0)
    return torch.where(area > 0, w * h / area.clamp(min=1e-12), torch.full_like(area, float("nan")))


def area_targets(
    targets: torch.Tensor, boxes: list[torch.Tensor], cut: tuple[int, int, int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Multi-label cutmix targets: each class weighted by the kept area of its objects' boxes.

    Image ``i`` keeps its pixels outside ``cut`` and gets the reversed batch's image ``n - 1 - i`` inside it. A class
    scores the largest share any one of its boxes keeps in the mixed image: ``1 - overlap / area`` for the outer
    image's boxes, ``overlap / area`` for the pasted image's. A box of no area (the crop cut the object away) scores
    0. A positive label with no box at all scores the area its image keeps (``1 - cut / image`` outer, ``cut /
    image`` pasted), as single-label cutmix does. An unknown label in either image stays unknown; the middle image of
    an odd batch is pasted onto itself and keeps its targets.
    """
    height, width = size
    pasted = (cut[2] - cut[0]) * (cut[3] - cut[1]) / (height * width)
    known = torch.nan_to_num(targets.float(), nan=0.0)
    out = torch.zeros_like(known)
    n = len(targets)
    for i in range(n):
        for b, t, outer in ((boxes[i], known[i], True), (boxes[n - 1 - i], known[n - 1 - i], False)):
            boxed = torch.zeros_like(t, dtype=torch.bool)
            if len(b):
                b = b.to(out.device)
                share = _box_shares(b, cut)
                share = torch.nan_to_num(1.0 - share if outer else share, nan=0.0)
                cls = b[:, 0].long()
                out[i].scatter_reduce_(0, cls, share, reduce="amax")
                boxed[cls] = True
            fallback = torch.where((t > 0) & ~boxed, t * (1.0 - pasted if outer else pasted), torch.zeros_like(t))
            out[i] = torch.maximum(out[i], fallback)
    if n % 2:
        out[n // 2] = known[n // 2]
    unknown = torch.isnan(targets.float()) | torch.isnan(targets.float()).flip(0)
    return torch.where(unknown, torch.full_like(out, float("nan")), out)


def cutmix_batch(
    inputs: torch.Tensor, targets: torch.Tensor, alpha: float, seed: Sequence[int], boxes: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (Yun et al., ICCV 2019) pairing each image with the batch reversed, as :func:`mix_batch` does.

    ``lam ~ Beta(alpha, alpha)`` and the box are drawn from a generator seeded by ``seed`` (a resumed run draws the
    same). Single-label (``boxes`` None): targets mix by the pasted box's true area, as timm's ``correct_lam`` does.
    Multi-label: :func:`area_targets` from each image's object boxes.
    """
    rng = np.random.default_rng(list(seed))
    lam = float(rng.beta(alpha, alpha))
    height, width = inputs.shape[-2:]
    x0, y0, x1, y1 = cut_box(height, width, lam, rng)
    mixed = inputs.clone()
    mixed[..., y0:y1, x0:x1] = inputs.flip(0)[..., y0:y1, x0:x1]
    if boxes is not None:
        return mixed, area_targets(targets, boxes, (x0, y0, x1, y1), (height, width))
    kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    targets = targets.float()
    return mixed, targets.mul(kept).add_(targets.flip(0), alpha=1.0 - kept)
