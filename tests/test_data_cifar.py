"""CIFAR-10/100 binary loaders on tiny files the test writes."""

import numpy as np
import pytest
import torch

from fedpara.data import cifar

torch.set_num_threads(1)


def _records(labels: np.ndarray, n: int, seed: int) -> tuple[bytes, np.ndarray]:
    images = np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    rows = np.concatenate([labels.reshape(n, -1).astype(np.uint8), images.reshape(n, -1)], axis=1)
    return rows.tobytes(), images


def _write_cifar10(directory, per_batch=3):
    directory.mkdir(parents=True)
    images, labels = [], []
    for i, name in enumerate(cifar.CIFAR10.train_files + cifar.CIFAR10.test_files):
        lab = (np.arange(per_batch) + i) % 10
        raw, img = _records(lab, per_batch, seed=i)
        (directory / name).write_bytes(raw)
        images.append(img)
        labels.append(lab)
    return images, labels


def test_cifar10_binary(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    images, labels = _write_cifar10(root)
    x, y = cifar.load_cifar("cifar10", "train", tmp_path)  # parent dir works too
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == np.concatenate(labels[:5]).tolist()
    mean = torch.tensor(cifar.CIFAR10.mean).view(3, 1, 1)
    std = torch.tensor(cifar.CIFAR10.std).view(3, 1, 1)
    # sample 4 is batch 2 (index 1), row 1; channel order R, G, B kept.
    expect = (torch.from_numpy(images[1][1]).float() / 255 - mean) / std
    torch.testing.assert_close(x[4], expect)
    xt, yt = cifar.load_cifar("cifar10", "test", root, indices=np.array([2, 0]))
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == [labels[5][2], labels[5][0]]


@pytest.mark.parametrize("label, column, classes", [(None, 1, 100), ("fine", 1, 100),
                                                    ("coarse", 0, 20)])
def test_cifar100_two_label_bytes(tmp_path, label, column, classes):
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    lab = np.stack([np.array([3, 19, 0, 7]), np.array([42, 99, 0, 5])], axis=1)  # coarse, fine
    for name in ("train.bin", "test.bin"):
        (root / name).write_bytes(_records(lab, 4, seed=1)[0])
    x, y = cifar.load_cifar("cifar100", "train", root, label=label)
    assert x.shape == (4, 3, 32, 32)
    assert y.tolist() == lab[:, column].tolist() and int(y.max()) < classes
    assert cifar.read_cifar_labels("cifar100", "test", root, label).tolist() == y.tolist()


def test_truncated_file_and_bad_label(tmp_path):
    root = tmp_path / "c10"
    _write_cifar10(root)
    path = root / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="3073-byte CIFAR record"):
        cifar.load_cifar("cifar10", "test", root)
    path.write_bytes(_records(np.array([10]), 1, seed=0)[0])
    with pytest.raises(ValueError, match="label 10 out of range"):
        cifar.load_cifar("cifar10", "test", root)


def test_missing_and_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDPARA_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="binary"):
        cifar.load_cifar("cifar10", "train", tmp_path)
    with pytest.raises(ValueError, match="cifar42"):
        cifar.load_cifar("cifar42", "train", tmp_path)
    root = tmp_path / "cifar-10-batches-bin"
    _write_cifar10(root)
    monkeypatch.setenv("FEDPARA_DATA", str(tmp_path))
    assert cifar.find_cifar(cifar.CIFAR10) == root
