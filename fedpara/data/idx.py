"""Strict reader (and a small writer) for the IDX format used by MNIST and Fashion-MNIST.

numpy only: importable without torch (``fedpara-infer`` reads test data with it on the ``infer``
install profile).

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
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["IDX_DTYPES", "MAX_BYTES", "MAX_NDIM", "IdxFile", "encode_idx", "parse_idx", "read_idx",
           "write_idx"]

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


def _parse_header(head: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, dims, header bytes)`` from the start of an IDX file; ValueError when malformed.

    ``head`` is the whole file or at least its first ``4 + 4 * MAX_NDIM`` bytes.
    """
    if len(head) < 4:
        raise ValueError(f"{name}: too short for an IDX header ({len(head)} bytes)")
    if head[0] != 0 or head[1] != 0:
        raise ValueError(
            f"{name}: bad IDX magic {head[:4].hex()} (first two bytes must be 0x00 0x00)"
        )
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise ValueError(f"{name}: unknown IDX dtype code 0x{code:02x} (known: {known})")
    if not 1 <= ndim <= MAX_NDIM:
        raise ValueError(f"{name}: IDX ndim {ndim} out of range 1..{MAX_NDIM}")
    header = 4 + 4 * ndim
    if len(head) < header:
        raise ValueError(f"{name}: truncated IDX header (need {header} bytes, have {len(head)})")
    dims = tuple(int(d) for d in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow
    if expected > MAX_BYTES:
        raise ValueError(f"{name}: IDX dims {dims} declare {expected} bytes, above {MAX_BYTES}")
    return dtype, dims, header


def _size_error(name: str, dims: tuple, dtype: np.dtype, have: int) -> ValueError:
    expected = math.prod(dims) * dtype.itemsize
    return ValueError(f"{name}: IDX dims {dims} x {dtype.itemsize} B need {expected} data bytes, "
                      f"file has {have}")


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a read-only native-endian array of the declared shape."""
    dtype, dims, header = _parse_header(raw[:4 + 4 * MAX_NDIM], name)
    have = len(raw) - header
    if have != math.prod(dims) * dtype.itemsize:
        raise _size_error(name, dims, dtype, have)
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def read_idx(path: str | os.PathLike, indices: np.ndarray | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) and return its array. Raises ValueError on bad files.

    The file is streamed: only the result is held, never the compressed bytes and the whole
    decompressed copy at once. ``indices`` keeps only those rows (axis 0, any order, repeats
    allowed), so the other rows are never stored.
    """
    with IdxFile(path) as f:
        arr = f.read(indices)
    log.debug("read %s: shape=%s dtype=%s", path, arr.shape, arr.dtype)
    return arr


class IdxFile:
    """An IDX file (raw or gzip) opened for streaming: ``dtype`` and ``shape`` from its header,
    then :meth:`read` (once) for all rows or selected ones. Use as a context manager."""

    CHUNK = 1 << 20  # bytes decompressed per step

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self._file = open(self.path, "rb")
        try:
            magic = self._file.read(2)
            self._file.seek(0)
            self.compressed = magic == _GZIP_MAGIC
            self._stream = gzip.GzipFile(fileobj=self._file, mode="rb") if self.compressed else self._file
            head = self._read(4 + 4 * MAX_NDIM)
            dtype, self.shape, header = _parse_header(head, self.name)
        except BaseException:
            self._file.close()
            raise
        self.dtype, self._file_dtype = dtype.newbyteorder("="), dtype
        self._pending = head[header:]  # data bytes read along with the header, consumed first

    def __enter__(self) -> IdxFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._stream is not self._file:
            self._stream.close()
        self._file.close()

    def _read(self, n: int) -> bytes:
        try:
            return self._stream.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{self.name}: corrupt gzip stream ({e})") from e

    def _rewind(self) -> None:
        self._file.seek(0)
        self._stream = gzip.GzipFile(fileobj=self._file, mode="rb")
        self._read(4 + 4 * len(self.shape))
        self._pending = b""

    def _take(self, n: int) -> bytes:
        """Up to ``n`` data bytes (fewer only at the end of the file)."""
        if self._pending:
            head, self._pending = self._pending[:n], self._pending[n:]
            return head + (self._read(n - len(head)) if len(head) < n else b"")
        return self._read(n)

    def _count_rest(self) -> int:
        total = 0
        while chunk := self._take(self.CHUNK):
            total += len(chunk)
        return total

    def _declared_size_ok(self, data_bytes: int) -> bool:
        """Cheap check of the data size before allocating: file size, or gzip's ISIZE trailer."""
        size = os.fstat(self._file.fileno()).st_size
        if not self.compressed:
            return size - (4 + 4 * len(self.shape)) == data_bytes
        if size < 18:
            return False
        pos = self._file.tell()
        self._file.seek(size - 4)
        isize = int.from_bytes(self._file.read(4), "little")
        self._file.seek(pos)
        return isize == (4 + 4 * len(self.shape) + data_bytes) % (1 << 32)

    def read(self, indices: np.ndarray | None = None) -> np.ndarray:
        """All rows, or rows ``indices`` in that order, as a native-endian array."""
        dims, itemsize = self.shape, self._file_dtype.itemsize
        n = dims[0]
        row_items = math.prod(dims[1:])
        expected = n * row_items * itemsize
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            indices = np.where(indices < 0, indices + n, indices)
            if indices.size and (indices.min() < 0 or indices.max() >= n):
                raise IndexError(f"{self.name}: row index out of range for {n} rows")
        if not self._declared_size_ok(expected):  # count what is there without allocating
            have = self._count_rest()
            if have != expected:
                raise _size_error(self.name, dims, self._file_dtype, have)
            self._rewind()  # e.g. multi-member gzip, whose ISIZE covers the last member only
        rows = n if indices is None else len(indices)
        out = np.empty((rows, *dims[1:]), dtype=self.dtype)
        flat = out.reshape(rows, row_items)
        if indices is not None:
            order = np.argsort(indices, kind="stable")
            wanted = indices[order]
        row_bytes = row_items * itemsize
        step = max(1, self.CHUNK // max(row_bytes, 1))
        got, start = 0, 0
        while start < n and row_bytes:
            count = min(step, n - start)
            chunk = self._take(count * row_bytes)
            got += len(chunk)
            if len(chunk) < count * row_bytes:
                raise _size_error(self.name, dims, self._file_dtype, got + self._count_rest())
            block = np.frombuffer(chunk, dtype=self._file_dtype).reshape(count, row_items)
            if indices is None:
                flat[start:start + count] = block
            else:
                lo, hi = np.searchsorted(wanted, [start, start + count])
                flat[order[lo:hi]] = block[wanted[lo:hi] - start]
            start += count
        extra = self._count_rest()
        if extra:
            raise _size_error(self.name, dims, self._file_dtype, expected + extra)
        return out


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
