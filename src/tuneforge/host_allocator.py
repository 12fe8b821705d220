"""Keep freed host memory inside the process while a model computes on the CPU.

glibc's malloc serves every block above a threshold (128 KiB at first, adjusted up to 32 MiB) with
a fresh `mmap`, and hands the top of its heap back to the kernel whenever more than a little is
free. A CPU training step allocates and frees activation buffers of a few MiB hundreds of times,
so with those defaults most buffers are new mappings that the kernel zero-fills page by page on
first touch: element-wise work (norms, residuals, rotary, SiLU) then waits on page faults more
than it computes. An RMSNorm forward and backward on 1,000 x 576 floats, one thread, took 7.2 ms
with the defaults and 3.0-4.4 ms with the settings below (`bench/` has the whole-step figures).

Inside `keep_freed_memory()` blocks below 32 MiB come from the heap and freed memory stays there
for the next step. On leaving, trimming is restored and the free memory goes back to the kernel,
so a notebook that trained once does not keep the peak for ever. It does nothing where the C
library is not glibc, and defers to a user who set glibc's MALLOC_*_ variables.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
TRIM_NEVER = 2**31 - 1
TRIM_DEFAULT = 128 * 1024
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def glibc():
    """The process's glibc, or None (another C library, or another OS)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (ValueError, OSError, AttributeError):
        return None


@contextmanager
def keep_freed_memory() -> Iterator[None]:
    libc = glibc()
    if libc is None or any(name in os.environ for name in USER_SETTINGS):
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_DEFAULT)
        libc.malloc_trim(0)
