"""Mixed precision: the autocast context for a resolved precision (fp32, bf16, fp16).

Both the training loop and the feature cache run forwards under it, so it lives apart from either.
"""

from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16/fp16, a no-op for fp32."""
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
