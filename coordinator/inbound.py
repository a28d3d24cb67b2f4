"""The coordinator's inbound side: draining the inbox, opening and judging each message.

A collaborator of the round loop (coordinator/server.py): it owns the per-sender reassemblers and
reads the round loop's current :class:`~coordinator.attempt.RoundAttempt` and
:class:`~coordinator.attempt.RoundTally` (``attempt`` / ``tally``, set by the loop), feeding them
accepted updates, failures and the bytes received; follow-up reports go to the
:class:`~coordinator.ledger.RoundLedger`. Every refused message is counted under ``ignored`` by
reason; nothing received raises out of :meth:`Inbound.pump` except an abort.
"""
from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from collections.abc import Callable

from fedpara.runtime.lograte import Throttled
from fedpara.runtime.messages import ProtocolError, Report, Status, parse_reply
from fedpara.runtime.signing import AuthError
from fedpara.runtime.topics import Topics
from fedpara.wire import Limits, MessageKind, Reassembler, WireError, framed_bytes

from .acceptance import judge_update
from .attempt import RoundAttempt, RoundTally
from .errors import RunFailed
from .events import ClientStatusChanged, ReplyAccepted
from .ledger import RoundLedger
from .presence import Presence
from .registry import ClientRegistry
from .strategy import FitResult

log = logging.getLogger("coordinator.server")  # one logger name for the coordinator's messages

MAX_SENDERS = 10_000  # distinct update topics the coordinator reassembles for at once


class Inbound:
    """Message handling for the coordinator (see the module docstring)."""

    def __init__(self, cfg, topics: Topics, opener, registry: ClientRegistry, presence: Presence,
                 ledger: RoundLedger, *, ignored: Counter, partial_cap: int, reask: Callable[[list[str]], None],
                 emit: Callable[[object], None], lean=None) -> None:
        self.lean = lean  # delta coding (coordinator/leanwire.py): statuses say what a client holds
        self.cfg, self.topics, self.opener, self.registry = cfg, topics, opener, registry
        self.presence, self.ledger, self.partial_cap = presence, ledger, partial_cap
        self.reask, self.emit = reask, emit
        self.limits = Limits()
        self.ignored = ignored
        self._refusals = Throttled(log)  # refused input: counted always, logged a few lines a minute
        # one reassembler per sender topic: a peer cannot void another's chunks by reusing their
        # message id, and each sender's partial messages are capped on their own
        self._reassemblers: dict[str, Reassembler] = {}
        self.session = None                       # set when the MQTT session starts
        self.attempt: RoundAttempt | None = None  # the attempt collecting replies (None between rounds)
        self.tally: RoundTally | None = None      # the round in progress
        self._abort: str | None = None

    def reassembler(self, topic: str) -> Reassembler | None:
        """The reassembler of a sender topic (its counters: frames refused, messages evicted)."""
        return self._reassemblers.get(topic)

    def abort(self, reason: str) -> None:
        """End the run as failed from another thread (e.g. the demo saw a client process die)."""
        self._abort = reason

    def pump(self, timeout: float, until=None) -> None:
        """Handle incoming messages for up to ``timeout`` seconds, or until ``until()`` holds after
        a message (so the loop wakes on the last expected reply, not at the end of a window)."""
        end = time.monotonic() + timeout
        while True:
            if self._abort is not None:
                raise RunFailed(self._abort)
            self.presence.heartbeat()  # our signed status, repeated
            if until is not None and until():
                return
            try:
                topic, payload = self.session.inbox.get(timeout=max(0.0, min(0.2, end - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= end:
                    return
                continue
            try:
                self._handle(topic, payload)
            except AuthError as exc:  # unsigned, forged, unknown, replayed: counted, changes nothing
                self.ignored[exc.reason] += 1
                self._identity_hint(topic, exc.reason)
                self._refusals.log(logging.INFO, exc.reason, "refused message on %s: %s", topic, str(exc))
            except (WireError, ValueError) as exc:
                self.ignored["malformed"] += 1
                # str: keep no frame alive; rate-limited: junk frames must not fill a disk with log
                self._refusals.log(logging.WARNING, "malformed", "ignored message on %s: %s", topic, str(exc))
            except Exception:  # a bug must not take the coordinator down mid-run
                self.ignored["error"] += 1
                log.exception("error handling a message on %s", topic)
            if time.monotonic() >= end or (until is not None and until()):
                return

    def _identity_hint(self, topic: str, reason: str) -> None:
        """A status that does not verify is most often a key mix-up: say which key and the fix."""
        client = self.topics.client_of(topic)
        if client is None or topic != self.topics.status(client):
            return
        where = self.cfg.trusted_keys
        if reason == "bad_signature":
            self._refusals.log(logging.WARNING, "identity", "status of %s does not verify against %s/%s.pub: that "
                               "device signs with another key (is its --key %s.key its own?), or someone forges it",
                               client, where, client, client)
        elif reason == "unknown_sender":
            self._refusals.log(logging.WARNING, "identity", "%s is not in trusted_keys %s: if it belongs to the "
                               "fleet, copy its %s.pub there (fedpara keys new %s) and restart the coordinator",
                               client, where, client, client)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.coordinator:
            if self.presence.seen(payload):  # someone replaced our retained status: put back
                self.ignored["status_reasserted"] += 1
            return
        client = self.topics.client_of(topic)
        if client is None:
            self.ignored["unknown_topic"] += 1
        elif topic == self.topics.status(client):
            self._handle_status(client, topic, payload)
        elif topic == self.topics.update(client):
            self._handle_update(client, topic, payload)
        else:
            self.ignored["unknown_topic"] += 1

    def _handle_status(self, client: str, topic: str, payload: bytes) -> None:
        if not payload:  # a cleared retained status: news only when nobody can sign
            if not self.opener.signed:
                self.registry.mark_offline(client)
            return
        msg = self.opener.open(payload, self.limits, sender=client, ordered=False)
        if msg.kind != MessageKind.STATUS or msg.run_id != self.cfg.run_id or msg.sender != client:
            raise ProtocolError(f"status on {topic} is not a status from {client} for run {self.cfg.run_id}")
        status = Status.from_meta(msg.meta)
        if self.opener.signed:
            verdict = self.registry.signed_status_order(client, msg.meta["seq"], status, self.opener.fresh(msg.meta["seq"]))
            if verdict != "ok":
                self.ignored[verdict] += 1
                return
        before = self.registry.get(client)
        info = self.registry.update(client, status)
        if self.lean is not None and self.lean.saw_status(client, msg.meta):
            self.reask([client])  # it cannot apply the delta it was sent: the full state
        self.emit(ClientStatusChanged(client, info.online))
        if info.online and before is not None and info.connection > before.connection:
            self.reask([client])  # it reconnected: an update it sent meanwhile may be lost

    def _handle_update(self, client: str, topic: str, payload: bytes) -> None:
        if self.tally is not None:
            self.tally.mqtt_bytes_up += framed_bytes([len(payload)], topic)
        reassembler = self._reassemblers.get(topic)
        if reassembler is None:
            if len(self._reassemblers) >= MAX_SENDERS:
                self.ignored["too_many_senders"] += 1
                return
            # signed runs: only frames whose header this client signed take a slot (docs/security.md)
            reassembler = self._reassemblers[topic] = Reassembler(
                timeout_s=max(60.0, self.cfg.round_deadline_s), max_partial_bytes=self.partial_cap, max_messages=4,
                authenticate=self.opener.chunk_authenticator(client))
        data = reassembler.add(payload)  # WireError: a frame it refused (signed runs: not the client's)
        self.registry.touch(client)  # its heartbeats may be queued behind this update: it is alive
        if data is None:
            return
        try:
            # hashed on arrival (version 2), into a buffer of its own: tensors may be views into it
            msg = self.opener.open(data, self.limits, sender=client, digest_checked=reassembler.checked(data),
                                   alias=isinstance(data, bytearray))
        except WireError as exc:  # signed runs: the signature held, so this really is the client's
            self._broken_update(client, str(exc))
            raise
        if self.lean is not None and self.attempt is not None:  # a delta update -> the global state + delta
            try:
                msg = self.lean.expand_update(client, msg, self.attempt, self.attempt.reference)
            except WireError as exc:
                self._broken_update(client, str(exc))
                raise
        try:
            reply = parse_reply(msg.meta)
        except ProtocolError:
            reply = None  # judged below: malformed, or a reply to another task
        if isinstance(reply, Report):  # a follow-up: the client's local evaluation of a round it answered
            self._handle_report(client, msg, reply)
            return
        a = self.attempt
        if a is None:  # between rounds: a late reply to a round already aggregated
            self.ignored["stale"] += 1
            return
        rules = a.rules_for(client)  # the task this client is answering (async: each client its own)
        verdict = judge_update(msg, client, rules, reply)  # reply None (unparsable): judged malformed
        if verdict.reason == "malformed" and msg.meta.get("task_id") == rules.task_id:
            self._broken_update(client, verdict.detail)
        if verdict.failure is not None:
            self._record_failure(client, f"{verdict.failure.error}: {verdict.failure.reason}")
            return
        refused = None if verdict.accepted else verdict.reason
        if verdict.accepted:  # the attempt may still refuse it (async: too stale)
            refused = a.accept(FitResult(client, msg.tensors, verdict.update.num_examples, verdict.update.metrics,
                                         len(data)))
        if refused is not None:
            self.ignored[refused] += 1
            self._refusals.log(logging.WARNING if refused == "malformed" else logging.INFO,
                               f"update:{refused}", "ignored update from %s: %s", client, verdict.detail or refused)
            return
        self.ledger.accepted(rules.task_id, client)
        self.emit(ReplyAccepted(a.round, client, len(a.results), len(a.sampled)))

    def _handle_report(self, client: str, msg, rep: Report) -> None:
        """A follow-up report for the round's metrics line (the ledger decides whether it is wanted)."""
        if msg.kind != MessageKind.UPDATE or msg.run_id != self.cfg.run_id or msg.sender != client or msg.tensors:
            raise ProtocolError(f"report from {client} is not a tensor-free update for run {self.cfg.run_id}")
        refused = self.ledger.report(client, rep)
        if refused is not None:
            self.ignored[refused] += 1

    def _broken_update(self, client: str, why: str) -> None:
        """A signed update from a sampled client that cannot be used counts as that client's
        failure for this attempt, so the round does not wait for it until the deadline. (Unsigned
        runs cannot tell the client from anyone else on its topic, so there it is only counted.)"""
        a = self.attempt
        rules = a.rules_for(client) if a is not None else None
        if self.opener.signed and rules is not None and client in rules.sampled and client not in rules.replied:
            self._record_failure(client, f"malformed update: {why}")

    def _record_failure(self, client: str, reason: str) -> None:
        """The client answered this attempt, with a failure: recorded and quoted, not waited for."""
        self.attempt.fail(client, reason)
        log.warning("round %d: %s cannot run the task: %s", self.attempt.round, client, self.attempt.failures[client])
