"""A torch dataset that stores uint8 images and normalises them only when a sample or batch is read.

:class:`NormalisedImages` holds a client's pixels as uint8 (4x smaller than float32) and maps
each sample (or each batch, through ``__getitems__``, which ``DataLoader`` uses) to float32 with a
256-entry lookup table. The table is computed with the same float32 operations as a whole-array
conversion, so every sample is bit-identical to what the eager float32 ``TensorDataset`` held:
same values, dtype and shape reach the model, in the same order.

It is a ``TensorDataset`` for callers that read ``.tensors``: that property materialises the
float32 images on each access (not cached, so memory is only spent while a caller holds them).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


class NormalisedImages(TensorDataset):
    """``(float32 image, int64 label)`` samples from uint8 images and a pixel lookup table."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, lut: np.ndarray) -> None:
        # TensorDataset.__init__ is not called: ``tensors`` is a property here.
        images, labels, lut = np.asarray(images), np.asarray(labels), np.asarray(lut)
        if images.dtype != np.uint8 or lut.shape != (256,) or lut.dtype != np.float32:
            raise TypeError(f"need uint8 images and a float32 (256,) table, got {images.dtype} "
                            f"and {lut.dtype} {lut.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
        self.lut = lut

    def __len__(self) -> int:
        return len(self.images)

    def _pixels(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        return torch.from_numpy(np.ascontiguousarray(self.lut[self.images[index]]))

    def __getitem__(self, index):
        return self._pixels(index), self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One batch at once (DataLoader's fast path); the collate function stacks the rows."""
        x = self._pixels(np.asarray(indices, dtype=np.int64))
        return list(zip(x, self.labels[indices]))

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x float32 (N, ...), y int64 (N,))``, materialised on each access."""
        return self._pixels(slice(None)), self.labels

    def __repr__(self) -> str:
        return f"NormalisedImages({len(self)} x {tuple(self.images.shape[1:])} uint8)"
