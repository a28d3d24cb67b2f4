"""Live client registry, built from retained status messages and last wills (docs/protocol.md)."""
from __future__ import annotations

import dataclasses
import time

from fedpara.runtime.messages import Status


@dataclasses.dataclass
class ClientInfo:
    client_id: str
    online: bool
    num_examples: int = 0
    device: str = ""
    last_seen: float = 0.0


class ClientRegistry:
    """Which clients are online. Status updates are idempotent; the newest one wins."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clients: dict[str, ClientInfo] = {}
        self._clock = clock

    def update(self, client_id: str, status: Status) -> ClientInfo:
        info = ClientInfo(client_id, status.online, status.num_examples, status.device, self._clock())
        self._clients[client_id] = info
        return info

    def mark_offline(self, client_id: str) -> None:
        if client_id in self._clients:
            self._clients[client_id].online = False

    def live(self) -> list[str]:
        return sorted(c for c, info in self._clients.items() if info.online)

    def get(self, client_id: str) -> ClientInfo | None:
        return self._clients.get(client_id)

    def __len__(self) -> int:
        return len(self._clients)
