"""Keep freed memory for reuse instead of handing it back to the OS after every message.

A round allocates and frees the same large buffers again and again: chunk frames of 1 MB, a
message buffer, decoded tensors, aggregation sums. With glibc's defaults each buffer above a
dynamic threshold is a fresh ``mmap`` whose pages fault in one by one, and freed memory at the
top of the heap is trimmed: for a 61 MB VGG16 payload, page faults cost more than the copies
themselves (``benchmarks/bench_stages.py``: splitting 34 -> 8 ms, reassembling 52 -> 9 ms,
encoding 79 -> 52 ms with the settings below; docs/round.md). :func:`tune_malloc` sets, through
``mallopt``: buffers up to 32 MB come from the heap (``M_MMAP_THRESHOLD``), up to 1 GB of freed
memory stays with the process (``M_TRIM_THRESHOLD``), and the heap grows 64 MB at a time
(``M_TOP_PAD``). The price: a process's resident memory stays near its per-round peak between
rounds instead of dropping. The ``fedpara`` commands call it at start (glibc on Linux only);
``FEDPARA_MALLOC=default`` keeps the C library's defaults.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))


def tune_malloc() -> bool:
    """Apply :data:`SETTINGS` to glibc's malloc; False where that is not possible or not wanted."""
    if os.environ.get("FEDPARA_MALLOC", "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their mallopt is a stub
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    if not ok:
        log.debug("mallopt refused a setting; the C library's defaults stay in part")
    return ok
