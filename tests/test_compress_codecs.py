"""int4, int2 and top-k codecs (fedpara/wire/quant.py): what they keep, and hostile input.

Every corrupted or hostile sparse/quantised tensor must come out of the decoder as a WireError that
says what was wrong, never an index error or an allocation beyond ``Limits``."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_support import rebuild, resign, split_envelope

import fedpara.wire.envelope as envelope
from fedpara.wire import CodecPolicy, CodecSpec, Limits, Message, WireError, decode, encode
from fedpara.wire.codecs import encode_tensor, roundtrip
from fedpara.wire.quant import BLOCK, topk_count

torch.set_num_threads(1)


def _enc(tensors, policy):
    return encode(Message("update", "run-1", 3, "c1", tensors, {"num_examples": 1}), policy)


@pytest.mark.parametrize("dtype,levels", [("int4", 15), ("int2", 3)])
@pytest.mark.parametrize("n", [32, 255, 256, 257, 1001, 1002, 1003])
def test_blockwise_error_is_at_most_half_a_step_per_block(n, dtype, levels):
    x = torch.randn(n) * torch.linspace(0.1, 10, n)
    y = decode(_enc({"x": x}, f"{dtype}+zstd:3").data).tensors["x"]
    for b in range(0, n, BLOCK):
        blk = x[b:b + BLOCK]
        step = float(blk.max() - blk.min()) / levels
        assert float((y[b:b + BLOCK] - blk).abs().max()) <= step / 2 + 1e-5 * float(blk.abs().max())


def test_int4_is_about_an_eighth_of_fp32_and_small_tensors_stay_fp32():
    x = {"w": torch.randn(512, 36), "tiny": torch.randn(7)}
    enc = _enc(x, "int4")
    assert enc.stats.tensors["w"].encoded_bytes == 512 * 36 // 2 + 8 * 72  # codes + (scale, lo) per block
    assert enc.stats.tensors["tiny"].codec == "fp32"


def test_int2_is_four_codes_a_byte():
    enc = _enc({"w": torch.randn(512, 36), "odd": torch.randn(1001)}, "int2")
    assert enc.stats.tensors["w"].encoded_bytes == 512 * 36 // 4 + 8 * 72
    assert enc.stats.tensors["odd"].encoded_bytes == 251 + 8 * 4  # ceil(1001 / 4) codes + 4 blocks


def test_topk_keeps_exactly_the_largest_magnitudes():
    x = torch.randn(50, 40)
    y = decode(_enc({"x": x}, "fp32+topk:0.05").data).tensors["x"]
    k = topk_count(x.numel(), 0.05)
    kept = y != 0
    assert int(kept.sum()) == k and torch.equal(y[kept], x[kept])
    assert float(x.abs()[kept].min()) >= float(x.abs()[~kept].max())


@pytest.mark.parametrize("spec", ["int4", "int2", "int8", "fp16+topk:0.1", "int4+topk:0.02+zstd:3",
                                  "int2+topk:0.3", "bf16+topk:1.0", "fp32+topk:0.5"])
def test_roundtrip_is_what_the_envelope_decodes(spec):
    x = {"a": torch.randn(300, 70), "b": torch.randn(100000)}  # b: U32 gap coding
    got = decode(_enc(x, spec).data).tensors
    for k, v in x.items():
        assert torch.equal(got[k], roundtrip(v, CodecSpec.parse(spec)))


@pytest.mark.parametrize("text", ["int4+sr+topk:0.05+zstd:3", "fp16+topk:0.1", "int4"])
def test_spec_text_round_trips(text):
    assert str(CodecSpec.parse(str(CodecSpec.parse(text)))) == str(CodecSpec.parse(text))
    assert CodecPolicy.parse(f"{text}; *.bias=fp32").default == CodecSpec.parse(text)


@pytest.mark.parametrize("text", ["int8+topk:0.1", "raw+topk:0.1", "fp16+topk:0", "fp16+topk:1.5", "fp16+topk:nan",
                                  "fp16+topk:x", "fp16+topk:0.1+topk:0.2", "fp16+sr"])
def test_bad_specs_are_refused(text):
    with pytest.raises(ValueError):
        CodecSpec.parse(text)


# --- hostile input: valid envelopes (digest fixed) around corrupted parts ------------------------
def _hostile(monkeypatch, spec: str, tamper, x=None):
    """An envelope whose encoder wrote ``tamper(parts)`` for tensor x under ``spec``."""
    real = envelope.encode_tensor

    def fake(t, s, g=None):
        used, parts = real(t, s, g)
        return used, tamper({k: (c, sh, arr.copy()) for k, (c, sh, arr) in parts.items()})

    monkeypatch.setattr(envelope, "encode_tensor", fake)
    x = torch.randn(40, 30) if x is None else x
    return _enc({"x": x}, spec).data


def _set(parts, suffix, arr):
    code, _, _ = parts[suffix]
    parts[suffix] = (code, arr.shape, arr)
    return parts


@pytest.mark.parametrize("what,tamper,match", [
    ("index past the end", lambda p: _set(p, ":idx", np.concatenate([p[":idx"][2][:-1], [60000]]).astype(np.uint16)),
     "out of range"),
    ("repeated index", lambda p: _set(p, ":idx", np.concatenate([p[":idx"][2][:1], np.zeros(len(p[":idx"][2]) - 1)]).astype(np.uint16)),
     "strictly increasing"),
    ("fewer indices", lambda p: _set(p, ":idx", p[":idx"][2][:-1]), "does not match|expects|expected|fit"),
    ("more values", lambda p: _set(p, "", np.concatenate([p[""][2], p[""][2][:1]])), "does not match|expects|expected|fit"),
])
def test_corrupt_topk_is_a_wire_error(monkeypatch, what, tamper, match):
    data = _hostile(monkeypatch, "fp16+topk:0.1", tamper)
    with pytest.raises(WireError, match=match):
        decode(data)


@pytest.mark.parametrize("spec", ["int4", "int4+topk:0.2", "int2", "int2+topk:0.3"])
@pytest.mark.parametrize("what,tamper,match", [
    ("NaN scale", lambda p: _set(p, ":affine", np.full_like(p[":affine"][2], np.nan)), "not finite"),
    ("negative scale", lambda p: _set(p, ":affine", -np.abs(p[":affine"][2]) - 1), "negative"),
    ("short codes", lambda p: _set(p, "", p[""][2][:-1]), "does not match|expects|expected|fit"),
])
def test_corrupt_blockwise_codes_are_a_wire_error(monkeypatch, spec, what, tamper, match):
    with pytest.raises(WireError, match=match):
        decode(_hostile(monkeypatch, spec, tamper))


@pytest.mark.parametrize("spec,n,bits", [("int4", 33, 0xF0), ("int2", 33, 0xC0), ("int2", 34, 0x30),
                                         ("int2", 35, 0xC0)])
def test_padding_codes_must_be_zero(monkeypatch, spec, n, bits):
    def tamper(p):
        codes = p[""][2]
        codes[-1] |= bits
        return _set(p, "", codes)

    with pytest.raises(WireError, match="padding codes"):
        decode(_hostile(monkeypatch, spec, tamper, x=torch.randn(n)))


def test_a_sparse_tensor_declaring_a_huge_shape_is_refused_before_allocating():
    data = _enc({"x": torch.randn(40, 30)}, "fp16+topk:0.01").data
    _, header, body = split_envelope(bytes(data))
    header["tensors"][0][2] = [1 << 20, 1 << 20]  # 2^40 elements, still "1% sparse"
    with pytest.raises(WireError, match="max_elements"):
        decode(rebuild(bytes(data), header=header))
    header["tensors"][0][2] = [4000, 1000]  # within max_elements but over a small budget
    with pytest.raises(WireError, match="max_decoded_bytes"):
        decode(rebuild(bytes(data), header=header), Limits(max_decoded_bytes=1 << 20))


SAMPLES = [bytes(_enc({"a": torch.randn(24, 11), "b": torch.randn(300)}, spec).data)
           for spec in ("int4+zstd:3", "fp16+topk:0.1", "int4+topk:0.2+zstd:1", "bf16+topk:0.5", "int2+zstd:3",
                        "int2+topk:0.3")]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(SAMPLES) - 1), st.integers(0, 1 << 30), st.integers(1, 6))
def test_mutated_compact_bodies_only_ever_raise_wire_errors(which, seed, flips):
    """Bytes of the body mutated and the digest fixed, so the decoders behind it see them."""
    rng = random.Random(seed)
    data = bytearray(SAMPLES[which])
    hlen = int.from_bytes(data[8:12], "little")
    start = 52 + hlen
    for _ in range(flips):
        pos = rng.randrange(start, len(data))
        data[pos] = rng.randrange(256)
    try:
        decode(resign(bytes(data)), Limits(max_decoded_bytes=1 << 22))
    except WireError as e:
        assert str(e) and not str(e).startswith("malformed message"), str(e)


def test_encode_tensor_keeps_nonfinite_tensors_whole():
    x = torch.randn(100)
    x[3] = float("nan")
    used, _ = encode_tensor(x, CodecSpec.parse("int4+topk:0.1"))
    assert used.dtype == "fp32" and used.topk is None
