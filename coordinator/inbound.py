"""The coordinator's inbound side: draining the inbox, opening and judging each message.

A mixin of :class:`coordinator.server.Coordinator` (it uses the coordinator's session, registry,
opener, attempt state and counters); kept apart so that the round loop reads as orchestration.
Every refused message is counted under ``ignored`` by reason; nothing received raises out of
:meth:`Inbound._pump` except an abort.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import time

from fedpara.runtime.messages import ProtocolError, Report, Status
from fedpara.runtime.signing import AuthError
from fedpara.wire import MessageKind, Reassembler, WireError, framed_bytes

from .acceptance import judge_update
from .aggregate import delta_norms
from .events import ClientStatusChanged, ReplyAccepted
from .strategy import FitResult

log = logging.getLogger("coordinator.server")  # one logger name for the coordinator's messages

MAX_SENDERS = 10_000  # distinct update topics the coordinator reassembles for at once
STATUS_EVERY_S = 30.0  # the coordinator repeats its signed status (clients refuse old ones)


class RunFailed(RuntimeError):
    """The run cannot continue (no clients, too few replies after every attempt). ``resumable``
    failures (the run directory could not be written) leave the clients waiting for a resume."""

    def __init__(self, message: str, *, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class Inbound:
    """Message handling for the coordinator (see the module docstring)."""

    def abort(self, reason: str) -> None:
        """End the run as failed from another thread (e.g. the demo saw a client process die)."""
        self._abort = reason

    def _pump(self, timeout: float, until=None) -> None:
        """Handle incoming messages for up to ``timeout`` seconds, or until ``until()`` holds after
        a message (so the loop wakes on the last expected reply, not at the end of a window)."""
        end = time.monotonic() + timeout
        while True:
            if self._abort is not None:
                raise RunFailed(self._abort)
            if time.monotonic() - self._status_sent > STATUS_EVERY_S:  # signed heartbeat
                self.session.publish(self.topics.coordinator, self._status_payload("online"), retain=True)
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
            # someone cleared or replaced our retained status (an old session's, replayed): put it back,
            # so that clients learn the current session before any replayed finish (at most 1/s)
            if self._status_last and payload != self._status_last and time.monotonic() - self._reasserted > 1:
                self._reasserted = time.monotonic()
                self.ignored["status_reasserted"] += 1
                self.session.publish(self.topics.coordinator, self._status_payload("online"), retain=True)
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
            self._reask([client])  # it cannot apply the delta it was sent: the full state
        self._emit(ClientStatusChanged(client, info.online))
        if info.online and before is not None and info.connection > before.connection:
            self._reask([client])  # it reconnected: an update it sent meanwhile may be lost

    def _handle_update(self, client: str, topic: str, payload: bytes) -> None:
        self._up_framed += framed_bytes([len(payload)], topic)
        reassembler = self._reassemblers.get(topic)
        if reassembler is None:
            if len(self._reassemblers) >= MAX_SENDERS:
                self.ignored["too_many_senders"] += 1
                return
            # signed runs: only frames whose header this client signed take a slot (docs/security.md)
            reassembler = self._reassemblers[topic] = Reassembler(
                timeout_s=max(60.0, self.cfg.round_deadline_s), max_partial_bytes=self._partial_cap, max_messages=4,
                authenticate=self.opener.chunk_authenticator(client))
        data = reassembler.add(payload)
        if data is None:
            return
        try:
            # hashed on arrival (version 2), into a buffer of its own: tensors may be views into it
            msg = self.opener.open(data, self.limits, sender=client, digest_checked=reassembler.checked(data),
                                   alias=isinstance(data, bytearray))
        except WireError as exc:  # signed runs: the signature held, so this really is the client's
            self._broken_update(client, str(exc))
            raise
        if self.lean is not None:  # a delta update -> the global state + delta
            try:
                msg = self.lean.expand_update(client, msg, self)
            except WireError as exc:
                self._broken_update(client, str(exc))
                raise
        if "report" in msg.meta:  # a follow-up: the client's local evaluation of a round it answered
            self._handle_report(client, msg)
            return
        if self._attempt is None:  # between rounds: a late reply to a round already aggregated
            self.ignored["stale"] += 1
            return
        verdict = judge_update(msg, client, self._attempt)
        if verdict.reason == "malformed" and msg.meta.get("task_id") == self._attempt.task_id:
            self._broken_update(client, verdict.detail)
        if verdict.failure is not None:
            self._record_failure(client, f"{verdict.failure.error}: {verdict.failure.reason}")
            return
        if not verdict.accepted:
            self.ignored[verdict.reason] += 1
            self._refusals.log(logging.WARNING if verdict.reason == "malformed" else logging.INFO,
                               f"update:{verdict.reason}", "ignored update: %s", verdict.detail)
            return
        tensors = {k: v.to(self.state[k].dtype) for k, v in msg.tensors.items()}
        n = verdict.update.num_examples
        norm = None
        if self._stream is not None:  # streaming FedAvg: fold it in now, keep only the metrics
            self._stream.add(tensors, n)
            tensors = {}
        else:  # the screen's distance (and finiteness), taken now rather than at the round's end
            norm = delta_norms(self.state, [tensors])[0]
        self._results[client] = FitResult(client, tensors, n, verdict.update.metrics, len(data), norm)
        a = self._attempt
        self._accepted.setdefault(a.task_id, set()).add(client)
        self._attempt = dataclasses.replace(a, replied=a.replied | {client})
        self._emit(ReplyAccepted(a.round, client, len(self._results), len(a.sampled)))

    def _handle_report(self, client: str, msg) -> None:
        """Keep a follow-up report for the round's metrics line: only from a client whose update
        for that task was accepted, once, and only while the line is not yet written."""
        if msg.kind != MessageKind.UPDATE or msg.run_id != self.cfg.run_id or msg.sender != client or msg.tensors:
            raise ProtocolError(f"report from {client} is not a tensor-free update for run {self.cfg.run_id}")
        rep = Report.from_meta(msg.meta)
        if client not in self._accepted.get(rep.task_id, ()):
            self.ignored["stale"] += 1  # a task already written down, or a client that did not answer it
            return
        got = self._reports.setdefault(rep.task_id, {})
        if client in got:
            self.ignored["duplicate"] += 1
            return
        got[client] = rep.metrics

    def _broken_update(self, client: str, why: str) -> None:
        """A signed update from a sampled client that cannot be used counts as that client's
        failure for this attempt, so the round does not wait for it until the deadline. (Unsigned
        runs cannot tell the client from anyone else on its topic, so there it is only counted.)"""
        a = self._attempt
        if self.opener.signed and a is not None and client in a.sampled and client not in a.replied:
            self._record_failure(client, f"malformed update: {why}")

    def _record_failure(self, client: str, reason: str) -> None:
        """The client answered this attempt, with a failure: recorded and quoted, not waited for."""
        self._failures[client] = reason[:300]
        self._attempt = dataclasses.replace(self._attempt, replied=self._attempt.replied | {client})
        log.warning("round %d: %s cannot run the task: %s", self._attempt.round, client, self._failures[client])
