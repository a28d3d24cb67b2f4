"""Local datasets and federated partitions: Fashion-MNIST (IDX), CIFAR-10/100 (binary),
Shakespeare (per-role characters), synthetic; iid / Dirichlet / shard splits; the ``--data`` spec.

Typical use on a device::

    from fedpara.data import parse_data_spec, load_client_data
    train, info = load_client_data(parse_data_spec("fashion-mnist,partition=dirichlet:0.5,"
                                                   "clients=10,index=3,seed=0"))
"""

from .cifar import load_cifar, read_cifar_bin
from .fashion_mnist import find_fashion_mnist, load_fashion_mnist
from .idx import parse_idx, read_idx, write_idx
from .loaders import (
                      client_indices,
                      load_client_data,
                      load_client_test,
                      load_test_data,
                      validation_indices,
)
from .partition import (
                        dirichlet,
                        iid,
                        local_test_indices,
                        parse_scheme,
                        partition,
                        shards,
                        validation_split,
)
from .shakespeare import VOCAB, VOCAB_SIZE, load_shakespeare, parse_play
from .spec import DataSpec, format_data_spec, parse_data_spec
from .synthetic import make_synthetic

__all__ = [
    "DataSpec", "VOCAB", "VOCAB_SIZE", "client_indices", "dirichlet", "find_fashion_mnist",
    "format_data_spec", "iid", "load_cifar", "load_client_data", "load_client_test",
    "load_fashion_mnist", "load_shakespeare", "load_test_data", "local_test_indices",
    "make_synthetic", "parse_data_spec", "parse_idx", "parse_play", "parse_scheme", "partition",
    "read_cifar_bin", "read_idx", "shards", "validation_indices", "validation_split", "write_idx",
]
