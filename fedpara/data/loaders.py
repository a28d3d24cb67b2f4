"""Entry points used by the CLI, the edge client and the coordinator.

- :func:`load_client_data` ``(spec) -> (TensorDataset, info)``: client ``spec.index``'s train shard.
- :func:`load_test_data` ``(spec) -> TensorDataset``: the full test split, for the server (with
  ``val=FRAC,split=val``: the validation rows held out of the train split instead).
- :func:`load_client_test` ``(spec) -> TensorDataset``: the client's personalised test split
  (pFedPara), same class distribution as its train shard (natural roles for Shakespeare).

A client computes its shard from the train *labels* alone (see :mod:`.partition`) and reads
only its own rows. Fashion-MNIST datasets keep those rows as uint8 and normalise each batch when
it is read (:class:`~fedpara.data.lazy.NormalisedImages`, a ``TensorDataset`` whose ``.tensors``
materialises float32 on demand); the other image sources hold float32 tensors. ``limit`` caps
every returned dataset with a seeded subset. ``val=FRAC`` holds a seeded fraction of the train
split out of every client's shard (:func:`~fedpara.data.partition.validation_split`; Shakespeare:
the last FRAC of each role's train windows), so hyperparameters can be chosen without the test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from export.datafiles import TEST_TAG as _TEST_TAG
from export.datafiles import seeded_subset as _cap

from . import cifar, fashion_mnist, shakespeare
from .lazy import NormalisedImages
from .partition import local_test_indices, partition, validation_split
from .spec import DataSpec, as_spec
from .synthetic import make_synthetic

log = logging.getLogger(__name__)


Labels = Callable[[DataSpec, str], np.ndarray]
Loader = Callable[[DataSpec, str, "np.ndarray | None"], tuple[torch.Tensor, torch.Tensor]]
Lean = Callable[[DataSpec, str, "np.ndarray | None"], Dataset]


@dataclass(frozen=True)
class ImageSource:
    """How to read one labelled image dataset: labels alone (cheap), and selected rows."""

    labels: Labels
    load: Loader
    num_classes: Callable[[DataSpec], int]
    input_shape: Callable[[DataSpec], tuple[int, ...]]
    dataset: Lean | None = None  # same samples as ``load``, held leaner (uint8, normalised on read)


def _synthetic_n(spec: DataSpec, split: str) -> int:
    return spec.n if split == "train" else max(spec.n // 4, spec.classes)


def _synthetic_load(spec: DataSpec, split: str, indices):
    x, y = make_synthetic(_synthetic_n(spec, split), spec.shape, spec.classes, split)
    return (x, y) if indices is None else (x[indices], y[indices])


def _cifar_classes(spec: DataSpec) -> int:
    counts = cifar.FORMATS[spec.name].num_classes  # first kind is the default label
    return counts[spec.label] if spec.label else next(iter(counts.values()))


SOURCES: dict[str, ImageSource] = {
    "fashion-mnist": ImageSource(
        labels=lambda s, split: fashion_mnist.read_labels(split, s.path),
        load=lambda s, split, idx: fashion_mnist.load_fashion_mnist(split, s.path, idx),
        num_classes=lambda s: fashion_mnist.NUM_CLASSES,
        input_shape=lambda s: fashion_mnist.INPUT_SHAPE,
        dataset=lambda s, split, idx: fashion_mnist.fashion_mnist_dataset(split, s.path, idx),
    ),
    "cifar10": ImageSource(
        labels=lambda s, split: cifar.read_cifar_labels(s.name, split, s.path, s.label),
        load=lambda s, split, idx: cifar.load_cifar(s.name, split, s.path, idx, s.label),
        num_classes=_cifar_classes,
        input_shape=lambda s: cifar.INPUT_SHAPE,
    ),
    "synthetic": ImageSource(
        labels=lambda s, split: _synthetic_load(s, split, None)[1].numpy(),
        load=_synthetic_load,
        num_classes=lambda s: s.classes,
        input_shape=lambda s: tuple(s.shape),
    ),
}
SOURCES["cifar100"] = SOURCES["cifar10"]


def _source(spec: DataSpec) -> ImageSource:
    return SOURCES[spec.name]


def _dataset(source: ImageSource, spec: DataSpec, split: str, idx) -> TensorDataset:
    if source.dataset is not None:
        return source.dataset(spec, split, idx)
    return TensorDataset(*source.load(spec, split, idx))


def _labels_of(ds: TensorDataset) -> torch.Tensor:
    return ds.labels if isinstance(ds, NormalisedImages) else ds.tensors[1]


def _shard(spec: DataSpec, labels: np.ndarray) -> np.ndarray:
    """Client ``spec.index``'s rows of the train split: partitioned over what ``val`` leaves."""
    if spec.val is None:
        return partition(labels, spec.partition, spec.clients, spec.index, spec.seed)
    fit, _ = validation_split(len(labels), spec.val, spec.seed)
    return fit[partition(labels[fit], spec.partition, spec.clients, spec.index, spec.seed)]


def client_indices(spec: DataSpec | str) -> np.ndarray:
    """Client ``spec.index``'s train indices (before ``limit``), from the train labels alone."""
    spec = as_spec(spec)
    return _shard(spec, _source(spec).labels(spec, "train"))


def validation_indices(spec: DataSpec | str) -> np.ndarray:
    """The train-split rows ``val=FRAC`` holds out (before ``limit``); disjoint from every shard."""
    spec = as_spec(spec)
    if spec.val is None:
        raise ValueError("validation_indices needs a data spec with val=FRAC")
    n = len(_source(spec).labels(spec, "train"))
    return validation_split(n, spec.val, spec.seed)[1]


def _client_info(spec: DataSpec, num_samples: int, num_classes: int, input_shape: tuple, **extra) -> dict:
    return {"name": spec.name, "spec": str(spec), "client": spec.index, "clients": spec.clients,
            "partition": spec.partition, "seed": spec.seed, "num_samples": num_samples,
            "num_classes": num_classes, "input_shape": input_shape, **extra}


def load_client_data(spec: DataSpec | str) -> tuple[TensorDataset, dict]:
    """Client ``spec.index``'s train shard and an info dict (sizes, classes, shapes, spec)."""
    spec = as_spec(spec)
    if spec.name == "shakespeare":
        return _shakespeare_client(spec)
    source = _source(spec)
    idx = _cap(client_indices(spec), spec.limit, spec.seed, spec.index)
    ds = _dataset(source, spec, "train", idx)
    y = _labels_of(ds)
    num_classes = source.num_classes(spec)
    info = _client_info(spec, len(y), num_classes, tuple(source.input_shape(spec)),
                        class_counts=np.bincount(y.numpy(), minlength=num_classes).tolist())
    log.info("client %d/%d: %d %s samples (%s)", spec.index, spec.clients, len(y), spec.name,
             spec.partition)
    return ds, info


def load_test_data(spec: DataSpec | str) -> TensorDataset:
    """The full test split (capped by ``limit``), for the server's global evaluation; with
    ``split=val`` the validation rows held out of the train split instead."""
    spec = as_spec(spec)
    split = "val" if spec.split == "val" else "test"
    if spec.name == "shakespeare":
        x, y, _ = shakespeare.load_shakespeare(split, spec.path, limit=spec.limit, seed=spec.seed,
                                               val_fraction=spec.val or 0.0)
        return TensorDataset(x, y)
    source = _source(spec)
    if split == "val":
        idx = _cap(validation_indices(spec), spec.limit, spec.seed, _TEST_TAG)
        return _dataset(source, spec, "train", idx)
    idx = None
    if spec.limit is not None:
        n = len(source.labels(spec, "test"))
        idx = _cap(np.arange(n), spec.limit, spec.seed, _TEST_TAG)
    return _dataset(source, spec, "test", idx)


def load_client_test(spec: DataSpec | str) -> TensorDataset:
    """Client ``spec.index``'s personalised test split (pFedPara local evaluation)."""
    spec = as_spec(spec)
    if spec.name == "shakespeare":
        roles = _shakespeare_roles(spec)
        x, y, _ = shakespeare.load_shakespeare("test", spec.path, roles=roles,
                                               limit=spec.limit, seed=spec.seed)
        return TensorDataset(x, y)
    source = _source(spec)
    train_labels = source.labels(spec, "train")
    test_labels = source.labels(spec, "test")
    shard = _shard(spec, train_labels)
    size = spec.test_size or max(len(test_labels) // spec.clients, 1)
    if spec.limit is not None:
        size = min(size, spec.limit)
    idx = local_test_indices(train_labels[shard], test_labels, seed=spec.seed,
                             index=spec.index, size=size)
    return _dataset(source, spec, "test", idx)


def _shakespeare_roles(spec: DataSpec) -> list[str]:
    roles = shakespeare.eligible_roles(spec.path, min_samples=2)
    return shakespeare.assign_roles(roles, spec.clients, spec.index, spec.seed)


def _shakespeare_client(spec: DataSpec) -> tuple[TensorDataset, dict]:
    roles = _shakespeare_roles(spec)
    x, y, used = shakespeare.load_shakespeare("train", spec.path, roles=roles, limit=spec.limit,
                                              seed=spec.seed, val_fraction=spec.val or 0.0)
    info = _client_info(spec, len(y), shakespeare.VOCAB_SIZE, (shakespeare.SEQ_LEN,),
                        vocab_size=shakespeare.VOCAB_SIZE, seq_len=shakespeare.SEQ_LEN, roles=used)
    log.info("client %d/%d: %d shakespeare windows from %d roles", spec.index, spec.clients,
             len(y), len(used))
    return TensorDataset(x, y), info
