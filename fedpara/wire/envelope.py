"""The envelope: one versioned binary message carrying tensors as safetensors.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"FPWE"
    4       1     major version (1)      an unknown major version is rejected
    5       1     minor version (0)      newer minors only add header keys (ignored here)
    6       1     kind code              1 task, 2 update, 3 status, 4 control
    7       1     flags                  bit 0: the digest is BLAKE3-256, not SHA-256; the
                                         other bits are reserved (refused)
    8       4     header length H        <= Limits.max_meta_bytes
    12      8     body length B
    20      32    digest (SHA-256, or BLAKE3-256: flags bit 0) over bytes [0, 20) + header + body
    52      H     header: compact UTF-8 JSON, see below
    52+H    B     body: sections back to back; each is one safetensors file, zstd-compressed
                  as a whole when its level is not null

Header JSON::

    {"run": str, "round": int, "sender": str, "meta": {...},
     "sections": [[zstd_level | null, raw_len, stored_len], ...],
     "tensors": [[name, torch dtype, shape, codec, section index], ...]}

Tensors are grouped into one section per zstd level, so compression sees whole messages rather
than single tensors. Decoding checks, in order: sizes of the fixed header, magic, version, kind,
flags, total length, the digest, then every declared count/shape/size in the header against
`Limits`, and only then decompresses (to exactly the declared size) and parses each section.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import zstandard

from . import blob
from .accounting import TensorStats, WireStats
from .codecs import decode_tensor, encode_tensor, expected_parts, finite, is_float
from .limits import (
    ENVELOPE_DIGEST,
    ENVELOPE_MAGIC,
    ENVELOPE_PREFIX,
    FLAG_BLAKE3,
    WIRE_MAJOR,
    WIRE_MINOR,
    Limits,
    MessageKind,
    WireError,
)
from .digest import EnvelopeHasher, digest_flags, envelope_hash
from .policy import CodecPolicy, CodecSpec, WireConfig

_PREFIX = ENVELOPE_PREFIX
PREFIX_BYTES = _PREFIX.size  # 52
_SIGNED = ENVELOPE_DIGEST.start  # bytes of the prefix covered by the digest (everything before it)
_RESERVED_NAMES = ("__metadata__",)


@dataclass
class Message:
    """One protocol message. Float tensors decode as float32 (raw codec: original dtype)."""

    kind: MessageKind
    run_id: str = ""
    round: int = 0
    sender: str = ""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = MessageKind.coerce(self.kind)


@dataclass(frozen=True)
class Encoded:
    """An encoded message: the bytes to send (a bytearray, built in place) and what they cost."""

    data: bytes | bytearray
    stats: WireStats
    # a signed run's sender key (bytes -> Ed25519 signature): frames get a signed header (version 3)
    chunk_signer: Any = field(default=None, compare=False, repr=False)

    def split(
        self, max_packet: int, topic: str, *, qos: int = 1, protocol: int = 4,
        properties_len: int = 0,
    ) -> tuple[list[bytes], WireStats]:
        """Chunk frames for this topic, and stats with the MQTT-framed bytes filled in."""
        from .chunking import split

        chunks = split(self.data, max_packet, topic, qos=qos, protocol=protocol,
                       properties_len=properties_len, envelope=True, sign=self.chunk_signer)
        return chunks, self.stats.framed(chunks, topic, qos=qos, protocol=protocol,
                                         properties_len=properties_len)


def _resolve_policy(policy: CodecPolicy | WireConfig | str | None, kind: MessageKind) -> CodecPolicy:
    if policy is None:
        return CodecPolicy()
    if isinstance(policy, WireConfig):
        return policy.policy_for(kind)
    try:
        return CodecPolicy.parse(policy)
    except ValueError as e:
        raise WireError(f"bad codec policy: {e}") from None


def encode(
    msg: Message,
    policy: CodecPolicy | WireConfig | str | None = None,
    *,
    generator: torch.Generator | None = None,
    reserve: int = 0,
    digest: str = "sha256",
) -> Encoded:
    """Encode msg. policy: a CodecPolicy, its string form, or a WireConfig (picked by kind).

    generator seeds int8 stochastic rounding. ``reserve`` zero bytes follow the envelope in
    ``data`` (a signer writes its trailer there instead of copying the message); the stats
    count the envelope only. ``digest``: "sha256" or "blake3" (about 4x faster here; the
    receiver must support it: docs/wire.md, Digests). ``data`` is a bytearray. Raises WireError
    for a message it cannot encode.
    """
    if not isinstance(msg, Message):
        raise WireError(f"encode expects a Message, got {type(msg).__name__}")
    kind = MessageKind.coerce(msg.kind)
    pol = _resolve_policy(policy, kind)
    flags = digest_flags(digest)
    for what, value in (("run_id", msg.run_id), ("sender", msg.sender)):
        if not isinstance(value, str):
            raise WireError(f"Message.{what} must be a str, got {type(value).__name__}")
    if type(msg.round) is not int or not -(1 << 63) <= msg.round < (1 << 63):
        raise WireError(f"Message.round must be a 64-bit int, got {msg.round!r}")
    if not isinstance(msg.meta, dict) or not isinstance(msg.tensors, dict):
        raise WireError("Message.meta and Message.tensors must be dicts")

    sections: dict[int | None, list] = {}  # zstd level -> blob entries, in first-use order
    manifest, per_tensor, inner_names = [], {}, set()
    raw_bytes = tensor_bytes = 0
    for name, t in msg.tensors.items():
        if not isinstance(name, str) or not name or name in _RESERVED_NAMES:
            raise WireError(f"bad tensor name {name!r}")
        used, parts = encode_tensor(t, pol.for_tensor(name), generator)
        if used.zstd_level not in sections:
            sections[used.zstd_level] = []
        entries = sections[used.zstd_level]
        for suffix, (code, shape, arr) in parts.items():
            if name + suffix in inner_names:
                raise WireError(f"tensor name {name + suffix!r} collides with another tensor")
            inner_names.add(name + suffix)
            entries.append((name + suffix, code, shape, arr))
        dtype_name = str(t.dtype).removeprefix("torch.")
        section = list(sections).index(used.zstd_level)
        manifest.append([name, dtype_name, list(t.shape), str(used), section])
        raw = t.numel() * (4 if t.is_floating_point() else t.element_size())
        enc = sum(arr.nbytes for _, _, arr in parts.values())
        per_tensor[name] = TensorStats(str(used), raw, enc)
        raw_bytes += raw
        tensor_bytes += enc

    bodies, section_table = [], []  # per section: a blob layout (written in place) or zstd bytes
    for level, entries in sections.items():
        if level is None:
            layout = blob.Layout(entries)
            bodies.append((layout, entries))
            section_table.append([level, layout.size, layout.size])
        else:
            raw_blob = blob.write(entries)
            stored = zstandard.ZstdCompressor(level=level).compress(raw_blob)
            bodies.append((stored, None))
            section_table.append([level, len(raw_blob), len(stored)])
    header_obj = {"run": msg.run_id, "round": msg.round, "sender": msg.sender, "meta": msg.meta,
                  "sections": section_table, "tensors": manifest}
    try:
        header = json.dumps(header_obj, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise WireError(f"Message.meta is not JSON-serialisable: {e}") from None
    # JSON may end in spaces: pad so the body starts 8-aligned, and with it (safetensors pads its
    # own header to 8) every tensor of the first section; a decoder can then alias them in place
    header += b" " * (-(PREFIX_BYTES + len(header)) % 8)
    body_len = sum(s[2] for s in section_table)
    size = PREFIX_BYTES + len(header) + body_len
    # one buffer, each tensor copied once into its place (plus room for a signature trailer)
    data = bytearray(size + reserve)
    pos = PREFIX_BYTES + len(header)
    data[PREFIX_BYTES:pos] = header
    signed = _PREFIX.pack(ENVELOPE_MAGIC, WIRE_MAJOR, WIRE_MINOR, kind.code, flags, len(header),
                          body_len, b"")[:_SIGNED]
    hasher = EnvelopeHasher(data, signed, size)  # a big message is hashed while it is being written
    try:
        for body, entries in bodies:
            if entries is not None:
                blob.write_into(data, pos, body, entries, hasher.written if hasher.threaded else None)
                pos += body.size
            else:
                data[pos:pos + len(body)] = body
                pos += len(body)
        digest = hasher.digest()
    finally:
        hasher.close()
    data[:PREFIX_BYTES] = signed + digest
    stats = WireStats(raw_bytes=raw_bytes, tensor_bytes=tensor_bytes, payload_bytes=size,
                      header_bytes=PREFIX_BYTES + len(header), tensors=per_tensor)
    return Encoded(data, stats)


# --------------------------------------------------------------------------------------------
# decoding


def _str_field(header: dict, key: str, limits: Limits) -> str:
    value = header.get(key)
    if not isinstance(value, str) or len(value) > limits.max_name_len:
        raise WireError(f"header field {key!r} must be a str of at most {limits.max_name_len} "
                        f"characters, got {type(value).__name__}")
    return value


def _int(value: Any, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise WireError(f"{what} must be an int in [{lo}, {hi}], got {value!r:.40}")
    return value


def _parse_sections(raw: Any, body_len: int, limits: Limits) -> list[tuple[int | None, int, int]]:
    if not isinstance(raw, list) or len(raw) > limits.max_sections:
        raise WireError(f"header 'sections' must be a list of at most {limits.max_sections}")
    out = []
    for i, s in enumerate(raw):
        if not isinstance(s, list) or len(s) != 3:
            raise WireError(f"section {i}: expected [zstd_level, raw_len, stored_len]")
        level, raw_len, stored = s
        if level is not None:
            _int(level, f"section {i} zstd level", 1, 22)
        _int(raw_len, f"section {i} raw length", 8)
        if raw_len > limits.max_decoded_bytes + 8 + limits.max_meta_bytes:
            raise WireError(f"section {i} would decompress to {raw_len} bytes, more than "
                            f"max_decoded_bytes + max_meta_bytes allow")
        _int(stored, f"section {i} stored length", 0, body_len)
        if level is None and stored != raw_len:
            raise WireError(f"section {i}: uncompressed but stored {stored} != raw {raw_len}")
        out.append((level, raw_len, stored))
    if sum(s[2] for s in out) != body_len:
        raise WireError(f"sections add up to {sum(s[2] for s in out)} bytes, body has {body_len}")
    return out


def _parse_manifest(raw: Any, sections: list, limits: Limits) -> list:
    """Validated [(name, dtype, shape, codec, section)]; enforces every size limit."""
    if not isinstance(raw, list) or len(raw) > limits.max_tensors:
        raise WireError(f"header 'tensors' must be a list of at most {limits.max_tensors}")
    out, names, decoded_bytes = [], set(), 0
    for i, entry in enumerate(raw):
        if not isinstance(entry, list) or len(entry) != 5:
            raise WireError(f"tensor entry {i}: expected [name, dtype, shape, codec, section]")
        name, dtype_name, shape, codec_text, section = entry
        if (not isinstance(name, str) or not 0 < len(name) <= limits.max_name_len
                or name in _RESERVED_NAMES or name in names):
            raise WireError(f"tensor entry {i}: bad or repeated name {name!r:.80}")
        names.add(name)
        if not isinstance(dtype_name, str) or dtype_name not in blob.TORCH_NAMES:
            raise WireError(f"tensor {name!r}: unknown dtype {dtype_name!r:.40}")
        if not isinstance(shape, list) or len(shape) > limits.max_ndim:
            raise WireError(f"tensor {name!r}: shape must be a list of at most "
                            f"{limits.max_ndim} dims")
        shape = tuple(_int(d, f"tensor {name!r}: dimension") for d in shape)
        numel = math.prod(shape)
        if numel > limits.max_elements:
            raise WireError(f"tensor {name!r}: {numel} elements exceed max_elements "
                            f"{limits.max_elements}")
        try:
            codec = CodecSpec.parse(codec_text)
        except ValueError:
            raise WireError(f"tensor {name!r}: unknown codec {codec_text!r:.40}") from None
        _int(section, f"tensor {name!r}: section", 0, len(sections) - 1)
        if codec.zstd_level != sections[section][0]:
            raise WireError(f"tensor {name!r}: codec {codec} disagrees with its section's zstd "
                            f"level {sections[section][0]}")
        decoded_bytes += numel * (4 if is_float(dtype_name) and codec.dtype != "raw"
                                  else blob.itemsize(blob.TORCH_NAMES[dtype_name]))
        if decoded_bytes > limits.max_decoded_bytes:
            raise WireError(f"tensors decode to more than max_decoded_bytes "
                            f"{limits.max_decoded_bytes}")
        out.append((name, dtype_name, shape, codec, section))
    return out


def _decompress(stored: memoryview, level: int | None, raw_len: int, i: int) -> memoryview:
    if level is None:
        return stored
    try:
        params = zstandard.get_frame_parameters(stored)
        if params.content_size != raw_len:
            raise WireError(f"section {i}: zstd frame declares {params.content_size} bytes, "
                            f"header declares {raw_len}")
        out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_len)
    except zstandard.ZstdError as e:
        raise WireError(f"section {i}: zstd data is corrupt ({e})") from None
    if len(out) != raw_len:
        raise WireError(f"section {i}: decompressed to {len(out)} bytes, expected {raw_len}")
    return memoryview(out)


def decode(data: bytes | bytearray | memoryview, limits: Limits = Limits(), *,
           digest_checked: bool = False, alias: bool = False) -> Message:
    """Decode one envelope. Any bad input raises WireError and nothing else.

    ``digest_checked``: the caller verified the envelope's digest against its contents already
    (``Reassembler.checked``: hashed as its frames arrived), so it is not taken twice.
    ``alias``: raw and fp32 tensors that lie aligned in a writable ``data`` (a bytearray the caller
    owns and will not change) are views into it instead of copies."""
    try:
        return _decode(data, limits, digest_checked, alias)
    except WireError:
        raise
    except (MemoryError, RecursionError, ValueError, TypeError, KeyError, IndexError,
            OverflowError) as e:  # defence in depth: a check above should have caught it
        raise WireError(f"malformed message ({type(e).__name__}: {e})") from None


def _decode(data: bytes | bytearray | memoryview, limits: Limits, digest_checked: bool = False,
            alias: bool = False) -> Message:
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise WireError(f"decode expects bytes, got {type(data).__name__}") from None
    if len(buf) > limits.max_message_bytes:
        raise WireError(f"message is {len(buf)} bytes, max_message_bytes is "
                        f"{limits.max_message_bytes}")
    if len(buf) < PREFIX_BYTES:
        raise WireError(f"message too short ({len(buf)} bytes, the fixed header is {PREFIX_BYTES})")
    magic, major, minor, kind_code, flags, hlen, body_len, digest = _PREFIX.unpack_from(buf)
    if magic != ENVELOPE_MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r} (expected {ENVELOPE_MAGIC!r})")
    if major != WIRE_MAJOR:
        raise WireError(f"unsupported wire version {major}.{minor} (this decoder speaks "
                        f"{WIRE_MAJOR}.x)")
    kind = MessageKind.from_code(kind_code)
    if flags & ~FLAG_BLAKE3:
        raise WireError(f"unknown flags 0x{flags:02x} in a version {major} message")
    if hlen > limits.max_meta_bytes:
        raise WireError(f"header is {hlen} bytes, max_meta_bytes is {limits.max_meta_bytes}")
    if PREFIX_BYTES + hlen + body_len != len(buf):
        raise WireError(f"length mismatch: header {hlen} + body {body_len} + {PREFIX_BYTES} != "
                        f"{len(buf)} bytes received")
    if not digest_checked:
        if envelope_hash(buf, len(buf)).digest() != digest:  # WireError: BLAKE3 without blake3
            raise WireError(f"{'blake3' if flags & FLAG_BLAKE3 else 'sha256'} mismatch: message corrupted "
                            "or truncated")

    try:
        header = json.loads(bytes(buf[PREFIX_BYTES:PREFIX_BYTES + hlen]))
    except (ValueError, RecursionError) as e:
        raise WireError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    run_id = _str_field(header, "run", limits)
    sender = _str_field(header, "sender", limits)
    rnd = _int(header.get("round"), "header field 'round'", -(1 << 63))
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise WireError("header field 'meta' must be a JSON object")
    sections = _parse_sections(header.get("sections"), body_len, limits)
    manifest = _parse_manifest(header.get("tensors"), sections, limits)

    expected: list[dict] = [{} for _ in sections]  # per section: inner name -> (code, shape)
    for name, dtype_name, shape, codec, section in manifest:
        for suffix, spec in expected_parts(codec, dtype_name, shape).items():
            if name + suffix in expected[section]:
                raise WireError(f"tensor name {name + suffix!r} collides with another tensor")
            expected[section][name + suffix] = spec
    for section, exp in enumerate(expected):  # sizes are bounded now; check raw vs declared
        data_bytes = blob.data_size(list(exp.values()))
        raw_len = sections[section][1]
        if not data_bytes + 8 <= raw_len <= data_bytes + 8 + limits.max_meta_bytes:
            raise WireError(f"section {section}: raw length {raw_len} does not fit its "
                            f"{data_bytes} bytes of tensors")

    arrays: dict[str, Any] = {}
    offset = PREFIX_BYTES + hlen
    for i, (level, raw_len, stored) in enumerate(sections):
        raw = _decompress(buf[offset:offset + stored], level, raw_len, i)
        offset += stored
        arrays.update(blob.read(raw, expected[i], max_header=limits.max_meta_bytes,
                                where=f"section {i}"))

    tensors = {}
    for name, dtype_name, shape, codec, _ in manifest:
        suffixes = expected_parts(codec, dtype_name, shape)
        t = decode_tensor(codec, dtype_name, {s: arrays[name + s] for s in suffixes}, alias=alias,
                          shape=shape)
        if limits.reject_nonfinite and t.is_floating_point() and not finite(t):
            raise WireError(f"tensor {name!r} contains NaN or Inf")
        tensors[name] = t
    return Message(kind=kind, run_id=run_id, round=rnd, sender=sender, tensors=tensors, meta=meta)
