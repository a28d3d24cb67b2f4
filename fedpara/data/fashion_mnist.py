"""Fashion-MNIST (Xiao et al., 2017) from IDX files: 60k train / 10k test, 1x28x28, 10 classes.

The files come from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) or any
directory holding the same names, raw or ``.gz``. Nothing is cached on disk.

Lookup order for the directory: the explicit ``path`` argument (used alone when given: a wrong
path is an error, not a silent fallback), then ``$FEDPARA_DATA`` (the directory itself or its
``fashion-mnist/`` subdirectory), then the Debian path (:data:`DEBIAN_DIR`).

Pixels are scaled to [0, 1] and normalised with ``(x - MEAN) / STD`` where MEAN=0.2860 and
STD=0.3530 are the mean and standard deviation of all training-set pixels (computed from the
60,000 training images: 0.28604, 0.35302).

The file layout, the reader and the normalisation are numpy-only, so ``fedpara-infer`` reads the
same samples without torch; only :func:`load_fashion_mnist` and :func:`fashion_mnist_dataset`
(what the loaders use: uint8 rows normalised per sample or batch,
:class:`~fedpara.data.normalised_images.NormalisedImages`) import torch, when called.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .idx import IdxFile, read_idx

log = logging.getLogger(__name__)

__all__ = ["CLASSES", "DEBIAN_DIR", "ENV_VAR", "INPUT_SHAPE", "INSTALL_HINT", "MEAN", "NUM_CLASSES",
           "PIXEL_LUT", "STD", "SUBDIR", "fashion_mnist_dataset", "find_fashion_mnist", "load_fashion_mnist",
           "normalise", "read_labels", "read_split", "read_split_uint8"]

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
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    return None


def _holds_files(directory: Path) -> bool:
    return all(split_file(directory, s, k) for s in SPLITS for k in ("images-idx3", "labels-idx1"))


def find_fashion_mnist(path: str | os.PathLike | None = None, *, default_dir: Path | None = None) -> Path:
    """The directory holding the four Fashion-MNIST IDX files, or FileNotFoundError with the
    install hint. ``default_dir`` replaces :data:`DEBIAN_DIR` as the last candidate."""
    if path is not None:  # an explicit path is used alone: no silent fallback
        candidates = [Path(path), Path(path) / SUBDIR]
    else:
        candidates = []
        if os.environ.get(ENV_VAR):
            root = Path(os.environ[ENV_VAR])
            candidates += [root, root / SUBDIR]
        candidates.append(Path(DEBIAN_DIR if default_dir is None else default_dir))
    for directory in candidates:
        if directory.is_dir() and _holds_files(directory):
            return directory
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"Fashion-MNIST IDX files not found (tried {tried}); {INSTALL_HINT}")


def read_labels(split: str = "train", path: str | os.PathLike | None = None) -> np.ndarray:
    """The split's labels as an int64 array: cheap, used to compute partitions."""
    check_split(split)
    directory = find_fashion_mnist(path)
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


def read_split_uint8(split: str = "train", path: str | os.PathLike | None = None,
                     indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 (N,1,28,28), y int64 (N,))`` of a split, rows ``indices`` only.

    The images file is streamed and only the selected rows are kept (the labels are read whole:
    60,000 bytes), so a client of 10 holds 4.7 MB of pixels, never the 47 MB split nor the gzip.
    """
    check_split(split)
    directory = find_fashion_mnist(path)
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
        if labels.max(initial=0) >= NUM_CLASSES:
            raise ValueError(f"{directory}: {split} labels must be in 0..{NUM_CLASSES - 1}")
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64)
            labels = labels[indices]
        x = images.read(indices)
    return x[:, None], labels.astype(np.int64)


def read_split(split: str = "train", path: str | os.PathLike | None = None,
               indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x float32 (N,1,28,28) normalised, y int64 (N,))``: :func:`read_split_uint8` normalised
    whole (reading uint8 and normalising per batch is leaner still)."""
    x, y = read_split_uint8(split, path, indices)
    return normalise(x), y


def load_fashion_mnist(split: str = "train", path: str | os.PathLike | None = None,
                       indices: np.ndarray | None = None):
    """Load a split as torch tensors ``(x float32 (N,1,28,28) normalised, y int64 (N,))``.

    ``indices`` selects rows before the float conversion, so a client only materialises its own
    shard as float32. Needs torch.
    """
    import torch

    x, y = read_split(split, path, indices)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def fashion_mnist_dataset(split: str = "train", path: str | os.PathLike | None = None,
                          indices: np.ndarray | None = None):
    """Rows ``indices`` of a split as a torch dataset of uint8 pixels normalised when read
    (:class:`~fedpara.data.normalised_images.NormalisedImages`).

    Its samples equal ``load_fashion_mnist(split, path, indices)``'s rows bit for bit; it holds a
    quarter of the memory and never the whole split. Needs torch.
    """
    from .normalised_images import NormalisedImages

    x, y = read_split_uint8(split, path, indices)
    return NormalisedImages(x, y, PIXEL_LUT)
