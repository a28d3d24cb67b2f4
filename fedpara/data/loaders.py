"""Entry points used by the CLI, the edge client and the coordinator.

- :func:`load_client_data` ``(spec) -> (TensorDataset, info)``: client ``spec.index``'s train shard.
- :func:`load_test_data` ``(spec) -> TensorDataset``: the full test split, for the server (with
  ``val=FRAC,split=val``: the validation rows held out of the train split instead).
- :func:`load_client_test` ``(spec) -> TensorDataset``: the client's personalised test split
  (pFedPara), same class distribution as its train shard (natural roles for Shakespeare).

A client computes its shard from the train *labels* alone (see :mod:`.partition`) and reads
only its own rows; which rows a spec names is decided in :mod:`.rows` (numpy only, shared with
``fedpara-infer``). Fashion-MNIST datasets keep those rows as uint8 and normalise each batch when
it is read (:class:`~fedpara.data.normalised_images.NormalisedImages`, a ``TensorDataset`` whose ``.tensors``
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

from . import cifar, fashion_mnist, rows, shakespeare
from .normalised_images import NormalisedImages
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
        dataset=lambda s, split, idx: fashion_mnist.fashion_mnist_dataset(split, s.path, idx),
    ),
    "cifar10": ImageSource(
        labels=lambda s, split: cifar.read_cifar_labels(s.name, split, s.path, s.label),
        load=lambda s, split, idx: cifar.load_cifar(s.name, split, s.path, idx, s.label),
        num_classes=_cifar_classes,
    ),
    "synthetic": ImageSource(
        labels=lambda s, split: _synthetic_load(s, split, None)[1].numpy(),
        load=_synthetic_load,
        num_classes=lambda s: s.classes,
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


def _labels(spec: DataSpec) -> rows.Labels:
    source = _source(spec)
    return lambda split: source.labels(spec, split)


def client_indices(spec: DataSpec | str) -> np.ndarray:
    """Client ``spec.index``'s train indices (before ``limit``), from the train labels alone."""
    spec = as_spec(spec)
    return rows.shard(spec, _source(spec).labels(spec, "train"))


def validation_indices(spec: DataSpec | str) -> np.ndarray:
    """The train-split rows ``val=FRAC`` holds out (before ``limit``); disjoint from every shard."""
    spec = as_spec(spec)
    if spec.val is None:
        raise ValueError("validation_indices needs a data spec with val=FRAC")
    return rows.held_out(spec, len(_source(spec).labels(spec, "train")))


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
    split, idx = rows.select(spec, "train", _labels(spec))
    ds = _dataset(source, spec, split, idx)
    y = _labels_of(ds)
    num_classes = source.num_classes(spec)
    info = _client_info(spec, len(y), num_classes, spec.input_shape,
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
    split, idx = rows.select(spec, "eval", _labels(spec))
    return _dataset(_source(spec), spec, split, idx)


def load_client_test(spec: DataSpec | str) -> TensorDataset:
    """Client ``spec.index``'s personalised test split (pFedPara local evaluation)."""
    spec = as_spec(spec)
    if spec.name == "shakespeare":
        roles = _shakespeare_roles(spec)
        x, y, _ = shakespeare.load_shakespeare("test", spec.path, roles=roles,
                                               limit=spec.limit, seed=spec.seed)
        return TensorDataset(x, y)
    split, idx = rows.select(spec, "local", _labels(spec))
    return _dataset(_source(spec), spec, split, idx)


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


def load_rows(spec: DataSpec | str, which: str) -> TensorDataset:
    """The dataset of a selection (``train`` | ``eval`` | ``local``, see :mod:`.rows`)."""
    loaders = {"train": lambda s: load_client_data(s)[0], "eval": load_test_data, "local": load_client_test}
    if which not in loaders:
        raise ValueError(f"which must be one of {', '.join(rows.WHICH)}, got {which!r}")
    return loaders[which](as_spec(spec))
