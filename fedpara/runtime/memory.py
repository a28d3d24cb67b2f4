"""Keep freed memory for reuse instead of handing it back to the OS after every message.

A round allocates and frees the same large buffers again and again: chunk frames of 1 MB, a
message buffer, decoded tensors, aggregation sums. With glibc's defaults each buffer above a
dynamic threshold is a fresh ``mmap`` whose pages fault in one by one, and freed memory at the
top of the heap is trimmed: for a 61 MB VGG16 payload, page faults cost more than the copies
themselves (``benchmarks/bench_stages.py``: splitting 34 -> 8 ms, reassembling 52 -> 9 ms,
encoding 79 -> 52 ms with the settings below; docs/round.md). :func:`tune_malloc` sets, through
``mallopt``: no buffer gets a mapping of its own (``M_MMAP_MAX`` 0): glibc caps the mmap threshold
at 32 MB, so without this every buffer of a bigger message (61 MB for VGG16 dense factors) was a
fresh mapping faulted in page by page, 24 ms per buffer here before a byte of it was written and
far more while the cores are busy; buffers up to 32 MB would come from the heap anyway
(``M_MMAP_THRESHOLD``, where a C library refuses the first setting); up to 1 GB of freed memory
stays with the process (``M_TRIM_THRESHOLD``), and the heap grows 64 MB at a time
(``M_TOP_PAD``). A request no heap can hold still gets a mapping (glibc falls back to ``mmap``).
The price: a process's resident memory stays near its per-round peak between rounds instead of
dropping. The ``fedpara`` commands call it at start (glibc on Linux only);
``FEDPARA_MALLOC=default`` keeps the C library's defaults.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
SETTINGS = ((M_MMAP_MAX, 0), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))


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
