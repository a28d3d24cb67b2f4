"""Untrusted input: >= 10,000 random and mutated byte strings reach the decoders, and the only
exception that ever comes out is WireError."""

import random
import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_support import rebuild, resign, sample_messages, split_envelope

from fedpara.wire import Limits, Reassembler, WireError, decode, split

torch.set_num_threads(1)

LIMITS = Limits(max_decoded_bytes=1 << 20, max_message_bytes=1 << 20, max_meta_bytes=1 << 16)
SAMPLES = sample_messages()


def _feed(data: bytes) -> str:
    """Decode data; 'ok' or 'wire' for a WireError; anything else fails the test."""
    try:
        decode(data, LIMITS)
        return "ok"
    except WireError as e:
        assert str(e), "WireError must say what was wrong"
        # the decoder's last-resort wrapper must never be needed: every check is explicit
        assert not str(e).startswith("malformed message"), str(e)
        return "wire"


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 2:
            del b[pos:pos + rng.randint(1, 64)]
        elif op == 3:
            b[pos:pos] = rng.randbytes(rng.randint(1, 64))
        elif op == 4:
            b = b[:pos]
        elif op == 5 and len(b) >= 8:  # overwrite an aligned word with an extreme value
            p = min(pos, len(b) - 8)
            b[p:p + 8] = rng.choice([b"\xff" * 8, bytes(8), struct.pack("<Q", 1 << 40)])
        else:  # splice from another valid message
            other = rng.choice(SAMPLES)
            q = rng.randrange(len(other))
            b[pos:pos + 32] = other[q:q + 32]
    return bytes(b)


WEIRD = [None, True, -1, 0, 1, 2, 255, 1 << 31, 1 << 63, 1 << 64, -(1 << 70), 1.5, float("nan"),
         "", "x", "fp16", "int8+sr+zstd:3", "float32", "bool", "__metadata__", [], [[]], [1, 2],
         [[1, 2, 3]], [-1], [1 << 40, 1 << 40], {}, {"a": 1}, [None] * 5, [1] * 20]


def _mutate_header(rng: random.Random, data: bytes) -> bytes:
    """Structured mutation: replace one value anywhere in the JSON header, then re-sign."""
    _, header, body = split_envelope(data)
    slots = []

    def walk(obj):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            slots.append((obj, k))
            if isinstance(v, (dict, list)):
                walk(v)

    walk(header)
    for _ in range(rng.randint(1, 3)):
        if not slots:
            break
        obj, k = rng.choice(slots)
        obj[k] = rng.choice(WEIRD)
    if rng.random() < 0.2:
        del header[rng.choice(list(header))]
    if rng.random() < 0.3:
        body = _mutate_bytes(rng, body)
    try:
        return rebuild(data, header=header, body=body)
    except ValueError:  # nan keys etc. json could not dump: fall back to a byte mutation
        return resign(_mutate_bytes(rng, data))


def test_ten_thousand_random_and_mutated_inputs_raise_only_wire_error():
    rng = random.Random(1234)
    outcomes = {"ok": 0, "wire": 0}
    n = 0
    for _ in range(2500):  # random garbage, some with a valid magic/version prefix
        data = rng.randbytes(rng.randint(0, 400))
        if rng.random() < 0.5:
            data = b"FPWE\x01\x00" + bytes([rng.randint(0, 5), 0]) + data
        outcomes[_feed(data)] += 1
        n += 1
    for _ in range(3000):  # byte mutations of valid messages (mostly caught by sha256)
        outcomes[_feed(_mutate_bytes(rng, rng.choice(SAMPLES)))] += 1
        n += 1
    for _ in range(2500):  # byte mutations re-signed: get past the digest into the parser
        outcomes[_feed(resign(_mutate_bytes(rng, rng.choice(SAMPLES))))] += 1
        n += 1
    for _ in range(2500):  # structured header mutations, re-signed
        outcomes[_feed(_mutate_header(rng, rng.choice(SAMPLES)))] += 1
        n += 1
    assert n >= 10_000
    assert outcomes["wire"] > 9_000  # nearly all are rejected, none with another exception


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_hypothesis_binary_raises_only_wire_error(data):
    _feed(data)
    _feed(b"FPWE\x01\x00\x02\x00" + data)


def test_mutated_chunk_frames_raise_only_wire_error():
    rng = random.Random(99)
    frames = [f for data in SAMPLES for f in split(data, 400, "t")]
    n_ok = n_err = 0
    for i in range(3000):
        r = Reassembler(max_partial_bytes=1 << 20, max_message_bytes=1 << 20)
        frame = rng.choice(frames)
        bad = _mutate_bytes(rng, frame) if i % 3 else rng.randbytes(rng.randint(0, 200))
        try:
            out = r.add(bad)
            n_ok += 1
            if out is not None:
                _feed(out)
        except WireError:
            n_err += 1
    assert n_err > 2000
