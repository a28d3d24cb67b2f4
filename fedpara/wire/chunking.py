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
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from .accounting import mqtt_publish_bytes
from .limits import ENVELOPE_DIGEST, ENVELOPE_PREFIX, Limits, WireError, envelope_hash, envelope_length

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


class _Partial:
    __slots__ = ("count", "total", "digest", "version", "pieces", "held", "seen", "hasher", "fed", "total_env",
                 "buf", "hash_it", "auth")

    def __init__(self, chunk: Chunk, now: float) -> None:
        self.count, self.total, self.digest, self.version = chunk.count, chunk.total, chunk.digest, chunk.version
        self.auth = (chunk.signed_ns, chunk.signature)
        # version 1: frames kept as views until joined; version 2: each piece copied at once into
        # the message's own buffer (no join at the end; a decoder may alias tensors in it)
        self.pieces: dict[int, bytes | memoryview | int] = {}
        self.buf = bytearray(self.total) if self.version == CHUNK_VERSION_ENVELOPE else None
        self.held = 0
        self.seen = now
        self.hasher = None  # version 2: the envelope's digest so far, over pieces 0 .. fed - 1
        self.fed = 0
        self.total_env = 0
        self.hash_it = True


def _envelope_length(prefix: bytes | memoryview, total: int) -> int:
    """52 + H + B from an envelope's first bytes; WireError when it cannot fit the message."""
    n = envelope_length(prefix)
    if n > total:
        raise WireError(f"envelope declares {n} bytes, the chunked message has {total}")
    return n


def _feed(p: _Partial) -> None:
    """Hash the pieces of a version 2 message that have arrived in order (as they arrive)."""
    with memoryview(p.buf) as buf:
        while p.fed < p.count and p.fed in p.pieces:
            start, length = _piece(p.total, p.count, p.fed)
            if p.fed == 0:
                if length < _ENVELOPE_PREFIX:  # tiny frames: hash the whole message at the end
                    return
                p.total_env = _envelope_length(buf[:_ENVELOPE_PREFIX], p.total)
                p.hasher = envelope_hash(buf, 0)  # bytes [0, 20); the rest as pieces arrive
            lo, hi = max(start, _ENVELOPE_PREFIX), min(start + length, p.total_env)
            if hi > lo:
                p.hasher.update(buf[lo:hi])
            p.fed += 1


class Reassembler:
    """Collects chunk frames from any number of senders; returns each complete message once.

    Tolerates reordering and duplicates (QoS 1 redelivers). A partial message expires after
    timeout_s without a new chunk; the oldest partial is evicted when more than max_messages are
    open or more than max_partial_bytes are held. Ids of completed messages are remembered for
    remember_s (default: timeout_s) so late duplicates are dropped. Not thread-safe: feed it from
    one thread. Counters: completed, duplicates, expired, evicted, rejected, unauthenticated.

    ``authenticate(chunk) -> bool`` (signed runs): only version 3 frames whose header signature
    it accepts open a message, checked once per message id; every other frame is refused before
    it takes a slot or a byte, and a frame that disagrees with its message's signed header is
    refused too. The partial evicted first is then the one signed longest ago, so a replayed
    genuine header cannot push out a newer message either.
    """

    def __init__(self, timeout_s: float = 60.0, max_partial_bytes: int = 256 << 20,
                 max_messages: int = 64, *, max_message_bytes: int = Limits().max_message_bytes,
                 max_chunks: int = 1 << 16, remember_s: float | None = None,
                 max_remembered: int = 4096, clock: Callable[[], float] = time.monotonic,
                 hash_envelope: Callable[[bytes], bool] | None = None,
                 authenticate: Callable[[Chunk], bool] | None = None) -> None:
        for name, value in (("timeout_s", timeout_s), ("max_partial_bytes", max_partial_bytes),
                            ("max_messages", max_messages), ("max_message_bytes", max_message_bytes),
                            ("max_chunks", max_chunks), ("max_remembered", max_remembered)):
            if not value > 0:
                raise ValueError(f"Reassembler.{name} must be > 0, got {value!r}")
        self.timeout_s = timeout_s
        self.max_partial_bytes = max_partial_bytes
        self.max_messages = max_messages
        self.max_message_bytes = max_message_bytes
        self.max_chunks = max_chunks
        self.remember_s = timeout_s if remember_s is None else remember_s
        # version 2: hash an envelope as it arrives (True), or leave its check to whoever opens it
        # (a pool whose other client checks the same bytes: edge_client/shared.py)
        self.hash_envelope = hash_envelope
        self.authenticate = authenticate
        self.max_remembered = max_remembered
        self.clock = clock
        self._partials: OrderedDict[bytes, _Partial] = OrderedDict()  # oldest activity first
        self._done: OrderedDict[bytes, float] = OrderedDict()  # completed id -> when
        self.partial_bytes = 0
        self.completed = self.duplicates = self.expired = self.evicted = self.rejected = self.unauthenticated = 0
        self._checked: bytes | None = None

    @property
    def partial_messages(self) -> int:
        return len(self._partials)

    def expire(self) -> int:
        """Drop partial messages idle for timeout_s and forget old completed ids; returns drops."""
        now = self.clock()
        dropped = 0
        while self._partials:
            mid, p = next(iter(self._partials.items()))
            if now - p.seen < self.timeout_s:
                break
            self._drop(mid)
            dropped += 1
        self.expired += dropped
        while self._done and (now - next(iter(self._done.values())) >= self.remember_s
                              or len(self._done) > self.max_remembered):
            self._done.popitem(last=False)
        return dropped

    def _drop(self, mid: bytes) -> None:
        p = self._partials.pop(mid)
        self.partial_bytes -= p.held

    def _evict_oldest(self, keep: bytes) -> bool:
        if self.authenticate is not None:  # the one signed longest ago
            mids = [m for m in self._partials if m != keep]
            if not mids:
                return False
            self._drop(min(mids, key=lambda m: self._partials[m].auth[0]))
            self.evicted += 1
            return True
        for mid in self._partials:
            if mid != keep:
                self._drop(mid)
                self.evicted += 1
                return True
        return False

    def _check_auth(self, chunk: Chunk) -> None:
        """Refuse a frame no trusted sender signed (signed runs), before it costs a slot."""
        if not chunk.signature:
            self.unauthenticated += 1
            raise WireError("unsigned chunk frame in a signed run")
        try:
            ok = self.authenticate(chunk)
        except Exception as exc:  # the authenticator's own refusal (a stale header, say)
            self.unauthenticated += 1
            raise WireError(f"chunk header refused: {exc}") from None
        if not ok:
            self.unauthenticated += 1
            raise WireError(f"message {chunk.message_id.hex()}: chunk header signature does not verify")

    def _hash_it(self, digest: bytes) -> bool:
        return self.hash_envelope is None or bool(self.hash_envelope(digest))

    def checked(self, data: bytes) -> bool:
        """True when ``data`` is the message this reassembler last returned and it was a version 2
        envelope whose own digest was verified here: its decoder need not hash it again."""
        return data is self._checked

    def _finish(self, mid: bytes, data: bytes, digest: bytes, version: int, hasher=None,
                hash_it: bool = True) -> bytes:
        if version == CHUNK_VERSION_ENVELOPE:  # the envelope's own digest, taken once
            if len(data) < _ENVELOPE_PREFIX or data[ENVELOPE_DIGEST] != digest:
                ok = False
            elif not hash_it:  # left to whoever opens it (hash_envelope said no)
                ok = True
            else:
                if hasher is None:  # one frame, or frames too small to hash as they came
                    try:
                        hasher = envelope_hash(memoryview(data), _envelope_length(data, len(data)))
                    except WireError:  # a length beyond the message, reserved flags
                        self.rejected += 1
                        raise
                ok = hasher.digest() == digest
        else:
            ok = hashlib.sha256(data).digest() == digest
        if not ok:
            self.rejected += 1
            raise WireError(f"message {mid.hex()}: reassembled bytes do not match the digest")
        self._done[mid] = self.clock()
        self.completed += 1
        self._checked = data if version == CHUNK_VERSION_ENVELOPE and hash_it else None
        return data

    def add(self, frame: bytes | bytearray | memoryview) -> bytes | None:
        """Feed one frame; returns the whole message when this frame completes it, else None."""
        try:
            chunk = parse_chunk(frame, max_message_bytes=self.max_message_bytes,
                                max_chunks=self.max_chunks)
        except WireError:
            self.rejected += 1
            raise
        self.expire()
        mid = chunk.message_id
        if mid in self._done:
            self.duplicates += 1
            return None
        p = self._partials.get(mid)
        if self.authenticate is not None:
            if p is None:
                self._check_auth(chunk)
            elif p.auth != (chunk.signed_ns, chunk.signature):
                self.rejected += 1
                raise WireError(f"message {mid.hex()}: chunk {chunk.index} carries another signed header")
        if chunk.count == 1:
            if chunk.version != CHUNK_VERSION_ENVELOPE:
                return self._finish(mid, bytes(chunk.payload), chunk.digest, chunk.version)
            return self._finish(mid, bytearray(chunk.payload), chunk.digest, chunk.version,
                                hash_it=self._hash_it(chunk.digest))
        if p is None:
            if chunk.total > self.max_partial_bytes:
                self.rejected += 1
                raise WireError(f"message {mid.hex()} of {chunk.total} bytes exceeds "
                                f"max_partial_bytes {self.max_partial_bytes}")
            if (self.authenticate is not None and len(self._partials) >= self.max_messages
                    and all(q.auth[0] > chunk.signed_ns for q in self._partials.values())):
                self.evicted += 1  # older than every open message: it is the one that gives way
                return None
            while len(self._partials) >= self.max_messages:
                self._evict_oldest(keep=mid)
            p = self._partials[mid] = _Partial(chunk, self.clock())
            if p.version == CHUNK_VERSION_ENVELOPE:
                p.hash_it = self._hash_it(chunk.digest)
        elif (p.count, p.total, p.digest, p.version) != (chunk.count, chunk.total, chunk.digest, chunk.version):
            self.rejected += 1
            raise WireError(f"message {mid.hex()}: chunk {chunk.index} disagrees with earlier "
                            "chunks on count, length or digest")
        if chunk.index in p.pieces:
            self.duplicates += 1
            return None
        if p.buf is not None:  # version 2: straight into the message's buffer, reserved whole
            start, length = _piece(p.total, p.count, chunk.index)
            p.buf[start:start + length] = chunk.payload
            p.pieces[chunk.index] = length
            grown = p.total - p.held  # the whole buffer counts from its first piece on
        else:
            p.pieces[chunk.index] = chunk.payload
            grown = len(chunk.payload)
        p.held += grown
        p.seen = self.clock()
        self._partials.move_to_end(mid)
        self.partial_bytes += grown
        while self.partial_bytes > self.max_partial_bytes and self._evict_oldest(keep=mid):
            pass
        if p.version == CHUNK_VERSION_ENVELOPE and p.hash_it:
            try:
                _feed(p)  # hash what has arrived in order, while the rest is on its way
            except WireError:
                self.rejected += 1
                self._drop(mid)
                raise
        if len(p.pieces) < p.count:
            return None
        self._drop(mid)
        data = p.buf if p.buf is not None else b"".join(p.pieces[i] for i in range(p.count))
        return self._finish(mid, data, p.digest, p.version, p.hasher if p.fed == p.count else None, p.hash_it)
