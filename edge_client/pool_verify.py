"""A client pool's shared check of broadcast messages: verify and decode a task once, not per client.

Every client of a pool (:mod:`edge_client.pool`) receives the same task bytes on its own MQTT
connection. Without sharing, each one checks the signature, hashes the whole envelope and
decodes every tensor: for a 6.2 MB task and 16 clients that is 16 x ~10 ms of one process's
CPU (docs/round.md). With it, the first client to complete the message opens it as usual; a
client whose reassembled bytes are *equal, byte for byte,* to that verified message takes the
decoded message (its tensors shared, read-only: the trainer copies them into its own model) and
runs only its own checks: sender, ``seq`` freshness and replay order (``Verifier.admit``). Bytes
that differ in any way take the full path. Only the newest message is kept. Hashing follows the
same rule: the first client to receive a message's first frame hashes it as it arrives
(:meth:`SharedVerified.claim`); the others' reassemblers do not hash it at all, since their bytes
are compared with the verified ones.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from fedpara.wire import Message
from fedpara.wire.limits import ENVELOPE_DIGEST

WAIT_S = 30.0  # a client waits at most this long for another client's check of the same bytes


class SharedVerified:
    """See the module docstring. Thread-safe; one per pool (its clients trust the same keys)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: bytes | None = None      # the envelope digest the newest message claims
        self._data: bytes | None = None     # its bytes, once verified
        self._msg: Message | None = None    # and its decoded form
        self._done = threading.Event()
        self.hits = self.misses = 0
        self._claimed: OrderedDict[bytes, bool] = OrderedDict()  # digests a client hashes as they arrive

    def claim(self, digest: bytes) -> bool:
        """True for the first of the pool's clients to start receiving the message with this
        envelope digest: its reassembler hashes it as it arrives; the others do not hash it at all
        and compare their bytes with the verified message instead (:meth:`open`)."""
        with self._lock:
            if digest in self._claimed:
                return False
            self._claimed[digest] = True
            while len(self._claimed) > 16:
                self._claimed.popitem(last=False)
            return True

    def open(self, data: bytes, opener, limits, *, sender: str, digest_checked: bool = False,
             alias: bool = False) -> Message:
        key = bytes(data[ENVELOPE_DIGEST])
        with self._lock:
            first = key != self._key
            if first:  # this client checks it; the others wait for its verdict
                self._key, self._data, self._msg, done = key, None, None, threading.Event()
                self._done = done
            else:
                done = self._done
        if first:
            try:
                msg = opener.open(data, limits, sender=sender, digest_checked=digest_checked, alias=alias)
                with self._lock:
                    if self._key == key:
                        self._data, self._msg = data, msg
                    self.misses += 1
                return msg
            finally:
                done.set()
        done.wait(WAIT_S)
        with self._lock:
            msg = self._msg
            same = msg is not None and self._data == data  # the same bytes: the same verdict
            if same:
                self.hits += 1
            else:
                self.misses += 1
        if same:
            return opener.admit(msg, sender=sender)
        return opener.open(data, limits, sender=sender, digest_checked=digest_checked, alias=alias)
