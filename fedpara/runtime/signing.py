"""Signed messages: Ed25519 device identities, end to end, independent of the broker.

A signed message is an ordinary envelope (docs/wire.md) followed by a 68-byte trailer::

    envelope bytes | b"FPSG" | Ed25519 signature (64 bytes)

The signature is over ``b"fedpara/v1 signature\\0" + digest``, where ``digest`` is the envelope's
own digest (bytes 20..52 of its prefix: SHA-256, or BLAKE3-256 when its flags say so, signed then
under the context ``b"fedpara/v1 signature blake3\\0"`` so that a signature binds the algorithm
too), which covers the kind, run, round, sender, the meta
(task id, ``seq``) and every tensor byte; ``decode`` then checks that digest against the
contents. ``meta["seq"]`` is the sender's clock in nanoseconds, forced strictly increasing: a
receiver accepts a sender's message only if its ``seq`` is newer than the last one it accepted
from that sender and within ``max_age_s`` of its own clock, so nothing can be replayed, neither
within a run nor from an earlier one. Keys: ``fedpara keys new NAME --dir DIR`` writes
``DIR/NAME.key`` (PKCS#8 PEM, mode 0600) and ``DIR/NAME.pub``; a trust directory holds one
``<sender>.pub`` per sender. The crypto is the ``cryptography`` package's; nothing here is
hand-written beyond the framing.
"""
from __future__ import annotations

import dataclasses
import os
import stat
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from fedpara.wire import Encoded, Limits, Message, decode, encode
from fedpara.wire.envelope import PREFIX_BYTES
from fedpara.wire.limits import ENVELOPE_DIGEST, ENVELOPE_FLAGS, FLAG_BLAKE3

TRAILER_MAGIC = b"FPSG"
SIGNATURE_BYTES = 64
TRAILER_BYTES = len(TRAILER_MAGIC) + SIGNATURE_BYTES
_CONTEXT = b"fedpara/v1 signature\0"
_CONTEXT_BLAKE3 = b"fedpara/v1 signature blake3\0"
_DIGEST = ENVELOPE_DIGEST  # the envelope's own digest, bytes 20..52


def _signed_bytes(envelope) -> bytes:
    """What a signature covers: the context of the envelope's digest algorithm, and the digest."""
    context = _CONTEXT_BLAKE3 if envelope[ENVELOPE_FLAGS] & FLAG_BLAKE3 else _CONTEXT
    return context + bytes(envelope[_DIGEST])


class AuthError(ValueError):
    """A message that is not (validly) signed by a trusted sender; ``reason`` is its counter name:
    unsigned, bad_signature, unknown_sender, replayed, stale."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# --- keys --------------------------------------------------------------------------------------
def new_key(name: str, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write DIR/NAME.key (0600) and DIR/NAME.pub; refuses to overwrite an existing key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .topics import check_id

    check_id("key name", name)
    d = Path(directory)
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    key_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    if key_path.exists():
        raise FileExistsError(f"{key_path} exists; delete it first to make a new identity")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    pub_path.chmod(0o644)  # whatever the umask: trust directories refuse .pub files others may write
    return key_path, pub_path


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key; refuses a file that others may read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"key {p} does not exist (make one: fedpara keys new NAME --dir DIR)")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ValueError(f"key {p} is readable by others (mode {mode:04o}); chmod 600 {p}")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"key {p} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"key {p} is not an Ed25519 key")
    return key


def _not_writable_by_others(p: Path, what: str) -> None:
    """Refuse a trust anchor that another local user could replace (as loose private keys are)."""
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o022:
        raise ValueError(f"{what} {p} is writable by others (mode {mode:04o}): anyone on this machine could "
                         f"make their key trusted; chmod go-w {p}")


def load_public_key(path: str | os.PathLike):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"public key {p} does not exist")
    _not_writable_by_others(p, "public key")
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"public key {p} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key {p} is not an Ed25519 key")
    return key


def public_bytes(key) -> bytes:
    """The raw 32 bytes of an Ed25519 public key (or of a private key's public half)."""
    from cryptography.hazmat.primitives import serialization

    if hasattr(key, "public_key"):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_identity(key_path: str | os.PathLike, sender: str, private_key=None) -> None:
    """ValueError in one line when the key at ``key_path`` is evidently not ``sender``'s: the
    ``.pub`` beside it names another identity, or ``<sender>.pub`` beside it holds another key.
    (A key with no ``.pub`` beside it cannot be told apart here: the receiver's log names it.)"""
    p = Path(key_path)
    mine = public_bytes(private_key if private_key is not None else load_private_key(p))
    own_pub, sender_pub = p.with_suffix(".pub"), p.parent / f"{sender}.pub"
    fix = f"start it with --key {p.parent / (sender + '.key')} (fedpara keys new {sender} --dir {p.parent})"
    if p.stem != sender and own_pub.is_file() and public_bytes(load_public_key(own_pub)) == mine:
        raise ValueError(f"key: {p} is the identity of {p.stem!r}, not of {sender!r}: {fix}, or use "
                         f"--client-id {p.stem}")
    if sender_pub.is_file() and public_bytes(load_public_key(sender_pub)) != mine:
        raise ValueError(f"key: {p} does not match {sender_pub} ({sender!r}'s public key): the coordinator "
                         f"would refuse every message of {sender!r}; {fix}")


def load_trust_dir(directory: str | os.PathLike) -> dict:
    """{sender id: public key} from every DIR/<sender>.pub."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"trusted keys directory {d} does not exist")
    _not_writable_by_others(d, "trusted keys directory")
    keys = {p.stem: load_public_key(p) for p in sorted(d.glob("*.pub"))}
    if not keys:
        raise ValueError(f"trusted keys directory {d} holds no *.pub files")
    return keys


# --- signing and verifying ---------------------------------------------------------------------
class Signer:
    """Seals this sender's messages: adds ``meta["seq"]``, encodes, appends the signature."""

    def __init__(self, private_key, sender: str) -> None:
        self.key, self.sender = private_key, sender
        self._seq = 0
        self._lock = threading.Lock()

    def next_seq(self) -> int:
        with self._lock:
            self._seq = max(self._seq + 1, time.time_ns())
            return self._seq

    def seal(self, message: Message, policy=None, *, seq: int | None = None, digest: str = "sha256") -> Encoded:
        """Sign ``message`` with the next ``seq`` (or ``seq``, one taken from ``next_seq``);
        ``digest``: the envelope's digest algorithm (``encode``)."""
        if message.sender != self.sender:
            raise ValueError(f"signer of {self.sender!r} cannot sign a message from {message.sender!r}")
        message = dataclasses.replace(message, meta={**message.meta, "seq": self.next_seq() if seq is None else seq})
        enc = encode(message, policy, reserve=TRAILER_BYTES, digest=digest)  # the trailer goes in place
        data = enc.data
        signature = self.key.sign(_signed_bytes(data))
        data[-TRAILER_BYTES:] = TRAILER_MAGIC + signature
        return dataclasses.replace(enc, chunk_signer=self.key.sign)  # its frames' headers are signed too


class Verifier:
    """Opens sealed messages from trusted senders and refuses replays.

    ``keys`` maps sender ids to public keys; ``max_age_s`` bounds how old (or how far in the
    future, clock skew) a message's ``seq`` may be. Per sender it remembers the newest ``seq``
    accepted; ``remember`` caps how many senders it tracks.
    """

    signed = True

    def __init__(self, keys: Mapping[str, object], *, max_age_s: float = 600.0, clock=time.time_ns,
                 remember: int = 100_000) -> None:
        self.keys, self.max_age_ns, self.clock = dict(keys), int(max_age_s * 1e9), clock
        self._last: dict[str, int] = {}
        self._remember = remember
        self._lock = threading.Lock()

    def open(self, data: bytes, limits=None, *, sender: str, ordered: bool = True,
             digest_checked: bool = False, alias: bool = False) -> Message:
        """The decoded message, if it is signed by the trusted key of ``sender`` (the id its topic
        names) and is fresh; else AuthError (or WireError for a malformed envelope). The signature
        is checked before anything is decoded; replays are tracked per sender and message kind
        (a sender's messages of different kinds may overtake each other on the way).
        ``ordered=False`` leaves age and order to the caller (statuses: see ``fresh``).
        ``digest_checked``: the envelope's digest was verified on reassembly; ``alias``: tensors may
        be views into ``data``, a buffer the caller owns (both: see ``decode``)."""
        from cryptography.exceptions import InvalidSignature

        if len(data) < PREFIX_BYTES + TRAILER_BYTES or data[-TRAILER_BYTES:-SIGNATURE_BYTES] != TRAILER_MAGIC:
            raise AuthError("unsigned", f"no signature trailer on a message from {sender!r}")
        key = self.keys.get(sender)
        if key is None:
            raise AuthError("unknown_sender", f"no trusted key for {sender!r}")
        view = memoryview(data)  # no copy of a (possibly 60 MB) payload
        envelope, signature = view[:-TRAILER_BYTES], view[-SIGNATURE_BYTES:]
        try:
            key.verify(bytes(signature), _signed_bytes(envelope))
        except InvalidSignature:
            raise AuthError("bad_signature", f"signature of {sender!r} does not verify") from None
        msg = decode(envelope, limits if limits is not None else Limits(),  # checks the digest
                     digest_checked=digest_checked, alias=alias)
        return self.admit(msg, sender=sender, ordered=ordered)

    def admit(self, msg: Message, *, sender: str, ordered: bool = True) -> Message:
        """The per-receiver half of :meth:`open`, for a message whose signature and digest were
        verified already (a client pool verifies a broadcast task once for all its clients):
        ``seq`` present, fresh and newer than the last one this receiver accepted."""
        if msg.sender != sender:
            raise AuthError("bad_signature", f"{sender!r} signed a message naming sender {msg.sender!r}")
        seq = msg.meta.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int):
            raise AuthError("bad_signature", "signed message without an int seq")
        if not ordered:
            return msg
        now = self.clock()
        if abs(now - seq) > self.max_age_ns:
            raise AuthError("stale", f"{sender}'s message is {(now - seq) / 1e9:+.0f} s old (clocks: NTP?)")
        slot = (sender, msg.kind.value)
        with self._lock:
            if seq <= self._last.get(slot, 0):
                raise AuthError("replayed", f"{msg.kind} seq {seq} of {sender!r} is not newer than the last accepted")
            if slot not in self._last and len(self._last) >= self._remember:
                raise AuthError("unknown_sender", "too many senders tracked")
            self._last[slot] = seq
        return msg


    def fresh(self, seq: int) -> bool:
        return abs(self.clock() - seq) <= self.max_age_ns

    def chunk_authenticator(self, sender: str):
        """For ``Reassembler(authenticate=...)``: accepts a chunk whose signed header verifies with
        ``sender``'s trusted key and was signed within ``max_age_s`` of our clock. A verified
        header is remembered (a few hundred), so that a pool's clients check a broadcast once."""
        from cryptography.exceptions import InvalidSignature

        key = self.keys.get(sender)

        def authenticate(chunk) -> bool:
            if key is None:
                return False
            if abs(self.clock() - chunk.signed_ns) > self.max_age_ns:
                raise ValueError(f"{sender}'s chunk header is {(self.clock() - chunk.signed_ns) / 1e9:+.0f} s old")
            signed = chunk.signed_bytes()
            cache_key = (sender, signed, chunk.signature)
            if cache_key in _VERIFIED_CHUNKS:
                return True
            try:
                key.verify(chunk.signature, signed)
            except InvalidSignature:
                return False
            with _VERIFIED_LOCK:
                _VERIFIED_CHUNKS[cache_key] = True
                while len(_VERIFIED_CHUNKS) > 512:
                    _VERIFIED_CHUNKS.pop(next(iter(_VERIFIED_CHUNKS)))
            return True
        return authenticate


_VERIFIED_CHUNKS: dict[tuple, bool] = {}  # (sender, signed header, signature) already verified
_VERIFIED_LOCK = threading.Lock()


def endpoints(sender: str, *, insecure: bool, key_path=None, trusted=None, max_age_s: float = 600.0):
    """(sealer, opener) for ``sender``: a Signer with its private key and a Verifier of the
    ``trusted`` keys (a mapping, or a callable returning one, read only in a signed run), or, when
    ``insecure``, plain envelopes both ways (the caller warns)."""
    if insecure:
        return Plain(sender), Plain()
    keys = trusted() if callable(trusted) else trusted
    return Signer(load_private_key(key_path), sender), Verifier(keys, max_age_s=max_age_s)


class Plain:
    """The insecure mode's stand-in for Signer and Verifier: unsigned envelopes, no checks."""

    def __init__(self, sender: str = "") -> None:
        self.sender = sender

    def next_seq(self) -> int:
        return 0

    def seal(self, message: Message, policy=None, *, seq: int | None = None, digest: str = "sha256") -> Encoded:
        return encode(message, policy, digest=digest)

    def chunk_authenticator(self, sender: str):
        return None  # insecure: chunks are not authenticated (docs/security.md)

    signed = False

    def open(self, data: bytes, limits=None, *, sender: str, ordered: bool = True,
             digest_checked: bool = False, alias: bool = False) -> Message:
        return decode(data, limits if limits is not None else Limits(), digest_checked=digest_checked,
                      alias=alias)

    def admit(self, msg: Message, *, sender: str, ordered: bool = True) -> Message:
        return msg
