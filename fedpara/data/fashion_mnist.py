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

The file layout, the reader and the normalisation are numpy-only and live in
:mod:`export.datafiles` (shared with ``fedpara-infer``, which runs without torch); this module
wraps them in tensors. :func:`fashion_mnist_dataset` is what the loaders use: it streams the
images file, keeps only the selected rows as uint8 and normalises per sample or batch
(:class:`~fedpara.data.lazy.NormalisedImages`), with the same float32 values reaching the model.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from export import datafiles
from export.datafiles import (
    CLASSES,
    DEBIAN_DIR,
    ENV_VAR,
    INPUT_SHAPE,
    INSTALL_HINT,
    MEAN,
    NUM_CLASSES,
    PIXEL_LUT,
    STD,
    SUBDIR,
)

from .lazy import NormalisedImages

__all__ = ["CLASSES", "DEBIAN_DIR", "ENV_VAR", "INPUT_SHAPE", "INSTALL_HINT", "MEAN", "NUM_CLASSES",
           "STD", "SUBDIR", "fashion_mnist_dataset", "find_fashion_mnist", "load_fashion_mnist",
           "read_labels"]


def _has_files(directory) -> bool:
    return datafiles.has_files(directory)


def find_fashion_mnist(path: str | os.PathLike | None = None):
    """Return the directory holding the four Fashion-MNIST IDX files.

    Raises FileNotFoundError with the install hint when no candidate directory has them.
    """
    return datafiles.find_fashion_mnist(path, default_dir=DEBIAN_DIR)


def read_labels(split: str = "train", path: str | os.PathLike | None = None) -> np.ndarray:
    """The split's labels as an int64 array: cheap, used to compute partitions."""
    datafiles.check_split(split)
    return datafiles.read_labels_in(find_fashion_mnist(path), split)


def load_fashion_mnist(
    split: str = "train",
    path: str | os.PathLike | None = None,
    indices: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split as ``(x float32 (N,1,28,28) normalised, y int64 (N,))``.

    ``indices`` selects rows before the float conversion, so a client only materialises its own
    shard as float32.
    """
    datafiles.check_split(split)
    x, y = datafiles.read_split(find_fashion_mnist(path), split, indices)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def fashion_mnist_dataset(
    split: str = "train",
    path: str | os.PathLike | None = None,
    indices: np.ndarray | None = None,
) -> NormalisedImages:
    """Rows ``indices`` of a split as a dataset of uint8 pixels normalised when read.

    Its samples equal ``load_fashion_mnist(split, path, indices)``'s rows bit for bit; it holds a
    quarter of the memory and never the whole split.
    """
    datafiles.check_split(split)
    x, y = datafiles.read_split_uint8(find_fashion_mnist(path), split, indices)
    return NormalisedImages(x, y, PIXEL_LUT)
