"""Seeded synthetic classification data for unit tests and smoke runs (not a benchmark).

Each class has a fixed random prototype; a sample is its class prototype plus unit Gaussian
noise, so a model can actually fit it. The data depend only on ``(n, shape, classes, split)``,
never on the partition seed, so every client sees slices of the same dataset.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

DATA_SEED = 20240521
_SPLIT_TAG = {"train": 1, "test": 2}


def make_synthetic(n: int, shape: tuple[int, ...], classes: int, split: str = "train",
                   signal: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x float32 (n, *shape), y int64 (n,))`` with balanced-ish random labels."""
    if split not in _SPLIT_TAG:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1 or classes < 1 or not shape or min(shape) < 1:
        raise ValueError(f"bad synthetic size n={n} shape={shape} classes={classes}")
    x, y = _generate(n, tuple(shape), classes, split, signal)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())  # copies: callers may modify them


@functools.lru_cache(maxsize=4)
def _generate(n: int, shape: tuple[int, ...], classes: int, split: str, signal: float):
    # cached: the logical clients of a pool (edge_client/pool.py) each take a slice of the same data
    prototypes = np.random.default_rng([DATA_SEED, classes, *shape]).standard_normal(
        (classes, *shape), dtype=np.float32)
    rng = np.random.default_rng([DATA_SEED, _SPLIT_TAG[split], n, classes, *shape])
    y = rng.integers(0, classes, size=n)
    x = signal * prototypes[y] + rng.standard_normal((n, *shape), dtype=np.float32)
    return x, y.astype(np.int64)


def synthetic_labels(n: int, shape: tuple[int, ...], classes: int,
                     split: str = "train") -> np.ndarray:
    """The labels of :func:`make_synthetic` (regenerates the data; it is small by design)."""
    return make_synthetic(n, shape, classes, split)[1].numpy()
