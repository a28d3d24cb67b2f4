"""The tensor container: a plain safetensors file (github.com/huggingface/safetensors, format
spec in its README), written and validated here so that an untrusted header is checked field by
field before any array is touched. No pickle is involved anywhere.

Layout: u64 little-endian header length N, N bytes of JSON
``{name: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}}`` padded with spaces to a
multiple of 8, then the data. Tensors are laid out by descending item size so every array is
aligned. The output loads with ``safetensors.torch.load`` (tested).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Mapping, Sequence

import numpy as np
import torch

from .limits import WireError

#: safetensors dtype code -> (numpy storage dtype, torch dtype). BF16 is stored as uint16 in
#: numpy (numpy has no bfloat16) and reinterpreted as torch.bfloat16 on the way out.
ST_DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "F64": (np.dtype("<f8"), torch.float64),
    "F32": (np.dtype("<f4"), torch.float32),
    "F16": (np.dtype("<f2"), torch.float16),
    "BF16": (np.dtype("<u2"), torch.bfloat16),
    "I64": (np.dtype("<i8"), torch.int64),
    "I32": (np.dtype("<i4"), torch.int32),
    "I16": (np.dtype("<i2"), torch.int16),
    "I8": (np.dtype("i1"), torch.int8),
    "U64": (np.dtype("<u8"), torch.uint64),
    "U32": (np.dtype("<u4"), torch.uint32),
    "U16": (np.dtype("<u2"), torch.uint16),
    "U8": (np.dtype("u1"), torch.uint8),
    "BOOL": (np.dtype("?"), torch.bool),
}
#: torch dtype name (as carried in the manifest) -> safetensors code.
TORCH_NAMES: dict[str, str] = {str(t).removeprefix("torch."): code for code, (_, t) in ST_DTYPES.items()}
#: torch dtype -> safetensors code.
FROM_TORCH: dict[torch.dtype, str] = {t: code for code, (_, t) in ST_DTYPES.items()}

_U64 = struct.Struct("<Q")

Entry = tuple[str, str, Sequence[int], np.ndarray]  # name, st dtype, shape, array


def itemsize(code: str) -> int:
    return ST_DTYPES[code][0].itemsize


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy when possible) of a CPU tensor's storage; bf16 as uint16."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def data_size(entries: Sequence[tuple[str, Sequence[int]]]) -> int:
    """Bytes of tensor data for (st dtype, shape) pairs."""
    return sum(itemsize(code) * math.prod(shape) for code, shape in entries)


class Layout:
    """Where :func:`write_into` puts each entry: the padded JSON header, each entry's data span
    (in data order) and the total size. Computed from shapes only; nothing is copied."""

    __slots__ = ("head", "spans", "size")

    def __init__(self, entries: Sequence[Entry]) -> None:
        order = sorted(range(len(entries)), key=lambda i: -itemsize(entries[i][1]))  # stable
        header: dict[str, dict] = {}
        spans, offset = [], 0
        for i in order:
            name, code, shape, arr = entries[i]
            n = arr.nbytes
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
            spans.append((i, offset, offset + n))
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        self.head = head + b" " * (-len(head) % 8)
        self.spans = spans
        self.size = _U64.size + len(self.head) + offset


def write_into(out: bytearray | memoryview, at: int, layout: Layout, entries: Sequence[Entry],
               written=None) -> None:
    """Serialise entries at ``out[at:at + layout.size]``: one copy of each array, no other buffer.
    ``written(end)``, if given, is called as the bytes before offset ``end`` of ``out`` are final."""
    _U64.pack_into(out, at, len(layout.head))
    base = at + _U64.size + len(layout.head)
    out[at + _U64.size:base] = layout.head
    dst = np.frombuffer(out, dtype=np.uint8)
    for i, begin, end in layout.spans:
        if end > begin:
            dst[base + begin:base + end] = np.ascontiguousarray(entries[i][3]).reshape(-1).view(np.uint8)
            if written is not None:
                written(base + end)
    del dst  # release the export: the caller's bytearray may be resized again


def write(entries: Sequence[Entry]) -> bytearray:
    """Serialise entries into one safetensors buffer (one copy of each array)."""
    layout = Layout(entries)
    out = bytearray(layout.size)
    write_into(out, 0, layout, entries)
    return out


def read(
    buf: memoryview,
    expected: Mapping[str, tuple[str, tuple[int, ...]]],
    *,
    max_header: int,
    where: str = "body",
) -> dict[str, np.ndarray]:
    """Parse a safetensors buffer holding exactly the expected {name: (dtype, shape)} tensors.

    Returns read-only numpy views into buf. Any disagreement with `expected` (names, dtypes,
    shapes, offsets that overlap, leave holes or run past the end) is a WireError.
    """
    if len(buf) < _U64.size:
        raise WireError(f"{where}: safetensors buffer too short ({len(buf)} bytes)")
    (hlen,) = _U64.unpack_from(buf, 0)
    if hlen > max_header or hlen > len(buf) - _U64.size:
        raise WireError(f"{where}: safetensors header length {hlen} exceeds the limit or buffer")
    try:
        header = json.loads(bytes(buf[_U64.size:_U64.size + hlen]))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise WireError(f"{where}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise WireError(f"{where}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if header.keys() != expected.keys():
        missing = sorted(expected.keys() - header.keys())[:3]
        extra = sorted(header.keys() - expected.keys())[:3]
        raise WireError(f"{where}: safetensors tensors disagree with the manifest "
                        f"(missing {missing}, unexpected {extra})")
    data = buf[_U64.size + hlen:]
    spans = []
    for name, info in header.items():
        code, shape = expected[name]
        if not isinstance(info, dict):
            raise WireError(f"{where}: tensor {name!r}: header entry is not an object")
        if info.get("dtype") != code or info.get("shape") != list(shape):
            raise WireError(f"{where}: tensor {name!r}: safetensors says {info.get('dtype')} "
                            f"{info.get('shape')}, manifest expects {code} {list(shape)}")
        offs = info.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs)):
            raise WireError(f"{where}: tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        if not 0 <= begin <= end <= len(data) or end - begin != itemsize(code) * math.prod(shape):
            raise WireError(f"{where}: tensor {name!r}: data_offsets {offs} do not match its "
                            f"size or the buffer ({len(data)} bytes)")
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise WireError(f"{where}: tensor {name!r}: data overlaps or leaves a gap at {pos}")
        pos = end
    if pos != len(data):
        raise WireError(f"{where}: {len(data) - pos} trailing bytes after the tensor data")
    out = {}
    for begin, end, name in spans:
        code, shape = expected[name]
        dt = ST_DTYPES[code][0]
        out[name] = np.frombuffer(data, dtype=dt, count=(end - begin) // dt.itemsize,
                                  offset=begin).reshape(shape)
    return out
