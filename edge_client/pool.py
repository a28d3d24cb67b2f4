"""Client pool: M logical edge clients in one process, each with its own MQTT connection, id and
data partition, training one at a time (a shared lock), so that experiments with 100 clients on
one host still go through the real protocol and the real broker."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from fedpara.data import parse_data_spec
from fedpara.runtime.mqtt import BrokerURL

from .client import EdgeClient
from .config import ClientConfig
from .pool_verify import SharedVerified

log = logging.getLogger(__name__)


def pool_configs(base: ClientConfig, size: int, offset: int = 0) -> list[ClientConfig]:
    """Configs for clients ``offset .. offset+size-1``: id ``<base id>-NNN``, data index i."""
    if size < 1:
        raise ValueError(f"pool: size must be >= 1, got {size}")
    if size > 1 and not base.insecure and base.key and not Path(base.key).is_dir():
        raise ValueError(f"key: --pool {size} runs {size} clients, each with an identity of its own, but --key "
                         f"{base.key} is one key file; give a directory holding <client id>.key for each "
                         f"({base.client_id}-{offset:03d}.key ...: fedpara keys new ... --dir DIR)")
    spec = parse_data_spec(base.data)
    clients = spec.clients if spec.clients > 1 else offset + size
    if offset + size > clients:
        raise ValueError(f"pool: clients {offset}..{offset + size - 1} exceed the data spec's clients={clients}")
    out = []
    for i in range(offset, offset + size):
        cid = f"{base.client_id}-{i:03d}"
        data = str(spec.replace(clients=clients, index=i))
        state_dir = f"{base.state_dir}/{cid}" if base.state_dir else ""
        # simulated devices write their global factors when the run ends, not every round
        # (100 clients x a 61 MB model would be 6 GB of writes a round); save_every >= 0 wins
        save_every = 0 if base.save_every < 0 else base.save_every
        out.append(dataclasses.replace(base, client_id=cid, data=data, state_dir=state_dir, save_every=save_every))
    return out


class ClientPool:
    def __init__(self, configs: list[ClientConfig], broker: BrokerURL) -> None:
        lock = threading.Lock()  # one trains at a time: M clients share this host's cores
        # a broadcast task is verified and decoded once for all clients that trust the same keys
        trust = {(c.insecure, c.coordinator_pub, c.max_message_age_s) for c in configs}
        self.shared = SharedVerified() if len(trust) == 1 else None
        self.clients = [EdgeClient(c, broker, train_lock=lock, shared=self.shared) for c in configs]

    def start(self) -> None:
        for c in self.clients:
            c.start()
        log.info("pool: %d clients connected", len(self.clients))

    def wait(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        for c in self.clients:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not c.wait(left):
                return False
        return True

    def stop(self) -> None:
        for c in self.clients:
            c.stop()
