"""Helpers shared by the wire tests: build valid envelopes and rewrite them (re-signed)."""

import hashlib
import json
import struct

import torch

from fedpara.wire import Message, encode
from fedpara.wire.envelope import PREFIX_BYTES
from fedpara.wire.limits import FLAG_BLAKE3
from fedpara.wire.digest import new_hash

_PREFIX = struct.Struct("<4sBBBBIQ32s")


def sample_messages():
    """A handful of small valid envelopes over kinds and codecs."""
    g = torch.Generator().manual_seed(0)
    t = {"l.x1": torch.randn(8, 3, generator=g), "l.y1": torch.randn(20, 3, generator=g),
         "l.t1": torch.randn(3, 3, 3, 3, generator=g), "l.bias": torch.randn(8, generator=g),
         "steps": torch.tensor(17), "mask": torch.tensor([True, False, True])}
    out = []
    for kind, policy in [("task", "fp32"), ("update", "fp16+zstd:3; *.bias=fp32"),
                         ("update", "int8+sr"), ("update", "bf16+zstd:1"), ("task", "raw+zstd:2")]:
        msg = Message(kind, "run-1", 4, "client-7", t, {"num_examples": 120, "metrics": {"loss": 0.5}})
        out.append(encode(msg, policy, generator=g).data)
    out.append(encode(Message("status", "run-1", 0, "client-7", {}, {"alive": True})).data)
    out.append(encode(Message("control", "run-1", 9, "coord", {}, {"stop": True})).data)
    return out


def resign(data: bytes) -> bytes:
    """Fix the length fields (as far as the buffer allows) and the digest after a mutation."""
    data = bytearray(data)
    if len(data) < PREFIX_BYTES:
        return bytes(data)
    hlen = struct.unpack_from("<I", data, 8)[0]
    body = max(0, len(data) - PREFIX_BYTES - hlen)
    struct.pack_into("<Q", data, 12, body)
    digest = hashlib.sha256(bytes(data[:20]) + bytes(data[PREFIX_BYTES:])).digest()
    data[20:PREFIX_BYTES] = digest
    return bytes(data)


def split_envelope(data: bytes):
    """(prefix fields, header dict, body bytes)."""
    fields = _PREFIX.unpack_from(data)
    hlen = fields[5]
    header = json.loads(data[PREFIX_BYTES:PREFIX_BYTES + hlen])
    return fields, header, data[PREFIX_BYTES + hlen:]


def rebuild(data: bytes, header=None, body=None, **prefix) -> bytes:
    """Re-assemble an envelope with a replaced header/body/prefix fields, correctly signed."""
    (magic, major, minor, kind, flags, _, _, _), old_header, old_body = split_envelope(data)
    header = old_header if header is None else header
    body = old_body if body is None else body
    head = json.dumps(header, separators=(",", ":")).encode()
    vals = dict(magic=magic, major=major, minor=minor, kind=kind, flags=flags)
    vals.update(prefix)
    signed = _PREFIX.pack(vals["magic"], vals["major"], vals["minor"], vals["kind"], vals["flags"],
                          len(head), len(body), b"")[:20]
    if vals["flags"] & FLAG_BLAKE3 and not vals["flags"] & ~FLAG_BLAKE3:  # a BLAKE3 envelope (wire.md 3b)
        digest = new_hash(FLAG_BLAKE3, signed + head + body).digest()
    else:  # SHA-256, also for reserved flag bits (the decoder refuses those before the digest)
        digest = hashlib.sha256(signed + head + body).digest()
    return signed + digest + head + body
