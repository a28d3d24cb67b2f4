"""Envelope digests: SHA-256 or BLAKE3 (flags bit 0), and hashing a message while it is written.

Which algorithm an envelope uses is agreed per peer (docs/wire.md, Digests): a client announces
:func:`digests_available` in its status; a decoder without the ``blake3`` package refuses a BLAKE3
envelope clearly. :class:`EnvelopeHasher` hashes a big message on a second thread as the encoder
writes it, so hashing overlaps copying instead of following it.
"""
from __future__ import annotations

import functools
import hashlib
import queue
import threading

from .limits import ENVELOPE_DIGEST, ENVELOPE_FLAGS, ENVELOPE_PREFIX, FLAG_BLAKE3, WireError

PREFIX_BYTES = ENVELOPE_PREFIX.size  # 52
DIGESTS = ("sha256", "blake3")


@functools.cache
def _blake3():
    try:
        from blake3 import blake3
    except ImportError:
        return None
    return blake3


def digests_available() -> tuple[str, ...]:
    """The envelope digests this installation can make and check: SHA-256 always, BLAKE3 where
    the ``blake3`` package is installed (a client announces these in its status)."""
    return DIGESTS if _blake3() is not None else ("sha256",)


def digest_flags(digest: str) -> int:
    """The envelope flags for ``digest``; WireError for one this installation cannot make."""
    if digest not in DIGESTS:
        raise WireError(f"unknown envelope digest {digest!r} (known: {', '.join(DIGESTS)})")
    if digest == "blake3" and _blake3() is None:
        raise WireError("the blake3 digest needs the blake3 package (pip install blake3)")
    return FLAG_BLAKE3 if digest == "blake3" else 0


def new_hash(flags: int, data=b""):
    """A hash object of the digest ``flags`` select, fed ``data``. WireError for reserved bits,
    or for BLAKE3 without the blake3 package."""
    if flags & ~FLAG_BLAKE3:
        raise WireError(f"unknown envelope flags 0x{flags:02x}")
    if flags & FLAG_BLAKE3:
        blake3 = _blake3()
        if blake3 is None:
            raise WireError("message digested with BLAKE3; this installation cannot check it "
                            "(pip install blake3)")
        return blake3(data)
    return hashlib.sha256(data)


def envelope_hash(buf: memoryview, end: int):
    """The envelope digest's hash object (the algorithm its flags byte names) over ``buf[:20]``
    and ``buf[52:end]``. WireError for flags no decoder here accepts."""
    h = new_hash(buf[ENVELOPE_FLAGS], buf[:ENVELOPE_DIGEST.start])
    h.update(buf[ENVELOPE_PREFIX.size:end])
    return h


class EnvelopeHasher:
    """The envelope's digest over ``[PREFIX_BYTES, size)`` of ``data`` (after ``signed``, whose
    flags byte names the algorithm). For a
    message of at least THREADED_HASH_BYTES a second thread hashes each region as soon as it is
    written (hashlib and numpy's copies both release the GIL), so hashing 61 MB overlaps copying
    it instead of following it; smaller messages are hashed at the end, in this thread."""

    THREADED_HASH_BYTES = 16 << 20

    def __init__(self, data: bytearray, signed: bytes, size: int) -> None:
        self.data, self.size, self.done = data, size, PREFIX_BYTES
        self.h = new_hash(signed[ENVELOPE_FLAGS], signed)
        self.threaded = size >= self.THREADED_HASH_BYTES
        if self.threaded:
            self._q: queue.SimpleQueue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._run, name="envelope-digest", daemon=True)
            self._thread.start()

    def written(self, end: int) -> None:
        self._q.put(end)

    def _run(self) -> None:
        with memoryview(self.data) as view:
            while (end := self._q.get()) is not None:
                if end > self.done:
                    self.h.update(view[self.done:end])
                    self.done = end

    def digest(self) -> bytes:
        if self.threaded:
            self._q.put(self.size)  # the header, zstd sections and anything not reported yet
            self.close()
        else:
            with memoryview(self.data) as view:
                self.h.update(view[PREFIX_BYTES:self.size])
        return self.h.digest()

    def close(self) -> None:
        if self.threaded and self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
