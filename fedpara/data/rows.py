"""Which rows of which split a data spec names, from the labels alone: numpy only.

The torch loaders (:mod:`.loaders`) and ``fedpara-infer`` (no torch) both select their samples
here, so a spec means the same rows on either side:

- ``train``: client ``spec.index``'s shard of the train split (partitioned over what ``val``
  leaves), capped by ``limit`` with the client's own RNG stream;
- ``eval``: the held-out test split (``split=test``) or the rows ``val=FRAC`` holds out of the
  train split (``split=val``), capped by ``limit`` with the test stream (``TEST_TAG``);
- ``local``: the client's personalised test rows (pFedPara / FedPer local evaluation), drawn from
  the test split with its shard's class distribution.

``labels(split)`` gives a split's labels (``"train"`` or ``"test"``); it is called only for the
splits a selection needs.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..schemes import PERSONALISED
from .partition import TEST_TAG, local_test_indices, partition, seeded_subset, validation_split
from .spec import DataSpec

Labels = Callable[[str], np.ndarray]
WHICH = ("train", "eval", "local")


def shard(spec: DataSpec, train_labels: np.ndarray) -> np.ndarray:
    """Client ``spec.index``'s rows of the train split (before ``limit``)."""
    if spec.val is None:
        return partition(train_labels, spec.partition, spec.clients, spec.index, spec.seed)
    fit, _ = validation_split(len(train_labels), spec.val, spec.seed)
    return fit[partition(train_labels[fit], spec.partition, spec.clients, spec.index, spec.seed)]


def held_out(spec: DataSpec, n_train: int) -> np.ndarray:
    """The train-split rows ``val=FRAC`` holds out (before ``limit``); disjoint from every shard."""
    if spec.val is None:
        raise ValueError("validation rows need a data spec with val=FRAC")
    return validation_split(n_train, spec.val, spec.seed)[1]


def select(spec: DataSpec, which: str, labels: Labels) -> tuple[str, np.ndarray | None]:
    """``(split file to read, row indices or None for all)`` for ``which`` in :data:`WHICH`."""
    if which == "train":
        return "train", seeded_subset(shard(spec, labels("train")), spec.limit, spec.seed, spec.index)
    if which == "eval":
        if spec.split == "val":
            rows = held_out(spec, len(labels("train")))
            return "train", seeded_subset(rows, spec.limit, spec.seed, TEST_TAG)
        if spec.limit is None:
            return "test", None
        return "test", seeded_subset(np.arange(len(labels("test"))), spec.limit, spec.seed, TEST_TAG)
    if which == "local":
        train_labels, test_labels = labels("train"), labels("test")
        size = spec.test_size or max(len(test_labels) // spec.clients, 1)
        if spec.limit is not None:
            size = min(size, spec.limit)
        return "test", local_test_indices(train_labels[shard(spec, train_labels)], test_labels,
                                          seed=spec.seed, index=spec.index, size=size)
    raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")


def which_for(split: str, scheme: str | None, spec: DataSpec) -> str:
    """The selection a command's ``--split`` names: ``train``, ``local``, ``test`` (the held-out
    split of ``eval``), or ``auto``: a personalised model's (pFedPara, FedPer) own local test rows
    when the spec has clients, else ``eval``."""
    if split == "train":
        return "train"
    if split == "local" or (split == "auto" and scheme in PERSONALISED and spec.clients > 1):
        return "local"
    if split in ("auto", "test"):
        return "eval"
    raise ValueError(f"split must be auto, test, local or train, got {split!r}")
