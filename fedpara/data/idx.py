"""Strict reader (and a small writer) for the IDX format used by MNIST and Fashion-MNIST.

The implementation lives in :mod:`export.datafiles`, which is numpy-only and importable without
torch or this package, so that ``fedpara-infer`` reads the same files on an install without
PyTorch. This module keeps the names ``fedpara.data`` has always offered.
"""

from __future__ import annotations

from export.datafiles import (
                              IDX_DTYPES,
                              MAX_BYTES,
                              MAX_NDIM,
                              encode_idx,
                              parse_idx,
                              read_idx,
                              write_idx,
)

__all__ = ["IDX_DTYPES", "MAX_BYTES", "MAX_NDIM", "encode_idx", "parse_idx", "read_idx", "write_idx"]
