"""A fixed glibc allocator policy for CPU timings, the same for every implementation.

glibc's ``malloc`` serves blocks above a *dynamic* threshold (128 KiB at start, raised by the
frees it sees) with fresh ``mmap`` pages, and gives the top of its heap back to the system above
a trim threshold. A CPU loss at the benchmark sizes allocates temporaries of 0.1-2 MiB, so the
same call costs either its arithmetic or its arithmetic plus a page fault per 4 KiB of every
temporary, depending on what ran before it: the same kdloss forward measured 0.33 ms and 2.2 ms
in two loops of one process (64x2048 bf16). :func:`pin_malloc` fixes both thresholds at 1 GiB
(``mallopt``), so every temporary is reused from the heap, for kdloss and the baselines alike.
A training process that allocates large tensors reaches about the same state by itself (the
dynamic threshold rises to the largest block freed, up to 32 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30


def pin_malloc() -> str:
    """Fix glibc's mmap and trim thresholds at 1 GiB; returns what was done, for the results' header."""
    name = ctypes.util.find_library("c")
    if name is None:
        return "default allocator (no C library found)"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default allocator (not glibc)"
    ok = mallopt(_M_MMAP_THRESHOLD, _ONE_GIB) == 1 and mallopt(_M_TRIM_THRESHOLD, _ONE_GIB) == 1
    return "glibc mallopt: mmap and trim thresholds 1 GiB" if ok else "default allocator (mallopt refused)"
