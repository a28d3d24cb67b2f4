"""Protocol vocabulary shared by both ends: the error type, message kinds and decoder limits.

Everything a receiver refuses is described here, so a reviewer can see the whole attack surface
in one place: every count, shape and size a peer declares is checked against `Limits` before
anything is allocated or decompressed (docs/wire.md).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, fields

from fedpara.validate import check_int

#: Envelope magic ("FedPara Wire Envelope") and version. The decoder accepts any minor version of
#: its own major version (minor versions only add header keys, which older decoders ignore).
ENVELOPE_MAGIC = b"FPWE"
WIRE_MAJOR = 1
WIRE_MINOR = 0
#: The envelope's fixed prefix (docs/wire.md): magic, major, minor, kind, flags, header length H,
#: body length B, then the digest over bytes [0, 20) and everything after the prefix.
ENVELOPE_PREFIX = struct.Struct("<4sBBBBIQ32s")  # 52 bytes
ENVELOPE_DIGEST = slice(20, ENVELOPE_PREFIX.size)
ENVELOPE_FLAGS = 7  # the flags byte's offset
_ENVELOPE_LENGTHS = struct.Struct("<IQ")  # H and B, at byte 8

#: Flag bit 0: the digest is BLAKE3-256 instead of SHA-256. Every other bit is reserved (a
#: decoder refuses a message that sets one). Peers agree on BLAKE3 before using it (docs/wire.md,
#: Digests): a decoder without the ``blake3`` package refuses such messages with a clear error.
FLAG_BLAKE3 = 0x01


def envelope_length(prefix) -> int:
    """52 + H + B: the envelope's length as its first 52 bytes declare it."""
    hlen, blen = _ENVELOPE_LENGTHS.unpack_from(prefix, 8)
    return ENVELOPE_PREFIX.size + hlen + blen


class WireError(ValueError):
    """The one exception the wire module raises for bad input; the message says what was wrong."""


class MessageKind(str, enum.Enum):
    """What a message is for. The byte code on the wire is fixed per kind (never reuse a code)."""

    TASK = "task"  # coordinator -> clients: global factors + round config
    UPDATE = "update"  # client -> coordinator: factors + num_examples + metrics
    STATUS = "status"  # client presence / heartbeat, usually no tensors
    CONTROL = "control"  # coordinator -> clients, e.g. stop

    def __str__(self) -> str:  # "task", not "MessageKind.TASK", in logs and topics
        return self.value

    @property
    def code(self) -> int:
        return _KIND_CODES[self]

    @property
    def uplink(self) -> bool:
        """True for client -> coordinator kinds (they use the uplink codec policy)."""
        return self in (MessageKind.UPDATE, MessageKind.STATUS)

    @classmethod
    def from_code(cls, code: int) -> MessageKind:
        try:
            return _KINDS_BY_CODE[code]
        except KeyError:
            known = ", ".join(f"{c}={k.value}" for c, k in sorted(_KINDS_BY_CODE.items()))
            raise WireError(f"unknown message kind code {code} (known: {known})") from None

    @classmethod
    def coerce(cls, kind: object) -> MessageKind:
        """A MessageKind from itself or its string value; anything else is a WireError."""
        try:
            return cls(kind)
        except ValueError:
            known = ", ".join(k.value for k in cls)
            raise WireError(f"unknown message kind {kind!r} (known: {known})") from None


_KIND_CODES = {MessageKind.TASK: 1, MessageKind.UPDATE: 2, MessageKind.STATUS: 3, MessageKind.CONTROL: 4}
_KINDS_BY_CODE = {c: k for k, c in _KIND_CODES.items()}

_MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts. Defaults fit VGG16 dense fp32 (61 MB) with room to spare."""

    max_tensors: int = field(default=4096, metadata={"help": "tensors per message"})
    max_elements: int = field(default=1 << 26, metadata={"help": "elements in one tensor (64M)"})
    max_decoded_bytes: int = field(
        default=512 * _MiB, metadata={"help": "sum of decoded tensor bytes (float32 for floats)"}
    )
    max_message_bytes: int = field(
        default=256 * _MiB, metadata={"help": "encoded message (envelope) bytes"}
    )
    max_meta_bytes: int = field(
        default=1 * _MiB, metadata={"help": "JSON header bytes (manifest + meta), and each "
                                    "inner safetensors header"}
    )
    max_ndim: int = field(default=8, metadata={"help": "dimensions per tensor"})
    max_name_len: int = field(default=256, metadata={"help": "characters in a tensor name, run id "
                                                      "or sender"})
    max_sections: int = field(default=32, metadata={"help": "compression sections per message"})
    reject_nonfinite: bool = field(
        default=True, metadata={"help": "reject float tensors holding NaN or +-Inf"}
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "reject_nonfinite":
                if not isinstance(value, bool):
                    raise ValueError(f"Limits.reject_nonfinite must be a bool, got {value!r}")
            else:
                check_int(f"Limits.{f.name}", value, min=1)
