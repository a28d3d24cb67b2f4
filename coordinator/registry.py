"""Live client registry, built from retained status messages and last wills (docs/protocol.md)."""
from __future__ import annotations

import dataclasses
import threading
import time

from fedpara.runtime.messages import Status


@dataclasses.dataclass
class ClientInfo:
    client_id: str
    online: bool
    num_examples: int = 0
    device: str = ""
    last_seen: float = 0.0
    heartbeat_s: float = 0.0  # 0: the client does not heartbeat; it never times out
    connection: int = 0       # the client's (re)connect count, from its status
    digests: tuple[str, ...] = ("sha256",)  # envelope digests it can check, from its status


MISSED_HEARTBEATS = 3  # a client silent for this many heartbeat periods is gone, last will or not


class ClientRegistry:
    """Which clients are online. Status updates are idempotent; the newest one wins."""

    def __init__(self, clock=time.monotonic, max_clients: int = 100_000) -> None:
        self._clients: dict[str, ClientInfo] = {}
        self._clock = clock
        self.max_clients = max_clients
        # client -> (newest signed status seq, its session, whether that session's will was applied)
        self._order: dict[str, tuple[int, int, bool]] = {}
        self._lock = threading.Lock()  # writers: the coordinator thread; readers: also a dashboard

    def update(self, client_id: str, status: Status) -> ClientInfo:
        """Record a status; ValueError when the registry is full and ``client_id`` is new."""
        if client_id not in self._clients and len(self._clients) >= self.max_clients:
            raise ValueError(f"registry full ({self.max_clients} clients): status of {client_id} ignored")
        info = ClientInfo(client_id, status.online, status.num_examples, status.device, self._clock(),
                          status.heartbeat_s, status.connection, status.digests)
        with self._lock:
            self._clients[client_id] = info
        return info

    def signed_status_order(self, client_id: str, seq: int, status: Status, fresh: bool) -> str:
        """"ok" when a signed status may be applied: it is newer than the client's last one and
        fresh, or it is the last will of the client's current connection (sealed before it
        connected, so older: its ``seq`` equals the ``session`` that connection's statuses carry),
        applied once. The will of an earlier connection (the client seals one per connection) is
        older than the newest online status's session and refused, however often the broker's copy
        is replayed. Else the counter to bump: "replayed" or "stale"."""
        last = self._order.get(client_id)
        if (last is None or seq > last[0]) and fresh:
            if last is None and len(self._order) >= self.max_clients:
                return "stale"
            will = not status.online and status.session == seq  # a will, applied now: not again
            self._order[client_id] = (seq, status.session, will)
            return "ok"
        if not status.online and last is not None and status.session == last[1] == seq and not last[2]:
            self._order[client_id] = (last[0], last[1], True)
            return "ok"
        return "replayed" if fresh else "stale"

    def touch(self, client_id: str) -> None:
        """``client_id`` was heard from other than by a status (a frame of its update arrived): it
        is alive. On a narrow uplink a heartbeat waits behind the update in the same connection,
        for as long as the update takes (a dense VGG16 at 2 Mbit/s: minutes)."""
        with self._lock:
            info = self._clients.get(client_id)
            if info is not None and info.online:
                self._clients[client_id] = dataclasses.replace(info, last_seen=self._clock())

    def mark_offline(self, client_id: str) -> None:
        with self._lock:
            if client_id in self._clients:
                self._clients[client_id] = dataclasses.replace(self._clients[client_id], online=False)

    def snapshot(self) -> list[tuple[ClientInfo, bool]]:
        """``(info, live)`` for every known client, sorted by id: copies, safe from any thread."""
        with self._lock:
            infos = list(self._clients.values())
        return [(info, self.is_live(info.client_id)) for info in sorted(infos, key=lambda i: i.client_id)]

    def is_live(self, client_id: str) -> bool:
        """Online, and heard from within ``MISSED_HEARTBEATS`` of its heartbeat periods."""
        info = self._clients.get(client_id)
        if info is None or not info.online:
            return False
        return info.heartbeat_s <= 0 or self._clock() - info.last_seen <= MISSED_HEARTBEATS * info.heartbeat_s

    def live(self) -> list[str]:
        return sorted(c for c in self._clients if self.is_live(c))

    def get(self, client_id: str) -> ClientInfo | None:
        return self._clients.get(client_id)

    def __len__(self) -> int:
        return len(self._clients)
