"""Give freed tensor memory back to the operating system during ZeRO-3 and FSDP runs (glibc only).

ZeRO-3 repeatedly allocates a module's whole parameters and frees them a moment later: `deepspeed.zero.Init`
creates each module whole and then keeps only this rank's slice, loading gathers each module to copy checkpoint
values in, and every step gathers each layer again. glibc serves allocations below its mmap threshold from the heap,
and raises that threshold (up to 32 MiB) each time a larger block is freed, so after the first few modules every
parameter of a mid-sized model lands on the heap; the freed blocks stay in the process, fragmented between the slices
it keeps. FSDP's all-gathers (and the broadcast of `cpu_ram_efficient_loading`) free whole tensors the same way.
Measured with `benchmarks/zero3_loading.py` (2 processes, a 1.3 GB model): loading partitioned held 2.2 GB of
anonymous memory on rank 1 with glibc's defaults, 1.1 GB with a fixed threshold (the slice, 0.65 GB, plus the
imports). A fixed threshold also turns glibc's adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: a parameter of a 512 x 512 fp32 matrix and up comes from (and goes back to) mmap
_USER_SETTING = "MALLOC_MMAP_THRESHOLD_"  # glibc's own environment variable: a user's choice wins


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (musl and others have no mallopt)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_tensors(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for the rest of the process and return the heap's free pages.

    Returns whether the setting was applied: not on other C libraries, and not when the user set
    `MALLOC_MMAP_THRESHOLD_` (glibc read it at start-up)."""
    if os.environ.get(_USER_SETTING):
        return False
    libc = _glibc()
    if libc is None:
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        logger.debug("mallopt(M_MMAP_THRESHOLD, %d) was refused", threshold)
        return False
    libc.malloc_trim(0)
    return True


def trim() -> None:
    """Hand the heap's free pages back to the operating system (after a phase that freed a lot)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
