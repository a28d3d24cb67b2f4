"""Strict reader (and a small writer) for the IDX format used by MNIST and Fashion-MNIST.

IDX layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic
``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the
row-major data in big-endian order. Files may be gzip-compressed (detected by the gzip magic, not
by the file name). Every declared size is checked against the bytes actually present before
anything is allocated, and any mismatch raises ``ValueError`` naming the file.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_FOR_DTYPE = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
MAX_NDIM = 8
MAX_BYTES = 1 << 32  # 4 GiB: far above any IDX dataset; guards a corrupt header.


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    return raw


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a read-only native-endian array of the declared shape."""
    if len(raw) < 4:
        raise ValueError(f"{name}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{name}: bad IDX magic {raw[:4].hex()} (first two bytes must be 0x00 0x00)"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02x} (known: {known})")
    if not 1 <= ndim <= MAX_NDIM:
        raise ValueError(f"{name}: IDX ndim {ndim} out of range 1..{MAX_NDIM}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated IDX header (need {header} bytes, have {len(raw)})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
    if expected > MAX_BYTES:
        raise ValueError(f"{name}: IDX dims {dims} declare {expected} bytes, above {MAX_BYTES}")
    have = len(raw) - header
    if have != expected:
        raise ValueError(
            f"{name}: IDX dims {dims} x {dtype.itemsize} B need {expected} data bytes, "
            f"file has {have}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip) and return its array. Raises ValueError on bad files."""
    path = Path(path)
    arr = parse_idx(_read_bytes(path), name=str(path))
    log.debug("read %s: shape=%s dtype=%s", path, arr.shape, arr.dtype)
    return arr


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as IDX bytes (big-endian), the inverse of :func:`parse_idx`."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODE_FOR_DTYPE:
        raise TypeError(f"dtype {array.dtype} has no IDX code (supported: uint8, int8, "
                        "int16, int32, float32, float64)")
    code = _CODE_FOR_DTYPE[native]
    if not 1 <= array.ndim <= MAX_NDIM:
        raise ValueError(f"ndim {array.ndim} out of range 1..{MAX_NDIM}")
    head = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return head + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip when ``compress`` or when the name ends in .gz."""
    path = Path(path)
    data = encode_idx(array)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        data = gzip.compress(data, compresslevel=1, mtime=0)
    path.write_bytes(data)
    return path
