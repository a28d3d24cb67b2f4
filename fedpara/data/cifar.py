"""CIFAR-10 / CIFAR-100 (Krizhevsky, 2009) from the *binary* version only (no pickle).

CIFAR-10 binary (``cifar-10-batches-bin/``): ``data_batch_1..5.bin`` (train) and
``test_batch.bin``; each record is 1 label byte + 3072 pixel bytes (1024 R, 1024 G, 1024 B,
row-major 32x32). CIFAR-100 binary (``cifar-100-binary/``): ``train.bin`` and ``test.bin``;
each record is 2 label bytes (coarse 0..19, fine 0..99) + 3072 pixel bytes.

The "python version" of both datasets is pickled and deliberately unsupported.

Lookup order for the directory: the explicit ``path`` (the batches directory itself or its
parent), then ``$FEDPARA_DATA`` (same two forms). Pixels are scaled to [0, 1] and normalised
per channel with the usual training-set statistics below.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_BYTES = 3 * 32 * 32
INPUT_SHAPE = (3, 32, 32)
ENV_VAR = "FEDPARA_DATA"


@dataclass(frozen=True)
class CifarFormat:
    """On-disk layout of one CIFAR binary variant."""

    name: str
    subdir: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int
    num_classes: dict[str, int]  # label kind -> class count; the first kind is the default
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarFormat(
    name="cifar10",
    subdir="cifar-10-batches-bin",
    train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    test_files=("test_batch.bin",),
    label_bytes=1,
    num_classes={"label": 10},
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarFormat(
    name="cifar100",
    subdir="cifar-100-binary",
    train_files=("train.bin",),
    test_files=("test.bin",),
    label_bytes=2,
    num_classes={"fine": 100, "coarse": 20},
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
FORMATS = {f.name: f for f in (CIFAR10, CIFAR100)}


def read_cifar_bin(path: str | os.PathLike, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch file into ``(images uint8 (N,3,32,32), labels uint8 (N,label_bytes))``.

    Raises ValueError when the file size is not a whole number of records.
    """
    path = Path(path)
    raw = path.read_bytes()
    record = label_bytes + IMAGE_BYTES
    if len(raw) == 0 or len(raw) % record:
        raise ValueError(f"{path}: size {len(raw)} is not a positive multiple of the "
                         f"{record}-byte CIFAR record ({label_bytes} label + {IMAGE_BYTES} "
                         "pixel bytes)")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = rows[:, :label_bytes]
    images = rows[:, label_bytes:].reshape(-1, *INPUT_SHAPE)
    return images, labels


def find_cifar(fmt: CifarFormat, path: str | os.PathLike | None = None) -> Path:
    """Return the directory holding ``fmt``'s binary files, or raise FileNotFoundError."""
    if path is not None:
        roots = [Path(path)]
    elif os.environ.get(ENV_VAR):
        roots = [Path(os.environ[ENV_VAR])]
    else:
        roots = []
    for root in roots:
        for directory in (root, root / fmt.subdir):
            if all((directory / f).is_file() for f in fmt.train_files + fmt.test_files):
                return directory
    tried = ", ".join(f"{r} and {r / fmt.subdir}" for r in roots) or "nothing"
    raise FileNotFoundError(
        f"{fmt.name} binary files not found (tried {tried}); download the *binary* version "
        f"({fmt.subdir}) and pass path=DIR or set ${ENV_VAR}"
    )


def _read_split(fmt: CifarFormat, directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    files = fmt.train_files if split == "train" else fmt.test_files
    parts = [read_cifar_bin(directory / f, fmt.label_bytes) for f in files]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, labels


def _label_column(fmt: CifarFormat, labels: np.ndarray, label: str | None,
                  where: Path) -> np.ndarray:
    kinds = list(fmt.num_classes)
    label = label or kinds[0]
    if label not in fmt.num_classes:
        raise ValueError(f"{fmt.name}: label must be one of {kinds}, got {label!r}")
    # CIFAR-100 records are (coarse, fine); CIFAR-10 has a single label byte.
    column = labels[:, 0] if label in ("label", "coarse") else labels[:, 1]
    if column.size and int(column.max()) >= fmt.num_classes[label]:
        raise ValueError(f"{where}: {fmt.name} {label} label {int(column.max())} out of range "
                         f"0..{fmt.num_classes[label] - 1}")
    return column.astype(np.int64)


def read_cifar_labels(name: str, split: str = "train", path: str | os.PathLike | None = None,
                      label: str | None = None) -> np.ndarray:
    """The split's labels as int64 (for partitioning)."""
    fmt = FORMATS[name]
    directory = find_cifar(fmt, path)
    _, labels = _read_split(fmt, directory, split)
    return _label_column(fmt, labels, label, directory)


def load_cifar(
    name: str,
    split: str = "train",
    path: str | os.PathLike | None = None,
    indices: np.ndarray | None = None,
    label: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``cifar10`` or ``cifar100`` as ``(x float32 (N,3,32,32) normalised, y int64 (N,))``.

    ``label`` picks CIFAR-100's ``fine`` (default) or ``coarse`` labels. ``indices`` selects rows
    before the float conversion.
    """
    if name not in FORMATS:
        raise ValueError(f"unknown CIFAR variant {name!r} (supported: {sorted(FORMATS)})")
    fmt = FORMATS[name]
    directory = find_cifar(fmt, path)
    images, labels = _read_split(fmt, directory, split)
    y = _label_column(fmt, labels, label, directory)
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        images, y = images[indices], y[indices]
    mean = torch.tensor(fmt.mean).view(1, 3, 1, 1)
    std = torch.tensor(fmt.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(images.astype(np.float32)).div_(255.0) - mean) / std  # (N,3,32,32)
    return x, torch.from_numpy(y)
