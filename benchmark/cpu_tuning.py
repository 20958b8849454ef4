"""Process-wide CPU settings that change speed, never results.

glibc's malloc serves every large tensor (a GeneratorA activation at B 512 is 64-256 MB) with a
fresh ``mmap`` and gives it back with ``munmap``, so each forward pays for the kernel zeroing and
re-mapping those pages: about half the CPU time of the reference DFAD code (spec §6).  Keeping
freed memory in the heap removes that cost, at the price of the process holding on to its peak
memory.  This is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do when set before Python
starts; :func:`tune_malloc` does the same from inside the process with ``mallopt``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): keep up to 2 GiB free at the heap top

_done = False


def tune_malloc() -> bool:
    """Stop glibc from returning large freed buffers to the kernel; True when applied.

    Set ``DFKD_MALLOC=default`` to keep glibc's behaviour.  A no-op without glibc.
    """
    global _done
    if _done:
        return True
    if os.environ.get("DFKD_MALLOC", "tuned") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
