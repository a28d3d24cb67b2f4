"""Byte accounting: what really crosses the wire, counted at the single point that encodes it.

Three numbers per message:

- ``raw_bytes``: the tensors as float32 (non-float tensors at their own size), i.e. what a naive
  fp32 state dict would cost;
- ``payload_bytes``: the encoded envelope (``len(Encoded.data)``);
- ``framed_bytes``: the sum, over the chunk frames, of the complete MQTT PUBLISH packet (fixed
  header + remaining-length varint + topic + packet id + MQTT 5 properties + payload), computed
  exactly from MQTT 3.1.1 section 3.3 / MQTT 5.0 section 3.3. TCP/IP and TLS framing are not
  counted (they depend on the path, not on us).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

#: The largest MQTT "Remaining Length" (four varint bytes), MQTT 3.1.1 sec. 2.2.3.
MAX_REMAINING_LENGTH = 268_435_455


def varint_len(n: int) -> int:
    """Bytes of MQTT's variable byte integer for n (1..4)."""
    if n < 0 or n > MAX_REMAINING_LENGTH:
        raise ValueError(f"MQTT variable byte integer out of range: {n}")
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def mqtt_publish_bytes(
    topic: str | bytes,
    payload_len: int,
    *,
    qos: int = 1,
    protocol: int = 4,
    properties_len: int = 0,
) -> int:
    """Exact size of one MQTT PUBLISH packet carrying payload_len bytes on topic.

    protocol is the MQTT protocol level: 3 (3.1), 4 (3.1.1) or 5 (5.0). properties_len is the
    length of the MQTT 5 PUBLISH properties (0 when none; must be 0 before MQTT 5).
    """
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
    if protocol not in (3, 4, 5):
        raise ValueError(f"protocol must be 3, 4 or 5 (MQTT 3.1, 3.1.1, 5.0), got {protocol!r}")
    if payload_len < 0 or properties_len < 0:
        raise ValueError("payload_len and properties_len must be >= 0")
    if protocol != 5 and properties_len:
        raise ValueError("properties_len must be 0 before MQTT 5 (protocol=5)")
    topic_len = len(topic.encode("utf-8") if isinstance(topic, str) else topic)
    if topic_len > 0xFFFF:
        raise ValueError(f"MQTT topic is {topic_len} bytes, the limit is 65535")
    remaining = 2 + topic_len + (2 if qos else 0) + payload_len
    if protocol == 5:
        remaining += varint_len(properties_len) + properties_len
    if remaining > MAX_REMAINING_LENGTH:
        raise ValueError(f"MQTT packet too large: remaining length {remaining}")
    return 1 + varint_len(remaining) + remaining


def framed_bytes(
    chunks: Iterable[bytes | int],
    topic: str | bytes,
    *,
    qos: int = 1,
    protocol: int = 4,
    properties_len: int = 0,
) -> int:
    """Sum of MQTT PUBLISH packet sizes for chunk frames (or their lengths) sent on topic."""
    return sum(
        mqtt_publish_bytes(
            topic, c if isinstance(c, int) else len(c),
            qos=qos, protocol=protocol, properties_len=properties_len,
        )
        for c in chunks
    )


@dataclass(frozen=True)
class TensorStats:
    """One tensor's share: codec actually used, raw (float32) bytes, codec output bytes."""

    codec: str
    raw_bytes: int
    encoded_bytes: int  # codec output before zstd, int8 scales included


@dataclass(frozen=True)
class WireStats:
    """Bytes of one message at each layer. Chunk/MQTT fields are 0 until `framed()` fills them."""

    raw_bytes: int = field(metadata={"help": "tensors as float32 (non-floats at own size)"})
    tensor_bytes: int = field(metadata={"help": "codec output before zstd"})
    payload_bytes: int = field(metadata={"help": "encoded envelope, len(Encoded.data)"})
    header_bytes: int = field(metadata={"help": "envelope fixed header + JSON manifest"})
    tensors: Mapping[str, TensorStats] = field(default_factory=dict, repr=False)
    chunks: int = field(default=0, metadata={"help": "chunk frames"})
    chunk_bytes: int = field(default=0, metadata={"help": "sum of chunk frame lengths"})
    framed_bytes: int = field(default=0, metadata={"help": "sum of MQTT PUBLISH packet sizes"})

    def framed(
        self,
        chunks: Iterable[bytes],
        topic: str | bytes,
        *,
        qos: int = 1,
        protocol: int = 4,
        properties_len: int = 0,
    ) -> WireStats:
        """A copy with the chunk and MQTT numbers for these chunk frames on this topic."""
        lengths = [len(c) for c in chunks]
        return replace(
            self,
            chunks=len(lengths),
            chunk_bytes=sum(lengths),
            framed_bytes=framed_bytes(
                lengths, topic, qos=qos, protocol=protocol, properties_len=properties_len
            ),
        )

    @property
    def compression(self) -> float:
        """raw_bytes / payload_bytes (how many times smaller than plain float32)."""
        return self.raw_bytes / self.payload_bytes if self.payload_bytes else float("inf")

    @property
    def framing_overhead(self) -> float:
        """(framed - payload) / payload: chunk headers + MQTT headers, as a fraction."""
        if not self.framed_bytes or not self.payload_bytes:
            return 0.0
        return (self.framed_bytes - self.payload_bytes) / self.payload_bytes

    def as_dict(self) -> dict:
        """JSON-ready summary (per-tensor breakdown left out: log it separately if wanted)."""
        return {
            "raw_bytes": self.raw_bytes,
            "tensor_bytes": self.tensor_bytes,
            "payload_bytes": self.payload_bytes,
            "header_bytes": self.header_bytes,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "framed_bytes": self.framed_bytes,
        }
