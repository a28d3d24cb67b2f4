"""The coordinator's outbound side: sealing a task and publishing it, once or again.

A task for every live client goes out once on the fan-out topic (the broker copies it); a task for
some goes to each sampled client's own topic. After a reconnect (ours or a client's) the current
task is sent again to the sampled clients that have not answered; what a client merely claims is
limited by :class:`~coordinator.backoff.ResendLimiter` (docs/security.md).
"""
from __future__ import annotations

import logging
from collections import Counter

from fedpara.runtime.messages import Task
from fedpara.runtime.topics import Topics
from fedpara.wire import Message, MessageKind, WireConfig
from fedpara.wire.digest import digests_available

from .attempt import RoundAttempt
from .backoff import ResendLimiter
from .errors import RunFailed
from .registry import ClientRegistry

log = logging.getLogger("coordinator.server")


class Outbound:
    def __init__(self, cfg, topics: Topics, seal, registry: ClientRegistry, ignored: Counter, broker=None,
                 lean=None) -> None:
        self.broker, self.lean = broker, lean  # lean: delta coding of the downlink (coordinator/leanwire.py)
        self.cfg, self.topics, self.seal, self.registry, self.ignored = cfg, topics, seal, registry, ignored
        self.wire = WireConfig(downlink=cfg.downlink, uplink=cfg.uplink)
        # envelope digests: BLAKE3 (about 4x faster than SHA-256 here) with every peer that can check
        # it, SHA-256 with the rest; updates use what the task asks for, if the client can
        blake3 = cfg.digest == "auto" and "blake3" in digests_available()
        self.uplink_digest = "blake3" if blake3 else "sha256"
        if cfg.digest == "auto" and not blake3:
            log.info("the blake3 package is not installed: envelopes use SHA-256 (docs/wire.md, Digests)")
        self._task_digest = "sha256"  # the last task's (logged when it changes)
        self._task_msg: Message | None = None  # the current attempt's task, to ask again after a reconnect
        self.resends = ResendLimiter()  # a status flood claiming reconnects costs O(1) tasks a round
        self.session = None  # set when the MQTT session starts

    def digest_for(self, receivers) -> str:
        """BLAKE3 when this run may use it and every receiver announced it can check it; else SHA-256."""
        ok = self.uplink_digest == "blake3" and all(
            (info := self.registry.get(c)) is not None and "blake3" in info.digests for c in receivers)
        digest = "blake3" if ok else "sha256"
        if digest != self._task_digest:
            log.info("tasks are digested with %s from now on", digest)
            self._task_digest = digest
        return digest

    def send(self, rnd: int, task: Task, state, live: list[str]) -> tuple[dict, bool]:
        """Publish ``task`` with the global ``state``: (bytes accounted, whether every frame went)."""
        cfg = self.cfg
        self.resends.forget(keep_task=task.task_id)
        if self.lean is not None:  # deltas to the clients that hold the previous state
            return self.lean.send_task(self, rnd, task, state, live)
        self._task_msg = Message(MessageKind.TASK, cfg.run_id, rnd, "coordinator", state, task.to_meta())
        broadcast = set(task.selected) == set(live)
        enc = self.seal.seal(self._task_msg, self.wire, digest=self.digest_for(live if broadcast else task.selected))
        topics = [self.topics.task] if broadcast else [self.topics.task_for(c) for c in task.selected]
        if not self.session.connected.wait(cfg.wait_clients_s):  # never publish into a dead connection
            raise RunFailed(f"round {rnd}: no connection to the broker {self.broker} for {cfg.wait_clients_s:.0f} s")
        framed, complete = 0, True
        for topic in topics:
            frames, stats = enc.split(cfg.max_packet, topic)
            if not self.session.publish_all(topic, frames, timeout=cfg.round_deadline_s):
                log.warning("round %d: publishing the task on %s did not complete", rnd, topic)
                complete = False
            framed += stats.framed_bytes
        # the broker delivers one copy to every subscriber of the fan-out topic
        receivers = len(live) if broadcast else len(task.selected)
        mqtt_down = framed * receivers if broadcast else framed
        return {"bytes_down": enc.stats.payload_bytes * receivers, "mqtt_bytes_down": mqtt_down,
                "raw_bytes_down": enc.stats.raw_bytes * receivers, "receivers": receivers}, complete

    def resend(self, attempt: RoundAttempt | None, clients: list[str], *, ours: bool = False) -> None:
        """Send the current task again to those of ``clients`` that were sampled and have not
        answered, after a reconnect (ours or theirs) may have lost their update on the way. A
        client that already trained sends its update again; one that never got the task runs it.
        A reconnect a client announces is its word only: at most ``ResendLimiter.max_per_task``
        re-sends per (client, task), a few seconds apart (``ours``: our own reconnect, which our
        session saw, is not limited). The bytes count in the attempt's ``resent``."""
        a = attempt
        pending = [c for c in clients if a is not None and c in a.sampled and c not in a.replied]
        if not ours:
            refused = [c for c in pending if not self.resends.allow(c, a.task_id)]
            if refused:
                self.ignored["resend_limited"] += len(refused)
                pending = [c for c in pending if c not in refused]
        if not pending or self._task_msg is None:
            return
        # a fresh seq: the first one was seen already
        enc = (self.lean.resend_enc(self, pending) if self.lean is not None
               else self.seal.seal(self._task_msg, self.wire, digest=self.digest_for(pending)))
        for c in pending:
            topic = self.topics.task_for(c)
            frames, stats = enc.split(self.cfg.max_packet, topic)
            for frame in frames:
                self.session.publish(topic, frame)
            a.resent.update({"bytes_down": enc.stats.payload_bytes, "mqtt_bytes_down": stats.framed_bytes,
                             "raw_bytes_down": enc.stats.raw_bytes, "receivers": 1})
        log.info("round %d: asked %s again after a reconnect", a.round, ", ".join(pending))
