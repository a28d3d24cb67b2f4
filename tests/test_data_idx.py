"""IDX reader: round trips, strict header checks, and the real Fashion-MNIST when installed."""

import gzip
import time

import numpy as np
import pytest
import torch
from datahelp import needs_debian_fmnist

from fedpara.data import fashion_mnist
from fedpara.data.idx import encode_idx, parse_idx, read_idx, write_idx

torch.set_num_threads(1)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, dtype, compress):
    arr = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("a.gz" if compress else "a"), arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, arr)


def test_header_is_big_endian():
    raw = encode_idx(np.array([1, 256], dtype=np.int32))
    assert raw == bytes([0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 1, 0])


def _good() -> bytes:
    return encode_idx(np.zeros((3, 2, 2), dtype=np.uint8))


@pytest.mark.parametrize("raw, message", [
    (b"", "too short"),
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x00", "magic"),
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x00", "dtype code 0x07"),
    (b"\x00\x00\x08\x00", "ndim 0"),
    (b"\x00\x00\x08\x09" + b"\x00" * 36, "ndim 9"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x03", "truncated IDX header"),
    (_good()[:-1], "need 12 data bytes, file has 11"),
    (_good() + b"\x00", "need 12 data bytes, file has 13"),
    (b"\x00\x00\x08\x02\xff\xff\xff\xff\xff\xff\xff\xff", "above"),
])
def test_corrupt_headers_raise_value_error(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_idx(raw, name="bad.idx")


def test_error_names_the_file_and_corrupt_gzip(tmp_path):
    bad = tmp_path / "labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ValueError, match="labels-idx1-ubyte"):
        read_idx(bad)
    broken = tmp_path / "x.gz"
    broken.write_bytes(gzip.compress(_good())[:-6])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(broken)


def _fake_fmnist(directory, n_train=12, n_test=6, compress=True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n, dtype=np.uint8) % 10)
    return directory


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_written_files(tmp_path, compress):
    root = _fake_fmnist(tmp_path / "fm", compress=compress)
    x, y = fashion_mnist.load_fashion_mnist("train", root)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(12)]
    raw = read_idx(root / ("train-images-idx3-ubyte" + (".gz" if compress else "")))
    expect = (raw[5].astype(np.float32) / 255 - fashion_mnist.MEAN) / fashion_mnist.STD
    np.testing.assert_allclose(x[5, 0].numpy(), expect, rtol=1e-6, atol=1e-6)
    xs, ys = fashion_mnist.load_fashion_mnist("test", root, indices=np.array([4, 1]))
    assert xs.shape == (2, 1, 28, 28) and ys.tolist() == [4, 1]


def test_lookup_order(tmp_path, monkeypatch):
    env_root = tmp_path / "env"
    _fake_fmnist(env_root / "fashion-mnist")
    monkeypatch.setenv("FEDPARA_DATA", str(env_root))
    assert fashion_mnist.find_fashion_mnist() == env_root / "fashion-mnist"
    explicit = _fake_fmnist(tmp_path / "explicit")
    assert fashion_mnist.find_fashion_mnist(explicit) == explicit
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.find_fashion_mnist(tmp_path / "nowhere")


def test_missing_dataset_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPARA_DATA", str(tmp_path))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="FEDPARA_DATA"):
        fashion_mnist.load_fashion_mnist("train")


def test_bad_labels_file_is_value_error(tmp_path):
    root = _fake_fmnist(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(11, dtype=np.uint8))  # 12 images
    with pytest.raises(ValueError, match="labels"):
        fashion_mnist.load_fashion_mnist("train", root)


real = needs_debian_fmnist


@real
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("FEDPARA_DATA", raising=False)
    start = time.perf_counter()
    x, y = fashion_mnist.load_fashion_mnist("train")
    elapsed = time.perf_counter() - start
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == list(range(10))
    assert abs(x.mean().item()) < 1e-2 and abs(x.std().item() - 1) < 1e-2  # documented constants
    xt, yt = fashion_mnist.load_fashion_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and np.bincount(yt.numpy()).tolist() == [1000] * 10
    assert elapsed < 10, f"loading 60k took {elapsed:.1f}s"
