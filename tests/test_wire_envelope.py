"""Envelope: round trips, version/kind/codec rejection, integrity, limits, decompression bombs."""

import json
import resource
import struct
import threading

import pytest
import torch
import zstandard
from wire_support import rebuild, sample_messages, split_envelope

from fedpara.wire.digest import EnvelopeHasher
from fedpara.wire import Limits, Message, MessageKind, WireError, decode, encode
from fedpara.wire.envelope import PREFIX_BYTES

torch.set_num_threads(1)


def test_roundtrip_all_fields_and_kinds():
    for kind in MessageKind:
        t = {"w": torch.randn(4, 5), "n": torch.tensor([1, 2], dtype=torch.int32)}
        meta = {"num_examples": 600, "metrics": {"loss": 0.25, "acc": [0.5, 0.75]}, "cfg": {"lr": 0.1}}
        out = decode(encode(Message(kind, "run-é", 12, "client/3", t, meta)).data)
        assert (out.kind, out.run_id, out.round, out.sender, out.meta) == (kind, "run-é", 12, "client/3", meta)
        assert torch.equal(out.tensors["w"], t["w"]) and torch.equal(out.tensors["n"], t["n"])
        assert isinstance(out.kind, MessageKind) and out.kind == kind.value


def test_stats_account_bytes():
    t = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    enc = encode(Message("update", tensors=t), "fp16; b=fp32")
    s = enc.stats
    assert s.raw_bytes == (64 * 64 + 64) * 4
    assert s.tensor_bytes == 64 * 64 * 2 + 64 * 4
    assert s.payload_bytes == len(enc.data)
    assert s.tensors["w"].codec == "fp16" and s.tensors["b"].encoded_bytes == 256
    assert s.header_bytes < 400 and s.payload_bytes - s.tensor_bytes < 600


def test_unknown_major_version_kind_flags_are_rejected():
    data = encode(Message("update", tensors={"w": torch.ones(2)})).data
    with pytest.raises(WireError, match=r"unsupported wire version 2\.0"):
        decode(rebuild(data, major=2))
    with pytest.raises(WireError, match="unknown message kind code 9"):
        decode(rebuild(data, kind=9))
    for reserved in (0x02, 0x80, 0x03):  # bit 0 is BLAKE3 (test_digest.py); the others are reserved
        with pytest.raises(WireError, match="unknown flags"):
            decode(rebuild(data, flags=reserved))
    assert torch.equal(decode(rebuild(data, flags=1)).tensors["w"], torch.ones(2))  # a BLAKE3 digest
    with pytest.raises(WireError, match="magic"):
        decode(b"XXXX" + data[4:])
    out = decode(rebuild(data, minor=7))  # newer minor: accepted, unknown keys ignored
    assert torch.equal(out.tensors["w"], torch.ones(2))
    _, header, _ = split_envelope(data)
    assert decode(rebuild(data, header={**header, "future_key": [1, 2]})).round == 0


def test_unknown_codec_is_rejected():
    data = encode(Message("update", tensors={"w": torch.ones(2)})).data
    _, header, _ = split_envelope(data)
    header["tensors"][0][3] = "fp12"
    with pytest.raises(WireError, match="unknown codec 'fp12'"):
        decode(rebuild(data, header=header))


def test_digest_and_truncation():
    data = encode(Message("update", tensors={"w": torch.randn(100)})).data
    bad = bytearray(data)
    bad[-5] ^= 1
    with pytest.raises(WireError, match="sha256"):
        decode(bytes(bad))
    with pytest.raises(WireError, match="length mismatch"):
        decode(data[:-1])
    with pytest.raises(WireError, match="too short"):
        decode(data[:10])
    with pytest.raises(WireError, match="expects bytes"):
        decode("not bytes")


def test_nonfinite_rejected_by_default_and_optional():
    data = encode(Message("update", tensors={"w": torch.tensor([1.0, float("nan")])})).data
    with pytest.raises(WireError, match="'w' contains NaN or Inf"):
        decode(data)
    assert torch.isnan(decode(data, Limits(reject_nonfinite=False)).tensors["w"][1])


@pytest.mark.parametrize("limits, match", [
    (Limits(max_tensors=2), "at most 2"),
    (Limits(max_elements=99), "max_elements"),
    (Limits(max_ndim=1), "at most 1 dims"),
    (Limits(max_decoded_bytes=800), "max_decoded_bytes"),
    (Limits(max_message_bytes=500), "max_message_bytes"),
    (Limits(max_meta_bytes=50), "max_meta_bytes"),
    (Limits(max_name_len=3), "name"),
])
def test_each_limit_is_enforced(limits, match):
    t = {"a.x1": torch.randn(10, 10), "a.y1": torch.randn(10, 10), "bias": torch.randn(3)}
    data = encode(Message("update", "r", 1, "s", t)).data
    decode(data)  # fine under defaults
    with pytest.raises(WireError, match=match):
        decode(data, limits)


def test_declared_huge_shape_rejected_before_allocation():
    data = encode(Message("update", tensors={"w": torch.ones(4)})).data
    _, header, _ = split_envelope(data)
    header["tensors"][0][2] = [1 << 40, 1 << 40]
    with pytest.raises(WireError, match="max_elements"):
        decode(rebuild(data, header=header))
    header["tensors"][0][2] = [-4]
    with pytest.raises(WireError, match="dimension"):
        decode(rebuild(data, header=header))
    header["tensors"][0][2] = [True]
    with pytest.raises(WireError, match="dimension"):
        decode(rebuild(data, header=header))


def _bomb(n: int, declared: int) -> bytes:
    """An envelope whose single zstd section inflates to a safetensors blob of n zero bytes,
    while its manifest declares a uint8 tensor of `declared` elements."""
    head = json.dumps({"x": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    head += b" " * (-len(head) % 8)
    raw_len = 8 + len(head) + n
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=raw_len)
    parts = [cobj.compress(struct.pack("<Q", len(head)) + head)]
    zeros = bytes(1 << 20)
    for _ in range(n >> 20):
        parts.append(cobj.compress(zeros))
    parts.append(cobj.flush())
    body = b"".join(parts)
    template = encode(Message("update", tensors={"x": torch.zeros(1, dtype=torch.uint8)}), "raw+zstd:1").data
    _, header, _ = split_envelope(template)
    dec_raw = 8 + len(head) + declared
    header["sections"] = [[1, dec_raw, len(body)]]
    header["tensors"][0][2] = [declared]
    return rebuild(template, header=header, body=body)


def test_decompression_bomb_rejected_before_decompressing():
    n = 256 << 20  # 256 MiB of zeros -> ~8 KiB compressed
    honest = _bomb(n, n)
    assert len(honest) < 100_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(WireError, match="max_decoded_bytes"):
        decode(honest, Limits(max_decoded_bytes=16 << 20))
    lying = _bomb(n, 1000)  # manifest says 1000 bytes, the zstd frame would inflate to 256 MiB
    with pytest.raises(WireError, match="zstd frame declares"):
        decode(lying)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown_kib < 64 << 10  # nothing near 256 MiB was allocated


def test_zstd_frame_without_content_size_rejected():
    data = encode(Message("update", tensors={"w": torch.randn(50)}), "fp32+zstd:1").data
    _, header, body = split_envelope(data)
    raw = zstandard.ZstdDecompressor().decompress(body)
    body2 = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(raw)
    header["sections"][0][2] = len(body2)
    with pytest.raises(WireError, match="zstd frame declares"):
        decode(rebuild(data, header=header, body=body2))


def test_manifest_and_safetensors_must_agree():
    data = encode(Message("update", tensors={"w": torch.randn(2, 3)})).data
    _, header, body = split_envelope(data)
    hlen = struct.unpack_from("<Q", body)[0]
    inner = json.loads(body[8:8 + hlen])
    inner["w"]["shape"] = [3, 2]
    h2 = json.dumps(inner).encode()
    h2 += b" " * (-len(h2) % 8)
    body2 = struct.pack("<Q", len(h2)) + h2 + body[8 + hlen:]
    header["sections"][0][1:] = [len(body2), len(body2)]
    with pytest.raises(WireError, match="manifest expects F32"):
        decode(rebuild(data, header=header, body=body2))


def test_sample_messages_decode():
    for data in sample_messages():
        assert decode(data).run_id == "run-1"
    assert PREFIX_BYTES == 52


def test_threaded_hash_of_big_messages_gives_the_same_bytes(monkeypatch):
    from fedpara.wire import envelope as env

    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(300, 200, generator=g) for i in range(6)}
    tensors["ids"] = torch.arange(1000)
    msg = Message("update", "run", 2, "c1", tensors, {"n": 1})
    policy = "fp32;t1=fp16+zstd:3;t4=int8"  # uncompressed and zstd sections, in both orders
    serial = env.encode(msg, policy).data
    monkeypatch.setattr(EnvelopeHasher, "THREADED_HASH_BYTES", 1)  # every message takes the threaded path
    threaded = env.encode(msg, policy, reserve=68)
    assert bytes(threaded.data[:len(serial)]) == bytes(serial) and threaded.data[len(serial):] == bytes(68)
    assert env.decode(serial).meta == {"n": 1}
    assert not [t for t in threading.enumerate() if t.name == "envelope-digest"]  # no thread left behind
