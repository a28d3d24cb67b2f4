"""Numpy-only readers for the data files a device runs inference on: IDX and Fashion-MNIST.

This module imports neither torch nor the ``fedpara`` package, so ``fedpara-infer`` can read test
data on an install without PyTorch (the ``infer`` profile). ``fedpara.data`` builds its torch
datasets on top of it; the IDX format and the Fashion-MNIST file layout live only here.

IDX layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic
``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 dimension sizes, then the
row-major data in big-endian order. Files may be gzip-compressed (detected by the gzip magic, not
by the file name). Every declared size is checked against the bytes actually present before
anything is allocated, and any mismatch raises ``ValueError`` naming the file.

Fashion-MNIST (Xiao et al., 2017): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in one
directory: the explicit ``path`` (used alone), else ``$FEDPARA_DATA`` (itself or its
``fashion-mnist/`` subdirectory), else Debian's ``dataset-fashion-mnist`` directory. Pixels are
scaled to [0, 1] and normalised with ``(x - MEAN) / STD`` (mean and std of all 60,000 training
images: 0.28604, 0.35302).
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

# --- IDX --------------------------------------------------------------------------------------

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


# --- subsets ----------------------------------------------------------------------------------

TEST_TAG = 1 << 20  # RNG stream for capping the server test split (client streams use their index)


def seeded_subset(indices: np.ndarray, limit: int | None, seed: int, tag: int) -> np.ndarray:
    """A seeded, sorted subset of at most ``limit`` indices (what a data spec's ``limit`` means)."""
    if limit is None or len(indices) <= limit:
        return indices
    rng = np.random.default_rng([seed, tag])
    return np.sort(rng.choice(indices, size=limit, replace=False))


# --- Fashion-MNIST ----------------------------------------------------------------------------

MEAN = 0.2860
STD = 0.3530
NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FEDPARA_DATA"
SUBDIR = "fashion-mnist"
SPLITS = {"train": "train", "test": "t10k"}  # split -> file prefix
SIZES = {"train": 60000, "test": 10000}
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_DIR}) or set ${ENV_VAR} to a directory holding the IDX files"
)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")


def split_file(directory: Path, split: str, kind: str) -> Path | None:
    """``directory``'s file for ``split`` and ``kind`` (images-idx3 | labels-idx1), .gz first."""
    stem = f"{SPLITS[split]}-{kind}-ubyte"
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def has_files(directory: Path) -> bool:
    return all(split_file(directory, s, k) for s in SPLITS for k in ("images-idx3", "labels-idx1"))


def find_fashion_mnist(path: str | os.PathLike | None = None, *,
                       default_dir: Path = DEBIAN_DIR) -> Path:
    """The directory holding the four Fashion-MNIST IDX files, or FileNotFoundError with a hint."""
    if path is not None:  # an explicit path is used alone: no silent fallback
        candidates = [Path(path), Path(path) / SUBDIR]
    else:
        candidates = []
        if os.environ.get(ENV_VAR):
            root = Path(os.environ[ENV_VAR])
            candidates += [root, root / SUBDIR]
        candidates.append(Path(default_dir))
    for directory in candidates:
        if directory.is_dir() and has_files(directory):
            return directory
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"Fashion-MNIST IDX files not found (tried {tried}); {INSTALL_HINT}")


def read_labels_in(directory: Path, split: str) -> np.ndarray:
    """The split's labels (int64) from ``directory``."""
    check_split(split)
    labels = read_idx(split_file(directory, split, "labels-idx1"))
    if labels.ndim != 1 or labels.max(initial=0) >= NUM_CLASSES:
        raise ValueError(f"{directory}: {split} labels must be 1-D in 0..{NUM_CLASSES - 1}")
    return labels.astype(np.int64)


def _lut() -> np.ndarray:
    """float32 value of each uint8 pixel: the same float32 operations, in the same order, that
    a whole-array conversion does (``x = u8.astype(float32); x /= 255; x -= MEAN; x /= STD``),
    so looking pixels up gives bit-identical results."""
    t = np.arange(256, dtype=np.uint8).astype(np.float32)
    t /= 255.0
    t -= MEAN
    t /= STD
    t.setflags(write=False)
    return t


PIXEL_LUT = _lut()


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 normalised with MEAN/STD (bit-identical to the float arithmetic)."""
    if images.dtype != np.uint8:
        raise TypeError(f"normalise expects uint8 pixels, got {images.dtype}")
    return PIXEL_LUT[images]


def read_split_uint8(directory: Path, split: str,
                     indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 (N,1,28,28), y int64 (N,))`` of a split in ``directory``, rows ``indices`` only.

    The images file is streamed and only the selected rows are kept (the labels are read whole:
    60,000 bytes), so a client of 10 holds 4.7 MB of pixels, never the 47 MB split nor the gzip.
    """
    check_split(split)
    labels = read_idx(split_file(directory, split, "labels-idx1"))
    with IdxFile(split_file(directory, split, "images-idx3")) as images:
        if len(images.shape) != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(f"{directory}: {split} images must be uint8 (N,28,28), "
                             f"got {images.dtype} {images.shape}")
        n = images.shape[0]
        if labels.shape != (n,):
            raise ValueError(f"{directory}: {split} has {n} images but labels "
                             f"of shape {labels.shape}")
        if n != SIZES[split]:
            log.warning("%s: %s split has %d samples (expected %d)", directory, split, n, SIZES[split])
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64)
            labels = labels[indices]
        x = images.read(indices)
    return x[:, None], labels.astype(np.int64)


def read_split(directory: Path, split: str,
               indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32 (N,1,28,28) normalised, y int64 (N,))`` of a split in ``directory``.

    ``indices`` selects rows while streaming (only those rows are read into memory and become
    float32). :func:`read_split_uint8` plus :func:`normalise` per batch is leaner still.
    """
    x, y = read_split_uint8(directory, split, indices)
    return normalise(x), y
