"""Colour jitter on the device: parameters drawn per image in the worker, the pixels changed batched on the GPU.

The same transform as albumentations' ``ColorJitter`` (torchvision's semantics): with probability ``p``, brightness,
contrast, saturation and hue, in a random order per image, with factors drawn uniformly from ``[1 - j, 1 + j]`` (and
``[-h, h]`` for hue). In a worker it costs about 0.3 ms of a COCO image's 2.3 ms once the JPEG fast path has cut
the decode (albumentations' uint8 lookup tables); on a GPU it costs next to nothing. The arithmetic is float
throughout (albumentations rounds to uint8 after each step on uint8 images), so pixels agree with albumentations'
float path, and with its uint8 path to rounding.
"""

from __future__ import annotations

import numpy as np
import torch

# Per-image parameter row: applied (0/1), brightness, contrast, saturation, hue, then the order of the 4 operations.
PARAMS = 9
_GRAY = (0.299, 0.587, 0.114)  # cv2's RGB2GRAY weights, as albumentations and torchvision use


def sample_jitter(rng: np.random.Generator, strength: float, hue: float, p: float = 0.8) -> np.ndarray:
    """One image's jitter parameters (``PARAMS`` float32 values).

    Args:
        rng: The image's generator (seeded by seed, epoch and index, so a resumed run draws the same).
        strength: Brightness/contrast/saturation factors come from ``[max(0, 1 - strength), 1 + strength]``.
        hue: Hue shifts come from ``[-hue, hue]`` (a fraction of the colour wheel).
        p: Probability that the image is jittered at all.

    Returns:
        The parameter row.
    """
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    applied = float(rng.random() < p)
    factors = [rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(-hue, hue)]
    return np.array([applied, *factors, *rng.permutation(4)], dtype=np.float32)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f + other * (1 - f)).clamp_(0.0, 1.0)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + shift (mod 1), -> RGB; ``x`` in [0, 1], ``shift`` shaped ``[n, 1, 1]``."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1).values
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, ((g - b) / safe_c) % 6, torch.where(v == g, (b - r) / safe_c + 2, (r - g) / safe_c + 4))
    h = torch.where(c > 0, h / 6, torch.zeros_like(h))
    h = (h + shift) % 1.0
    # HSV -> RGB with the chroma kept: each channel is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (n + h.unsqueeze(1) * 6) % 6
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def apply_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Jitter a batch in place of albumentations' per-image ``ColorJitter``.

    Args:
        x: ``[n, 3, h, w]`` float images in [0, 1].
        params: ``[n, PARAMS]`` rows from :func:`sample_jitter`.

    Returns:
        The jittered batch (a new tensor), in [0, 1].
    """
    host = params.detach().cpu().float()  # indices chosen on the host: no GPU sync per operation
    factors = host[:, 1:5].to(x.device, x.dtype, non_blocking=True)
    out = x.clone()
    applied = host[:, 0] > 0
    order = host[:, 5:].long()
    for step in range(4):
        for op in range(4):
            rows = torch.nonzero(applied & (order[:, step] == op)).flatten()
            if rows.numel() == 0:
                continue
            idx = rows.to(x.device, non_blocking=True)
            xi, f = out[idx], factors[idx, op].view(-1, 1, 1, 1)
            if op == 0:  # brightness
                xi = (xi * f).clamp_(0.0, 1.0)
            elif op == 1:  # contrast: towards the image's mean grey level
                xi = _blend(xi, _gray(xi).mean((2, 3), keepdim=True), f)
            elif op == 2:  # saturation: towards the image's own grey
                xi = _blend(xi, _gray(xi), f)
            else:
                xi = _shift_hue(xi, f.view(-1, 1, 1))
            out[idx] = xi
    return out
