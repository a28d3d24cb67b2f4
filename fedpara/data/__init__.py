"""Local datasets and federated partitions: Fashion-MNIST (IDX), CIFAR-10/100 (binary),
Shakespeare (per-role characters), synthetic; iid / Dirichlet / shard splits; the ``--data`` spec.

Typical use on a device::

    from fedpara.data import parse_data_spec, load_client_data
    train, info = load_client_data(parse_data_spec("fashion-mnist,partition=dirichlet:0.5,"
                                                   "clients=10,index=3,seed=0"))

Names are imported lazily (PEP 562): the spec parser (:mod:`.spec`), the partitions
(:mod:`.partition`), the row selection (:mod:`.rows`), the IDX reader (:mod:`.idx`) and the
Fashion-MNIST files (:mod:`.fashion_mnist`) need numpy only; the loaders, CIFAR, Shakespeare and
synthetic data build torch tensors. ``fedpara.data.partition`` is the module (its function is
``fedpara.data.partition.partition``): a lazy package cannot give a submodule's name to a function.
"""
from __future__ import annotations

from ..lazy_exports import lazy_exports

_NAMES = {
    "load_cifar": "cifar", "read_cifar_bin": "cifar",
    "find_fashion_mnist": "fashion_mnist", "load_fashion_mnist": "fashion_mnist",
    "parse_idx": "idx", "read_idx": "idx", "write_idx": "idx",
    "client_indices": "loaders", "load_client_data": "loaders", "load_client_test": "loaders",
    "load_rows": "loaders", "load_test_data": "loaders", "validation_indices": "loaders",
    "dirichlet": "partition", "iid": "partition", "local_test_indices": "partition",
    "parse_scheme": "partition", "seeded_subset": "partition",
    "shards": "partition", "validation_split": "partition",
    "VOCAB": "shakespeare", "VOCAB_SIZE": "shakespeare", "load_shakespeare": "shakespeare",
    "parse_play": "shakespeare",
    "DataSpec": "spec", "format_data_spec": "spec", "parse_data_spec": "spec",
    "make_synthetic": "synthetic",
}
_SUBMODULES = ("cifar", "fashion_mnist", "fetch", "idx", "loaders", "normalised_images", "partition", "rows",
               "shakespeare", "spec", "synthetic")

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _NAMES, _SUBMODULES)
