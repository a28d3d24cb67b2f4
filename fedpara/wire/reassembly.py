"""Reassembly: chunk frames back into messages, bounded, authenticated, hashed on arrival.

The frame format and the split are in :mod:`.chunking` (its docstring describes versions 1-3).
A :class:`Reassembler` keeps a bounded number of partial messages per sender topic, drops frames
no trusted sender signed before they take a slot (signed runs), evicts the partial signed longest
ago first, and hashes a version 2/3 envelope piece by piece as its frames arrive in order.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Callable

from .chunking import (
    CHUNK_VERSION_ENVELOPE,
    Chunk,
    _piece,
    parse_chunk,
)
from .digest import envelope_hash
from .limits import ENVELOPE_DIGEST, ENVELOPE_PREFIX, Limits, WireError, envelope_length

_ENVELOPE_PREFIX = ENVELOPE_PREFIX.size


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
        # (a pool whose other client checks the same bytes: edge_client/pool_verify.py)
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
