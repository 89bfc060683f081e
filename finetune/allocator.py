"""Host memory for training: glibc's malloc told to keep freed blocks for reuse instead of returning them.

A training step frees and reallocates the same large buffers (activations, gradients) every step. glibc serves
blocks above its mmap threshold (128 KB, raised as far as 32 MB as such blocks are freed) with fresh pages from the
kernel and gives the top of its heap back when it is freed, so each step pays page faults and zeroing for memory it
just released. On this project's 2-core CPU, 28 % (Reduced MobileNetV2, 32 px) to 38 % (mobilenetv2_100, 224 px)
of the trainer's CPU time went to the kernel; with the setting below, none did, and an epoch ran 1.63x and 1.81x
as fast (``benchmarks/allocator.py``, fresh processes, the settings alternating). PyTorch's CUDA caching allocator
does the same on a GPU; on a CPU, PyTorch's performance guide suggests jemalloc or TCMalloc (``LD_PRELOAD``), which
need a package and a restart: ``mallopt`` works from inside the process.

The cost: the process keeps its peak memory until it exits. ``FINETUNE_MALLOC=default`` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
_APPLIED: list[bool] = []


def reuse_freed_memory() -> bool:
    """Keep freed memory in the heap for reuse: no mmap-served blocks, no trimming (once per process; glibc only).

    DataLoader workers forked afterwards inherit the setting.

    Returns:
        Whether the setting is in force.
    """
    if _APPLIED:
        return _APPLIED[0]
    ok = False
    if os.environ.get("FINETUNE_MALLOC", "") != "default" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
        except (OSError, AttributeError):
            ok = False
    _APPLIED.append(ok)
    return ok
