"""The data a browser client trains on when the coordinator bundles it (the demo, the tests): one
file per client, ``fedpara-web-data/1``, read by ``client/data.js``::

    b"FPWD" | u32 header length | JSON header (spaces pad the data to a multiple of 4) |
    train inputs | test inputs | train labels (u8) | test labels (u8)

Inputs are the uint8 pixels when the dataset keeps them (Fashion-MNIST: the browser normalises
them with the same float32 table, ``fedpara.data.fashion_mnist.PIXEL_LUT``), else float32 model inputs.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

MAGIC = b"FPWD"


def _arrays(ds) -> tuple[np.ndarray, np.ndarray, str]:
    if hasattr(ds, "images") and hasattr(ds, "lut"):  # fedpara.data's NormalisedImages: uint8 + a table
        from fedpara.data.fashion_mnist import PIXEL_LUT
        if not np.array_equal(ds.lut, PIXEL_LUT):
            raise ValueError("the browser normalises pixels with Fashion-MNIST's table only")
        return np.ascontiguousarray(ds.images, dtype=np.uint8), ds.labels.numpy(), "u8"
    x, y = ds.tensors
    return np.ascontiguousarray(x.numpy(), dtype="<f4"), y.numpy(), "f32"


def client_bundle(spec_text: str, *, test: bool = True) -> bytes:
    """The bundle of a client data spec (e.g. ``fashion-mnist,partition=iid,clients=3,index=2``):
    its train shard and, with ``test``, its local test split."""
    from fedpara.data import load_client_data, load_client_test, parse_data_spec
    spec = parse_data_spec(spec_text)
    train, info = load_client_data(spec)
    x, y, enc = _arrays(train)
    if tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"the browser client trains on 1x28x28 images; {spec_text} has {tuple(x.shape[1:])}")
    tx, ty = (x[:0], y[:0]) if not test else _arrays(load_client_test(spec))[:2]
    if y.max(initial=0) > 255 or ty.max(initial=0) > 255:
        raise ValueError("labels must fit a byte")
    header = {"format": "fedpara-web-data/1", "encoding": enc, "shape": [1, 28, 28], "train": int(len(y)),
              "test": int(len(ty)), "spec": spec_text, "num_classes": int(info.get("num_classes", 10))}
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % 4)
    parts = [MAGIC, struct.pack("<I", len(head)), head, x.tobytes(), np.asarray(tx, dtype=x.dtype).tobytes(),
             y.astype(np.uint8).tobytes(), np.asarray(ty).astype(np.uint8).tobytes()]
    return b"".join(parts)


def write_bundle(spec_text: str, path: str | Path, *, test: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(client_bundle(spec_text, test=test))
    return path
