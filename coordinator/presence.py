"""The coordinator on the broker: its keys, and its retained, signed status (docs/security.md).

The status carries the session token that every task and the finish of this coordinator process
carry: clients obey a finish only from the session whose status they accepted. It is repeated
every ``STATUS_EVERY_S`` (clients refuse old ones) and put back when someone overwrites it.
"""
from __future__ import annotations

import logging
import secrets
import time

from fedpara.runtime.messages import Status
from fedpara.runtime.signing import endpoints, load_trust_dir
from fedpara.wire import Message, MessageKind

from .config import CoordinatorConfig

log = logging.getLogger(__name__)

STATUS_EVERY_S = 30.0  # the coordinator repeats its signed status (clients refuse old ones)


def trust(cfg: CoordinatorConfig):
    """(sealer, opener) for the coordinator; an insecure run says what it gives up."""
    if cfg.insecure:
        log.warning("insecure run: messages are not signed; anyone who can publish on the broker can take "
                    "part in run %s, impersonate clients or end it (docs/security.md)", cfg.run_id)
    return endpoints("coordinator", insecure=cfg.insecure, key_path=cfg.coordinator_key,
                     trusted=lambda: load_trust_dir(cfg.trusted_keys), max_age_s=cfg.max_message_age_s)


class Presence:
    """Seals and publishes the coordinator's status; ``session`` is set once the MQTT session is up."""

    def __init__(self, seal, run_id: str, topic: str) -> None:
        self.seal, self.run_id, self.topic = seal, run_id, topic
        self.token = secrets.token_hex(4)  # tells tasks and the finish of a resumed coordinator apart
        self.session = None
        self._sent = 0.0
        self._last = b""       # our retained online status: put back when someone overwrites it
        self._reasserted = 0.0

    def payload(self, state: str) -> bytes:
        self._sent = time.monotonic()
        payload = self.seal.seal(Message(MessageKind.STATUS, self.run_id, 0, "coordinator",
                                         meta=Status(state, role="coordinator",
                                                     coordinator_session=self.token).to_meta())).data
        if state == "online":
            self._last = payload
        return payload

    def publish(self, state: str):
        return self.session.publish(self.topic, self.payload(state), retain=True)

    def heartbeat(self) -> None:
        """Repeat the online status when it is due."""
        if time.monotonic() - self._sent > STATUS_EVERY_S:
            self.publish("online")

    def seen(self, payload: bytes) -> bool:
        """Someone cleared or replaced our retained status (an old session's, replayed): put it back,
        so that clients learn the current session before any replayed finish (at most 1/s).
        Returns whether it was put back."""
        if self._last and payload != self._last and time.monotonic() - self._reasserted > 1:
            self._reasserted = time.monotonic()
            self.publish("online")
            return True
        return False
