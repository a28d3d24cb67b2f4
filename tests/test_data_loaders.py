"""load_client_data / load_test_data / load_client_test over synthetic, written and real data."""

import numpy as np
import torch
from datahelp import needs_debian_fmnist
from torch.utils.data import TensorDataset

from fedpara.data import (
    load_client_data,
    load_client_test,
    load_test_data,
)
from fedpara.data.idx import write_idx
from fedpara.data.loaders import client_indices
from fedpara.data.spec import parse_data_spec

torch.set_num_threads(1)


def test_synthetic_clients_partition_the_train_split():
    base = "synthetic,n=200,shape=1x6x6,classes=5,clients=4,partition=dirichlet:0.5,seed=3"
    shards = [load_client_data(f"{base},index={i}") for i in range(4)]
    assert sum(len(ds) for ds, _ in shards) == 200
    for i, (ds, info) in enumerate(shards):
        assert isinstance(ds, TensorDataset)
        x, y = ds.tensors
        assert x.shape[1:] == (1, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert info["client"] == i and info["num_classes"] == 5 and info["input_shape"] == (1, 6, 6)
        assert info["num_samples"] == len(ds) and sum(info["class_counts"]) == len(ds)
        assert parse_data_spec(info["spec"]) == parse_data_spec(f"{base},index={i}")
    again, _ = load_client_data(f"{base},index=2")
    torch.testing.assert_close(again.tensors[0], shards[2][0].tensors[0])
    test = load_test_data(base)
    assert len(test) == 50 and test.tensors[0].shape[1:] == (1, 6, 6)


def test_synthetic_is_learnable_signal():
    ds, _ = load_client_data("synthetic,n=400,shape=8,classes=4")
    x, y = ds.tensors
    means = torch.stack([x[y == k].mean(0) for k in range(4)])
    pred = torch.cdist(x, means).argmin(1)
    assert (pred == y).float().mean() > 0.8


def test_limit_caps_every_loader():
    spec = "synthetic,n=300,shape=4,classes=3,clients=2,index=1,limit=20"
    train, info = load_client_data(spec)
    assert len(train) == 20 and info["num_samples"] == 20
    assert len(load_test_data(spec)) == 20
    assert len(load_client_test(spec)) <= 20
    assert len(load_client_data(spec)[0]) == 20


def test_client_test_matches_train_classes():
    spec = "synthetic,n=2000,shape=2,classes=10,clients=10,index=6,partition=shards:2,test_size=60"
    train, _ = load_client_data(spec)
    local = load_client_test(spec)
    train_classes = set(train.tensors[1].unique().tolist())
    assert set(local.tensors[1].unique().tolist()) <= train_classes
    assert 50 <= len(local) <= 60


def _fake_fmnist(directory, n_train=40, n_test=20):
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)


def test_fashion_mnist_spec_with_path_and_env(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path / "fashion-mnist")
    ds, info = load_client_data(f"fashion-mnist,path={tmp_path},clients=4,index=2")
    assert len(ds) == 10 and info["input_shape"] == (1, 28, 28)
    monkeypatch.setenv("FEDPARA_DATA", str(tmp_path))
    assert len(load_test_data("fashion-mnist")) == 20
    idx = client_indices("fashion-mnist,clients=4,index=2")
    assert ds.tensors[1].tolist() == (idx % 10).tolist()


def test_cifar10_spec(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    for i, name in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
        rows = np.zeros((4, 3073), dtype=np.uint8)
        rows[:, 0] = (np.arange(4) + i) % 10
        (root / name).write_bytes(rows.tobytes())
    ds, info = load_client_data(f"cifar10,path={tmp_path},clients=2,index=0,seed=1")
    assert len(ds) == 10 and info["num_classes"] == 10 and ds.tensors[0].shape[1:] == (3, 32, 32)


@needs_debian_fmnist
def test_real_fashion_mnist_clients(monkeypatch):
    monkeypatch.delenv("FEDPARA_DATA", raising=False)
    spec = "fashion-mnist,partition=dirichlet:0.5,clients=10,index=3,seed=0"
    ds, info = load_client_data(spec)
    assert info["num_samples"] >= 10 and ds.tensors[0].shape[1:] == (1, 28, 28)
    local = load_client_test(spec)
    assert 800 <= len(local) <= 1000
    assert len(load_test_data("fashion-mnist,limit=100")) == 100
