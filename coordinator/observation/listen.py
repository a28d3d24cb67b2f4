"""Where an observer listens: ``HOST:PORT`` parsing and the loopback test (the dashboard, the config)."""
from __future__ import annotations

import ipaddress

LOOPBACK = "127.0.0.1"


def parse_listen(field: str, value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (loopback) -> (host, port); ValueError naming ``field``.

    IPv6 hosts go in brackets (``[::1]:8050``). Port 0 picks a free port."""
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        num = int(port)
    except ValueError:
        raise ValueError(f"{field}: expected HOST:PORT (e.g. 127.0.0.1:8050), got {value!r}") from None
    if not 0 <= num <= 65535:
        raise ValueError(f"{field}: port must be 0..65535, got {num} in {value!r}")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        if host:
            raise ValueError(f"{field}: bad host {host!r} in {value!r}")
        host = LOOPBACK
    return host, num


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
