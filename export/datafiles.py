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


def read_split(directory: Path, split: str,
               indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32 (N,1,28,28) normalised, y int64 (N,))`` of a split in ``directory``.

    ``indices`` selects rows before the float conversion (only those rows become float32).
    """
    check_split(split)
    images = read_idx(split_file(directory, split, "images-idx3"))
    labels = read_idx(split_file(directory, split, "labels-idx1"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{directory}: {split} images must be uint8 (N,28,28), "
                         f"got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{directory}: {split} has {images.shape[0]} images but labels "
                         f"of shape {labels.shape}")
    if images.shape[0] != SIZES[split]:
        log.warning("%s: %s split has %d samples (expected %d)",
                    directory, split, images.shape[0], SIZES[split])
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        images, labels = images[indices], labels[indices]
    x = images.astype(np.float32)
    x /= 255.0
    x -= MEAN
    x /= STD
    return x[:, None], labels.astype(np.int64)
