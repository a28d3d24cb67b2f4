"""Shared test helpers for the data readers (no fixtures: conftest.py holds those)."""
import pytest

from fedpara.data import fashion_mnist


def debian_fashion_mnist_installed() -> bool:
    """Whether Debian's ``dataset-fashion-mnist`` files are in their directory (not $FEDPARA_DATA)."""
    try:
        fashion_mnist.find_fashion_mnist(fashion_mnist.DEBIAN_DIR)
    except FileNotFoundError:
        return False
    return True


needs_debian_fmnist = pytest.mark.skipif(not debian_fashion_mnist_installed(),
                                         reason="dataset-fashion-mnist not installed")
