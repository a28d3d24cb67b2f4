"""The memory-lean Fashion-MNIST path (streamed IDX rows, uint8 storage, per-batch normalisation)
gives exactly what the eager path gave: same rows, same float32 values, same order and dtype."""

import gzip

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpara.data import (
    fashion_mnist,
    load_client_data,
    load_client_test,
    load_test_data,
)
from fedpara.data.idx import IdxFile, encode_idx, parse_idx, read_idx, write_idx
from fedpara.data.loaders import client_indices
from fedpara.data.normalised_images import NormalisedImages
from fedpara.data.partition import TEST_TAG, seeded_subset
from fedpara.data.spec import parse_data_spec

torch.set_num_threads(1)


def _eager(directory, split, indices=None):
    """The previous reader: whole gzip in memory, decompressed, indexed, converted to float32."""
    stem = fashion_mnist.SPLITS[split]
    images = parse_idx(gzip.decompress((directory / f"{stem}-images-idx3-ubyte.gz").read_bytes()))
    labels = parse_idx(gzip.decompress((directory / f"{stem}-labels-idx1-ubyte.gz").read_bytes()))
    if indices is not None:
        images, labels = images[indices], labels[indices]
    x = images.astype(np.float32)
    x /= 255.0
    x -= fashion_mnist.MEAN
    x /= fashion_mnist.STD
    return torch.from_numpy(x[:, None].copy()), torch.from_numpy(labels.astype(np.int64))


def _fake(directory, n_train=3000, n_test=500):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return directory


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory):
    """Fashion-MNIST itself when installed, else written files of the same layout."""
    try:
        return fashion_mnist.find_fashion_mnist()
    except FileNotFoundError:
        return _fake(tmp_path_factory.mktemp("fm"))


def test_lookup_table_equals_float_arithmetic_for_every_pixel_value():
    v = np.arange(256, dtype=np.uint8)
    x = v.astype(np.float32)
    x /= 255.0
    x -= fashion_mnist.MEAN
    x /= fashion_mnist.STD
    assert fashion_mnist.PIXEL_LUT.dtype == np.float32 and fashion_mnist.PIXEL_LUT.tobytes() == x.tobytes()


@pytest.mark.parametrize("spec", ["clients=10,index=0", "partition=dirichlet:0.5,clients=10,index=3,seed=0",
                                  "partition=shards:2,clients=5,index=4,seed=2,limit=500",
                                  "partition=iid,clients=3,index=2,seed=7"])
def test_lean_loaders_return_the_eager_tensors(fm_dir, spec):
    spec = f"fashion-mnist,path={fm_dir},{spec}"
    ds, info = load_client_data(spec)
    assert isinstance(ds, NormalisedImages) and isinstance(ds, TensorDataset)
    s = parse_data_spec(spec)
    idx = seeded_subset(client_indices(spec), s.limit, s.seed, s.index)
    ex, ey = _eager(fm_dir, "train", idx)
    x, y = ds.tensors
    assert x.dtype == torch.float32 and x.shape == ex.shape and torch.equal(x, ex) and torch.equal(y, ey)
    assert info["class_counts"] == np.bincount(ey.numpy(), minlength=10).tolist()
    # what the model sees: DataLoader batches in a seeded shuffled order, item by item too
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    batches = list(zip(DataLoader(ds, 64, shuffle=True, generator=g1),
                       DataLoader(TensorDataset(ex, ey), 64, shuffle=True, generator=g2)))
    assert len(batches) == (len(ds) + 63) // 64
    for (a, b), (c, d) in batches:
        assert a.dtype == c.dtype and a.shape == c.shape and torch.equal(a, c) and torch.equal(b, d)
    i = len(ds) // 2
    assert torch.equal(ds[i][0], ex[i]) and torch.equal(ds[i][1], ey[i]) and ds[i][1].dim() == 0
    local = load_client_test(spec)
    assert isinstance(local, NormalisedImages) and len(local) > 0


@pytest.mark.parametrize("limit", [None, 300])
def test_lean_test_split_and_infer_reader_match_eager(fm_dir, limit):
    spec = f"fashion-mnist,path={fm_dir}" + (f",limit={limit},seed=4" if limit else "")
    n = len(fashion_mnist.read_labels("test", fm_dir))
    idx = None if limit is None else seeded_subset(np.arange(n), limit, 4, TEST_TAG)
    ex, ey = _eager(fm_dir, "test", idx)
    x, y = load_test_data(spec).tensors
    assert torch.equal(x, ex) and torch.equal(y, ey)
    nx, ny = fashion_mnist.read_split("test", fm_dir, idx)
    assert nx.dtype == np.float32 and np.array_equal(nx, ex.numpy()) and np.array_equal(ny, ey.numpy())
    tx, _ = fashion_mnist.load_fashion_mnist("test", fm_dir, idx)
    assert torch.equal(tx, ex)


@pytest.mark.parametrize("compress", [True, False])
def test_streamed_rows_any_order_and_small_chunks(tmp_path, monkeypatch, compress):
    arr = np.arange(50 * 3 * 2, dtype=np.int32).reshape(50, 3, 2) - 7
    path = write_idx(tmp_path / ("a.gz" if compress else "a"), arr)
    monkeypatch.setattr(IdxFile, "CHUNK", 40)  # several rows per chunk, many chunks
    np.testing.assert_array_equal(read_idx(path), arr)
    idx = np.array([49, 0, 7, 7, 13, 12, -1])
    out = read_idx(path, idx)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr[idx])
    assert read_idx(path, np.array([], dtype=np.int64)).shape == (0, 3, 2)
    with pytest.raises(IndexError):
        read_idx(path, np.array([50]))


def test_streamed_reader_size_errors_and_multi_member_gzip(tmp_path):
    raw = encode_idx(np.zeros((3, 2, 2), dtype=np.uint8))
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(raw[:-1]))
    with pytest.raises(ValueError, match="need 12 data bytes, file has 11"):
        read_idx(short)
    long = tmp_path / "long"
    long.write_bytes(raw + b"\x00\x00")
    with pytest.raises(ValueError, match="need 12 data bytes, file has 14"):
        read_idx(long)
    multi = tmp_path / "multi.gz"
    arr = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    body = encode_idx(arr)
    multi.write_bytes(gzip.compress(body[:10]) + gzip.compress(body[10:]))
    np.testing.assert_array_equal(read_idx(multi), arr)
    np.testing.assert_array_equal(read_idx(multi, np.array([2, 0])), arr[[2, 0]])


def test_infer_raw_inputs_are_uint8_and_batches_match_the_float_path(fm_dir):
    from export.infer import load_inputs, load_raw_inputs
    spec = f"fashion-mnist,path={fm_dir},limit=200,seed=1"
    x, y, transform = load_raw_inputs(spec)
    assert x.dtype == np.uint8 and x.shape == (200, 1, 28, 28) and transform is not None
    fx, fy = load_inputs(spec)
    assert fx.dtype == np.float32 and np.array_equal(transform(x[13:77]), fx[13:77]) and np.array_equal(y, fy)
    # through fedpara.data (a split numpy alone does not serve): the dataset's uint8 pixels
    tx, ty, tt = load_raw_inputs(f"fashion-mnist,path={fm_dir},clients=4,index=1", split="train")
    assert tx.dtype == np.uint8
    ex, ey = load_client_data(f"fashion-mnist,path={fm_dir},clients=4,index=1")[0].tensors
    assert np.array_equal(tt(tx), ex.numpy()) and np.array_equal(ty, ey.numpy())
