"""Chunking: split an envelope into MQTT-sized frames and put it back together.

Brokers cap packet sizes (Mosquitto 2.1: 2,000,000 bytes; EMQX: 1 MB; AWS IoT: 128 KB), so
every message travels as chunk frames, even one that fits (count = 1), so receivers have one
path. Frame layout (little-endian, 70-byte header)::

    0   4   magic b"FPWC"
    4   1   chunk format version (1, 2 or 3)
    5   1   flags (0)
    6   16  message id (random)
    22  4   index (0-based)
    26  4   count (>= 1)
    30  8   total message length T
    38  32  digest: version 1, sha256 of the whole message; version 2, the message's bytes
            [20, 52): an envelope's own digest, which the reassembler verifies (below)
    70  ..  payload: bytes [index * P, min(T, (index + 1) * P)) with P = ceil(T / count)

Version 3 is version 2 with the message's header signed, for signed runs (docs/security.md):
72 more bytes after the 70-byte header, then the payload::

    70  8   signed_ns: the sender's clock when it split the message (nanoseconds)
    78  64  Ed25519 signature over b"fedpara/v1 chunk\0" + bytes [6, 70) + signed_ns
            (message id, index 0 in place of the index, count, length, envelope digest)

Every frame of a message carries the same signature, so whichever frame arrives first tells a
receiver, with one signature check per message, that a trusted sender is sending this message:
a receiver that authenticates chunks (``Reassembler(authenticate=...)``) drops every frame
without a valid signature before it takes a slot, so a stranger's frames with fresh message ids
cannot push a genuine partial message out. The envelope inside is signed as before.

The split is canonical (P is derived from T and count), so each frame's payload length is
checked on arrival, before it is stored. A reassembled version 1 message is checked against the
digest. A version 2 message is an envelope: its digest (SHA-256, or BLAKE3 where its flags say
so; over its bytes [0, 20) and [52, 52 + H + B), the lengths its prefix declares) is taken piece
by piece as the frames arrive in order, checked against the digest when the last one comes, and
``Reassembler.checked(data)`` tells the decoder it need not hash again. Version 2 exists so that
an envelope is hashed once on each side, mostly while it is still arriving (docs/wire.md).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

from .accounting import mqtt_publish_bytes
from .limits import ENVELOPE_DIGEST, ENVELOPE_PREFIX, WireError

CHUNK_MAGIC = b"FPWC"
CHUNK_VERSION = 1  # digest: sha256 of the message
CHUNK_VERSION_ENVELOPE = 2  # digest: the envelope's own, at bytes [20, 52)
CHUNK_VERSION_SIGNED = 3  # version 2 + a signed message header (signed_ns, Ed25519 signature)
_ENVELOPE_PREFIX = ENVELOPE_PREFIX.size
_HEADER = struct.Struct("<4sBB16sIIQ32s")
CHUNK_HEADER_BYTES = _HEADER.size  # 70
_AUTH = struct.Struct("<Q64s")
CHUNK_AUTH_BYTES = _AUTH.size  # 72
CHUNK_CONTEXT = b"fedpara/v1 chunk\0"


def chunk_signed_bytes(message_id: bytes, count: int, total: int, digest: bytes, signed_ns: int) -> bytes:
    """What a version 3 frame's signature covers: the context, the message's header fields (index
    0: the same for every frame) and the signing time."""
    return CHUNK_CONTEXT + _HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION_SIGNED, 0, message_id, 0, count, total,
                                        digest)[6:] + struct.pack("<Q", signed_ns)


@dataclass(frozen=True)
class Chunk:
    message_id: bytes
    index: int
    count: int
    total: int
    digest: bytes
    payload: bytes | memoryview  # a view into the frame when the frame is bytes (no copy)
    version: int = CHUNK_VERSION
    signed_ns: int = 0          # version 3: when the sender signed the header
    signature: bytes = b""      # version 3: Ed25519 over chunk_signed_bytes(...)

    def signed_bytes(self) -> bytes:
        return chunk_signed_bytes(self.message_id, self.count, self.total, self.digest, self.signed_ns)


def _piece(total: int, count: int, index: int) -> tuple[int, int]:
    """(offset, length) of piece index in the canonical split of total bytes into count pieces."""
    per = -(-total // count)
    start = index * per
    return start, min(total, start + per) - start


def parse_chunk(frame: bytes | bytearray | memoryview, *, max_message_bytes: int = 1 << 62,
                max_chunks: int = 1 << 32) -> Chunk:
    """Validate one frame's header against itself and the limits. WireError if malformed."""
    try:
        buf = memoryview(frame).cast("B")
    except TypeError:
        raise WireError(f"chunk frame must be bytes, got {type(frame).__name__}") from None
    if len(buf) < CHUNK_HEADER_BYTES:
        raise WireError(f"chunk frame too short ({len(buf)} bytes, header is {CHUNK_HEADER_BYTES})")
    magic, version, flags, mid, index, count, total, digest = _HEADER.unpack_from(buf)
    if magic != CHUNK_MAGIC:
        raise WireError(f"bad chunk magic {bytes(magic)!r} (expected {CHUNK_MAGIC!r})")
    if version not in (CHUNK_VERSION, CHUNK_VERSION_ENVELOPE, CHUNK_VERSION_SIGNED) or flags:
        raise WireError(f"unsupported chunk version {version} / flags 0x{flags:02x}")
    if total > max_message_bytes:
        raise WireError(f"chunked message declares {total} bytes, the limit is {max_message_bytes}")
    if not 1 <= count <= max_chunks or index >= count:
        raise WireError(f"bad chunk index {index} / count {count} (limit {max_chunks} chunks)")
    _, last_len = _piece(total, count, count - 1)
    if last_len <= 0 and not (total == 0 and count == 1):
        raise WireError(f"chunk count {count} impossible for {total} bytes")
    _, length = _piece(total, count, index)
    head = CHUNK_HEADER_BYTES
    signed_ns, signature = 0, b""
    if version == CHUNK_VERSION_SIGNED:
        head += CHUNK_AUTH_BYTES
        if len(buf) < head:
            raise WireError(f"signed chunk frame too short ({len(buf)} bytes, header is {head})")
        signed_ns, signature = _AUTH.unpack_from(buf, CHUNK_HEADER_BYTES)
    if len(buf) - head != length:
        raise WireError(f"chunk {index}/{count}: payload is {len(buf) - head} bytes, expected {length}")
    # bytes cannot change under us: keep a view of the payload rather than a copy of it
    payload = buf[head:] if isinstance(frame, bytes) else bytes(buf[head:])
    return Chunk(bytes(mid), index, count, total, bytes(digest), payload,
                 CHUNK_VERSION_ENVELOPE if version == CHUNK_VERSION_SIGNED else version, signed_ns, bytes(signature))


def max_chunk_payload(max_packet: int, topic: str | bytes, *, qos: int = 1, protocol: int = 4,
                      properties_len: int = 0, signed: bool = False) -> int:
    """Largest message slice per frame so the whole PUBLISH packet is <= max_packet bytes
    (``signed``: version 3 frames, 72 header bytes more)."""
    head = CHUNK_HEADER_BYTES + (CHUNK_AUTH_BYTES if signed else 0)

    def size(n: int) -> int:
        return mqtt_publish_bytes(topic, head + n, qos=qos, protocol=protocol,
                                  properties_len=properties_len)

    n = max_packet - size(0)  # upper bound: the remaining-length varint can only grow
    while n > 0 and size(n) > max_packet:
        n -= 1
    if n <= 0:
        raise ValueError(f"max_packet {max_packet} leaves no room for payload on topic {topic!r}")
    return n


def split(data: bytes | bytearray | memoryview, max_packet: int, topic: str | bytes, *,
          qos: int = 1, protocol: int = 4, properties_len: int = 0,
          message_id: bytes | None = None, envelope: bool = False,
          sign: Callable[[bytes], bytes] | None = None, clock: Callable[[], int] = time.time_ns) -> list[bytes]:
    """Chunk frames for data such that each PUBLISH on topic is at most max_packet bytes.

    ``envelope=True``: data is an envelope (its own digest at bytes [20, 52), checked by its
    decoder); the frames are version 2 and carry that digest instead of hashing data again.
    ``sign``: a function from bytes to a 64-byte Ed25519 signature (a signed run's sender key):
    the frames are version 3, their header signed once for the message (needs ``envelope``)."""
    if sign is not None and not envelope:
        raise ValueError("signed chunks carry an envelope (envelope=True)")
    buf = memoryview(data).cast("B")
    per_max = max_chunk_payload(max_packet, topic, qos=qos, protocol=protocol,
                                properties_len=properties_len, signed=sign is not None)
    total = len(buf)
    count = max(1, -(-total // per_max))
    if count >= 1 << 32:
        raise ValueError(f"{total} bytes need {count} chunks, more than the format allows")
    mid = os.urandom(16) if message_id is None else message_id
    if len(mid) != 16:
        raise ValueError("message_id must be 16 bytes")
    if envelope:
        if total < ENVELOPE_DIGEST.stop:
            raise ValueError(f"{total} bytes cannot be an envelope")
        version, digest = CHUNK_VERSION_ENVELOPE, bytes(buf[ENVELOPE_DIGEST])
    else:
        version, digest = CHUNK_VERSION, hashlib.sha256(buf).digest()
    auth = b""
    if sign is not None:
        version, signed_ns = CHUNK_VERSION_SIGNED, clock()
        signature = sign(chunk_signed_bytes(mid, count, total, digest, signed_ns))
        if len(signature) != 64:
            raise ValueError("a chunk signature is 64 bytes (Ed25519)")
        auth = _AUTH.pack(signed_ns, signature)
    frames = []
    for index in range(count):
        start, length = _piece(total, count, index)
        frames.append(_HEADER.pack(CHUNK_MAGIC, version, 0, mid, index, count, total, digest) + auth
                      + buf[start:start + length])
    return frames
