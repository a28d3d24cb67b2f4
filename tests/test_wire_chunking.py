"""Chunking and byte accounting: MQTT packet sizes, split limits, reassembly under shuffling,
duplication, loss, expiry and memory caps."""

import random

import pytest
import torch

from fedpara.wire import (
    CHUNK_HEADER_BYTES,
    Message,
    Reassembler,
    WireError,
    decode,
    encode,
    framed_bytes,
    max_chunk_payload,
    mqtt_publish_bytes,
    split,
)

torch.set_num_threads(1)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


# ---------------------------------------------------------------- MQTT PUBLISH sizes


@pytest.mark.parametrize("topic, n, qos, protocol, props, expected", [
    ("a/b", 10, 0, 4, 0, 1 + 1 + 2 + 3 + 10),
    ("a/b", 10, 1, 4, 0, 1 + 1 + 2 + 3 + 2 + 10),
    ("a/b", 10, 1, 5, 0, 1 + 1 + 2 + 3 + 2 + 1 + 10),
    ("a/b", 10, 2, 5, 5, 1 + 1 + 2 + 3 + 2 + 1 + 5 + 10),
    ("t", 127 - 3, 0, 4, 0, 1 + 1 + 127),  # remaining length 127: one varint byte
    ("t", 128 - 3, 0, 4, 0, 1 + 2 + 128),  # 128: two bytes
    ("t", 16_384 - 3, 0, 4, 0, 1 + 3 + 16_384),
    ("t", 2_097_152 - 3, 0, 4, 0, 1 + 4 + 2_097_152),
    ("é", 0, 0, 4, 0, 1 + 1 + 2 + 2),  # topic length counts UTF-8 bytes
])
def test_mqtt_publish_bytes_exact(topic, n, qos, protocol, props, expected):
    assert mqtt_publish_bytes(topic, n, qos=qos, protocol=protocol, properties_len=props) == expected


def test_mqtt_publish_bytes_matches_amqtt_encoder():
    publish = pytest.importorskip("amqtt.mqtt.publish")
    for n in (0, 1, 100, 125, 126, 127, 128, 16_380, 16_384, 70_000):
        for qos in (0, 1):
            pkt = publish.PublishPacket.build("fedpara/run/up/c1", b"x" * n, 7 if qos else None,
                                              False, qos, False)
            assert len(pkt.to_bytes()) == mqtt_publish_bytes("fedpara/run/up/c1", n, qos=qos)


def test_mqtt_publish_bytes_rejects_bad_args():
    for kw in ({"qos": 3}, {"protocol": 6}, {"properties_len": 2}):
        with pytest.raises(ValueError):
            mqtt_publish_bytes("t", 1, **kw)
    with pytest.raises(ValueError):
        mqtt_publish_bytes("t", 300_000_000)


# ---------------------------------------------------------------- split


@pytest.mark.parametrize("max_packet", [128 * 1024, 1_000_000, 2_000_000])  # AWS IoT, EMQX, Mosquitto
@pytest.mark.parametrize("protocol, props", [(4, 0), (5, 12)])
def test_split_fits_broker_limits_tightly(max_packet, protocol, props):
    topic = "fedpara/run-1/update/client-0042"
    data = random.Random(0).randbytes(3_100_000)
    kw = dict(qos=1, protocol=protocol, properties_len=props)
    frames = split(data, max_packet, topic, **kw)
    sizes = [mqtt_publish_bytes(topic, len(f), **kw) for f in frames]
    assert max(sizes) <= max_packet
    n = max_chunk_payload(max_packet, topic, **kw)
    assert mqtt_publish_bytes(topic, CHUNK_HEADER_BYTES + n, **kw) <= max_packet
    assert mqtt_publish_bytes(topic, CHUNK_HEADER_BYTES + n + 1, **kw) > max_packet
    assert len(frames) == -(-len(data) // n)  # no more chunks than necessary
    overhead = (framed_bytes(frames, topic, **kw) - len(data)) / len(data)
    assert overhead < 0.001


def test_small_message_is_one_frame_and_too_small_packet_fails():
    frames = split(b"hello", 1_000_000, "t")
    assert len(frames) == 1 and len(frames[0]) == CHUNK_HEADER_BYTES + 5
    assert Reassembler().add(frames[0]) == b"hello"
    assert Reassembler().add(split(b"", 1000, "t")[0]) == b""
    with pytest.raises(ValueError):
        split(b"x" * 100, 60, "t")


# ---------------------------------------------------------------- reassembly


def _messages(rng, k=5):
    return [rng.randbytes(rng.randint(1, 5000)) for _ in range(k)]


@pytest.mark.parametrize("seed", range(5))
def test_reassembly_under_shuffle_interleave_and_duplicates(seed):
    rng = random.Random(seed)
    msgs = _messages(rng)
    frames = [f for m in msgs for f in split(m, rng.randint(200, 1500), "t/x")]
    dups = rng.sample(frames, len(frames) // 2)  # QoS 1 redelivery
    frames += dups
    rng.shuffle(frames)
    r = Reassembler()
    out = [x for x in (r.add(f) for f in frames) if x is not None]
    assert sorted(out) == sorted(msgs)  # each exactly once
    assert r.duplicates == len(dups)
    assert r.partial_messages == 0 and r.partial_bytes == 0 and r.completed == len(msgs)


def test_duplicate_count_and_late_duplicates_after_completion():
    frames = split(b"a" * 1000, 300, "t")
    r = Reassembler()
    assert [r.add(f) for f in frames][-1] == b"a" * 1000
    assert r.add(frames[0]) is None and r.add(frames[-1]) is None
    assert r.duplicates == 2
    one = split(b"single", 300, "t")[0]
    assert r.add(one) == b"single" and r.add(one) is None


def test_loss_then_expiry_frees_memory():
    clock = FakeClock()
    r = Reassembler(timeout_s=10, clock=clock)
    frames = split(b"z" * 5000, 500, "t")
    for f in frames[:-1]:  # last chunk lost
        assert r.add(f) is None
    assert r.partial_messages == 1 and r.partial_bytes > 4000
    clock.t = 11
    assert r.expire() == 1
    assert r.expired == 1 and r.partial_messages == 0 and r.partial_bytes == 0
    assert r.add(frames[-1]) is None  # the straggler starts a new partial, which also expires
    clock.t = 30
    r.expire()
    assert r.expired == 2


def test_memory_cap_and_max_messages_evict_oldest():
    clock = FakeClock()
    r = Reassembler(max_partial_bytes=6000, max_messages=3, clock=clock)
    msgs = [bytes([i]) * 4000 for i in range(5)]
    frames = [split(m, 1200, "t") for m in msgs]
    for i, fs in enumerate(frames):  # first half of every message
        for f in fs[: len(fs) // 2]:
            clock.t += 1
            r.add(f)
            assert r.partial_bytes <= 6000 and r.partial_messages <= 3
    assert r.evicted >= 2
    last = frames[-1]
    assert [r.add(f) for f in last[len(last) // 2:]][-1] == msgs[-1]  # newest survives
    with pytest.raises(WireError, match="max_partial_bytes"):
        r.add(split(b"q" * 7000, 1200, "t")[0])


def test_conflicting_or_corrupted_chunks_raise():
    frames = split(b"m" * 3000, 1000, "t", message_id=b"i" * 16)
    other = split(b"n" * 2000, 1000, "t", message_id=b"i" * 16)
    r = Reassembler()
    r.add(frames[0])
    with pytest.raises(WireError, match="disagrees"):
        r.add(other[1])
    bad = bytearray(frames[1])
    bad[-1] ^= 0xFF
    r.add(bytes(bad))
    for f in frames[2:-1]:
        r.add(f)
    with pytest.raises(WireError, match="digest"):
        r.add(frames[-1])
    assert r.partial_messages == 0
    with pytest.raises(WireError, match="payload is"):
        r.add(frames[0][:-1])
    with pytest.raises(WireError, match="magic"):
        r.add(b"X" * 100)


def test_end_to_end_encode_split_shuffle_reassemble_decode():
    g = torch.Generator().manual_seed(0)
    t = {f"layer{i}.x1": torch.randn(256, 64, generator=g) for i in range(8)}
    enc = encode(Message("update", "run", 3, "c9", t, {"num_examples": 500}), "fp16")
    topic = "fedpara/run/update/c9"
    frames, stats = enc.split(128 * 1024, topic)
    assert stats.chunks == len(frames) > 1
    assert stats.framed_bytes == sum(mqtt_publish_bytes(topic, len(f)) for f in frames)
    assert stats.framing_overhead < 0.01
    random.Random(1).shuffle(frames)
    r = Reassembler()
    data = [x for x in map(r.add, frames) if x is not None]
    assert len(data) == 1
    out = decode(data[0])
    assert out.meta == {"num_examples": 500}
    assert all(torch.allclose(out.tensors[k], t[k], atol=2e-3, rtol=1e-3) for k in t)


# ---------------------------------------------------------------- version 2: envelopes hashed once

def _envelope(n=3000):
    return encode(Message("update", "run", 1, "c1", {"w": torch.arange(n, dtype=torch.float32)}, {"k": 1}))


def test_envelope_frames_are_version_2_carrying_the_envelope_digest():
    from fedpara.wire import parse_chunk

    enc = _envelope()
    frames, _ = enc.split(2000, "t")
    assert len(frames) > 3
    for f in frames:
        c = parse_chunk(f)
        assert c.version == 2 and c.digest == bytes(enc.data[20:52])
        assert isinstance(c.payload, memoryview)  # a view into the frame, not a copy
    random.Random(0).shuffle(frames)
    r = Reassembler()
    out = [x for x in map(r.add, frames) if x is not None]
    assert out == [bytes(enc.data)] and decode(out[0]).meta == {"k": 1}
    plain = split(b"x" * 5000, 2000, "t")  # anything that is not an envelope keeps version 1
    assert {parse_chunk(f).version for f in plain} == {1}
    with pytest.raises(ValueError, match="envelope"):
        split(b"x" * 40, 2000, "t", envelope=True)


def test_version_2_is_hashed_once_as_frames_arrive_and_corruption_is_refused():
    enc = _envelope()
    frames, _ = enc.split(2000, "t")
    for order in (frames, frames[::-1]):  # in order: hashed as they come; reversed: at the end
        r = Reassembler()
        data = [x for x in map(r.add, order) if x is not None][0]
        assert r.checked(data) and not r.checked(bytes(bytearray(data)))  # this very message only
        assert decode(data, digest_checked=True).meta == {"k": 1}
    bad = bytearray(frames[-1])
    bad[-1] ^= 0xFF  # a body byte
    r = Reassembler()
    with pytest.raises(WireError, match="digest"):
        for f in [*frames[:-1], bytes(bad)]:
            r.add(f)
    bad = bytearray(frames[0])
    bad[CHUNK_HEADER_BYTES + 25] ^= 0xFF  # the envelope's own digest no longer matches the frames'
    r = Reassembler()
    with pytest.raises(WireError, match="digest"):
        for f in [bytes(bad), *frames[1:]]:
            r.add(f)
    assert r.rejected == 1 and r.partial_messages == 0
    bad = bytearray(frames[0])
    bad[CHUNK_HEADER_BYTES + 12] = 0xFF  # a body length beyond the message: refused at once
    r = Reassembler()
    with pytest.raises(WireError, match="declares"):
        r.add(bytes(bad))
    assert r.partial_messages == 0
    tiny = split(enc.data, 100, "t", envelope=True)  # first frame shorter than the prefix
    r = Reassembler()
    data = [x for x in map(r.add, tiny) if x is not None][0]
    assert r.checked(data) and data == bytes(enc.data)
    plain = split(enc.data, 2000, "t")  # version 1: its own digest, the envelope's is the decoder's
    r = Reassembler()
    data = [x for x in map(r.add, plain) if x is not None][0]
    assert not r.checked(data)


def test_version_1_and_2_frames_of_one_id_disagree():
    enc = _envelope()
    v2, _ = enc.split(2000, "t")
    v1 = split(enc.data, 2000, "t", message_id=v2[0][6:22])
    r = Reassembler()
    r.add(v2[0])
    with pytest.raises(WireError, match="disagrees"):
        r.add(v1[1])


def test_version_2_buffers_count_whole_from_the_first_frame():
    # a version 2 message is copied into its own buffer as frames arrive: the cap counts the whole
    # buffer at once, so first frames declaring big messages cannot reserve more than the cap
    encs = [_envelope(3000) for _ in range(3)]  # ~12 KB each
    splits = [e.split(2000, "t")[0] for e in encs]
    r = Reassembler(max_partial_bytes=30_000)
    for frames in splits:
        r.add(frames[0])
    assert r.partial_bytes <= 30_000 and r.partial_messages == 2 and r.evicted == 1
    data = [x for x in map(r.add, splits[2][1:]) if x is not None][0]
    assert isinstance(data, bytearray) and data == encs[2].data and r.checked(data)
    msg = decode(data, digest_checked=True, alias=True)  # fp32 tensors are views into the buffer
    data[-4:] = b"\0\0\0\0"
    assert msg.tensors["w"][-1].item() == 0.0  # proof it aliases: the buffer is its memory
    assert decode(bytes(encs[2].data)).tensors["w"][-1].item() == 2999.0  # bytes: always copied
