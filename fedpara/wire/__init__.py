"""The wire format: everything that crosses the network between coordinator and clients.

Both sides import this package and nothing else to talk to each other (docs/architecture.md).
FedPara factors (paper Sec. 2, Alg. 1) travel as safetensors inside a versioned, digested
envelope; codecs (fp32/fp16/bf16/int8, optional zstd) are chosen per direction and per tensor;
envelopes are chunked to the broker's packet limit and every byte is accounted for.
Format specification: docs/wire.md.

    enc = encode(Message("update", run_id, rnd, "client-7", factors, {"num_examples": 600}),
                 WireConfig.preset("fedpaq"))
    frames, stats = enc.split(max_packet=1_000_000, topic="fedpara/run/up/client-7")
    ...
    data = reassembler.add(frame)          # None until complete
    msg = decode(data, Limits())           # WireError on any bad input
"""

from .accounting import TensorStats, WireStats, framed_bytes, mqtt_publish_bytes
from .chunking import CHUNK_HEADER_BYTES, Chunk, max_chunk_payload, parse_chunk, split
from .codecs import INT8_MIN_ROW
from .envelope import PREFIX_BYTES, Encoded, Message, decode, encode
from .limits import WIRE_MAJOR, WIRE_MINOR, Limits, MessageKind, WireError
from .policy import CodecPolicy, CodecSpec, WireConfig
from .reassembly import Reassembler

__all__ = [
    "CHUNK_HEADER_BYTES", "Chunk", "CodecPolicy", "CodecSpec", "Encoded", "INT8_MIN_ROW", "Limits",
    "Message", "MessageKind", "PREFIX_BYTES", "Reassembler", "TensorStats", "WIRE_MAJOR",
    "WIRE_MINOR", "WireConfig", "WireError", "WireStats", "decode", "encode", "framed_bytes",
    "max_chunk_payload", "mqtt_publish_bytes", "parse_chunk", "split",
]
