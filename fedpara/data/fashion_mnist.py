"""Fashion-MNIST (Xiao et al., 2017) from IDX files: 60k train / 10k test, 1x28x28, 10 classes.

The files come from Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) or any
directory holding the same names, raw or ``.gz``. Nothing is cached on disk.

Lookup order for the directory: the explicit ``path`` argument (used alone when given: a wrong
path is an error, not a silent fallback), then ``$FEDPARA_DATA`` (the directory itself or its
``fashion-mnist/`` subdirectory), then the Debian path.

Pixels are scaled to [0, 1] and normalised with ``(x - MEAN) / STD`` where MEAN=0.2860 and
STD=0.3530 are the mean and standard deviation of all training-set pixels (computed from the
60,000 training images: 0.28604, 0.35302).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .idx import read_idx

log = logging.getLogger(__name__)

MEAN = 0.2860
STD = 0.3530
NUM_CLASSES = 10
INPUT_SHAPE = (1, 28, 28)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FEDPARA_DATA"
SUBDIR = "fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}
_SIZES = {"train": 60000, "test": 10000}
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (files land in "
    f"{DEBIAN_DIR}) or set ${ENV_VAR} to a directory holding the IDX files"
)


def _file(directory: Path, split: str, kind: str) -> Path | None:
    stem = f"{_PREFIX[split]}-{kind}-ubyte"
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _has_files(directory: Path) -> bool:
    return all(_file(directory, s, k) for s in _PREFIX for k in ("images-idx3", "labels-idx1"))


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the four Fashion-MNIST IDX files.

    Raises FileNotFoundError with the install hint when no candidate directory has them.
    """
    if path is not None:  # an explicit path is used alone: no silent fallback
        candidates = [Path(path), Path(path) / SUBDIR]
    else:
        candidates = []
        if os.environ.get(ENV_VAR):
            root = Path(os.environ[ENV_VAR])
            candidates += [root, root / SUBDIR]
        candidates.append(DEBIAN_DIR)
    for directory in candidates:
        if directory.is_dir() and _has_files(directory):
            return directory
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"Fashion-MNIST IDX files not found (tried {tried}); {INSTALL_HINT}")


def read_labels(split: str = "train", path: str | os.PathLike | None = None) -> np.ndarray:
    """The split's labels as an int64 array: cheap, used to compute partitions."""
    _check_split(split)
    directory = find_fashion_mnist(path)
    labels = read_idx(_file(directory, split, "labels-idx1"))
    if labels.ndim != 1 or labels.max(initial=0) >= NUM_CLASSES:
        raise ValueError(f"{directory}: {split} labels must be 1-D in 0..{NUM_CLASSES - 1}")
    return labels.astype(np.int64)


def load_fashion_mnist(
    split: str = "train",
    path: str | os.PathLike | None = None,
    indices: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as ``(x float32 (N,1,28,28) normalised, y int64 (N,))``.

    ``indices`` selects rows before the float conversion, so a client only materialises its own
    shard as float32.
    """
    _check_split(split)
    directory = find_fashion_mnist(path)
    images = read_idx(_file(directory, split, "images-idx3"))
    labels = read_idx(_file(directory, split, "labels-idx1"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{directory}: {split} images must be uint8 (N,28,28), "
                         f"got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{directory}: {split} has {images.shape[0]} images but labels "
                         f"of shape {labels.shape}")
    if images.shape[0] != _SIZES[split]:
        log.warning("%s: %s split has %d samples (expected %d)",
                    directory, split, images.shape[0], _SIZES[split])
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        images, labels = images[indices], labels[indices]
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD)
    x = x.unsqueeze(1)  # (N, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _check_split(split: str) -> None:
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split!r}")
