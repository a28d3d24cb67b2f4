"""Socket-level byte counters from the kernel (Linux ``TCP_INFO``), for per-connection accounting.

The wire layer counts what *we* put into MQTT (``fedpara.wire.accounting``: payload and framed
PUBLISH bytes). This module reads what the kernel's TCP stack moved on one connection, which also
includes every other MQTT packet on it (CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBACK, PINGREQ/RESP,
retained status, DISCONNECT) and, for ``mqtts://``, TLS records. It does not include TCP/IP
headers, retransmissions or the SYN/FIN (see docs/bandwidth.md).

``getsockopt(IPPROTO_TCP, TCP_INFO)`` returns ``struct tcp_info`` (include/uapi/linux/tcp.h). The
two counters used here were added in Linux 4.1 (RFC 4898 names in brackets)::

    offset 120  __u64 tcpi_bytes_acked      bytes we sent that the peer acknowledged
                                            [tcpEStatsAppHCThruOctetsAcked]
    offset 128  __u64 tcpi_bytes_received   bytes of in-order data received
                                            [tcpEStatsAppHCThruOctetsReceived]

and, since Linux 4.19 / 4.6, optionally used by :func:`tcp_counters`::

    offset  24  __u32 tcpi_unacked          segments sent, not yet acknowledged
    offset 144  __u32 tcpi_notsent_bytes    bytes in the send queue not yet sent (4.6)
    offset 200  __u64 tcpi_bytes_sent       data bytes sent, retransmissions included (4.19)
    offset 208  __u64 tcpi_bytes_retrans    data bytes retransmitted (4.19)

The layout before them is fixed by the uapi (8 x u8, 24 x u32 -> 104, then u64 pacing_rate at
104 and max_pacing_rate at 112). A kernel that is older than a field returns a shorter struct; we
check the returned length and report the field as unavailable instead of reading garbage.

"Sent" is taken as ``tcpi_bytes_acked``: bytes that reached the peer. Bytes still in flight when
you read it are not in it yet; read after the application has waited for its PUBACKs, or call
:func:`wait_acked` first.
"""
from __future__ import annotations

import socket
import struct
import sys
import time
from dataclasses import dataclass

__all__ = ["TCP_INFO_LEN", "TcpCounters", "tcp_bytes", "tcp_counters", "wait_acked", "supported"]

# Socket option number: linux/tcp.h "#define TCP_INFO 11". Python exposes socket.TCP_INFO on Linux.
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: bytes requested from the kernel (sizeof(struct tcp_info) is 232 on 6.x; ask for more, it trims)
TCP_INFO_LEN = 512

_TCP_LISTEN = 10            # tcpi_state of a listening socket (no connection, no counters)
_OFF_UNACKED = 24           # __u32
_OFF_BYTES_ACKED = 120      # __u64
_OFF_BYTES_RECEIVED = 128   # __u64
_OFF_NOTSENT = 144          # __u32
_OFF_BYTES_SENT = 200       # __u64
_OFF_BYTES_RETRANS = 208    # __u64


@dataclass(frozen=True)
class TcpCounters:
    """One TCP_INFO reading. Optional fields are None when the kernel does not report them."""

    bytes_acked: int
    bytes_received: int
    bytes_sent: int | None = None       # includes retransmitted bytes
    bytes_retrans: int | None = None
    notsent_bytes: int | None = None    # still in the send queue
    unacked_segments: int | None = None
    info_len: int = 0                   # length of struct tcp_info the kernel returned
    state: int = 0                      # tcpi_state (1 = ESTABLISHED, see linux/tcp_states.h)


def supported() -> bool:
    """True on Linux (where TCP_INFO carries the byte counters, kernel >= 4.1)."""
    return sys.platform.startswith("linux")


def _raw(sock) -> bytes | None:
    if not supported() or sock is None:
        return None
    try:
        if sock.fileno() < 0:
            return None
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, TCP_INFO_LEN)
    except (OSError, AttributeError, ValueError):
        return None


def _u64(buf: bytes, off: int) -> int | None:
    return struct.unpack_from("=Q", buf, off)[0] if len(buf) >= off + 8 else None


def _u32(buf: bytes, off: int) -> int | None:
    return struct.unpack_from("=I", buf, off)[0] if len(buf) >= off + 4 else None


def tcp_counters(sock) -> TcpCounters | None:
    """All byte counters of a connected TCP socket, or None when unavailable.

    ``sock`` is a ``socket.socket`` (an ``ssl.SSLSocket`` works: it counts TLS bytes). None on
    non-Linux systems, closed or non-TCP sockets, or kernels older than 4.1.
    """
    buf = _raw(sock)
    if buf is None:
        return None
    acked, received = _u64(buf, _OFF_BYTES_ACKED), _u64(buf, _OFF_BYTES_RECEIVED)
    if acked is None or received is None:
        return None
    state = buf[0]
    if state == _TCP_LISTEN:
        return None
    return TcpCounters(acked, received, bytes_sent=_u64(buf, _OFF_BYTES_SENT),
                       bytes_retrans=_u64(buf, _OFF_BYTES_RETRANS),
                       notsent_bytes=_u32(buf, _OFF_NOTSENT),
                       unacked_segments=_u32(buf, _OFF_UNACKED), info_len=len(buf), state=state)


def tcp_bytes(sock) -> tuple[int, int] | None:
    """``(bytes_sent, bytes_received)`` of a connected TCP socket via TCP_INFO, else None.

    bytes_sent is ``tcpi_bytes_acked`` (payload bytes the peer acknowledged: no TCP/IP headers,
    no retransmitted copies, no SYN/FIN); bytes_received is ``tcpi_bytes_received`` (in-order
    payload bytes received). Sequence-space quirk: the side that connected (paho's client) has
    bytes_sent = data + 1 (the SYN is acknowledged as one byte), and a FIN adds 1 to the sender's
    bytes_sent and the receiver's bytes_received. None for listening sockets.
    For paho: ``tcp_bytes(client.socket())`` (None while disconnected).
    """
    c = tcp_counters(sock)
    return None if c is None else (c.bytes_acked, c.bytes_received)


def wait_acked(sock, timeout: float = 2.0) -> bool:
    """Wait until nothing is left unsent or unacknowledged on ``sock`` (True), or timeout (False)."""
    deadline = time.monotonic() + timeout
    while True:
        c = tcp_counters(sock)
        if c is None:
            return False
        if not c.unacked_segments and not c.notsent_bytes:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
