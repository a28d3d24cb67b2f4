"""The edge client's MQTT side: session, presence, dispatch of tasks to the trainer, uploads.

Flow per round (docs/protocol.md): receive the task chunks (fan-out topic or our own), reassemble
and decode them into a typed :class:`~fedpara.runtime.messages.Task`, hand it to the
:class:`~edge_client.trainer.Trainer` on the training thread (never the network thread), send
back the global factors only, with the example count and metrics. Handlers are idempotent on the
task id because QoS 1 may deliver twice; any bad message is logged and counted, never fatal.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections import Counter, deque
from pathlib import Path

from fedpara.runtime.messages import Control, ProtocolError, Status, Task
from fedpara.runtime.lograte import Throttled
from fedpara.runtime.mqtt import BrokerURL, MqttSession
from fedpara.runtime.signing import AuthError, check_identity, endpoints, load_public_key
from fedpara.runtime.topics import Topics
from fedpara.wire import (
    Limits,
    Message,
    MessageKind,
    Reassembler,
    WireError,
    framed_bytes,
    parse_chunk,
)
from fedpara.wire.digest import digests_available
from fedpara.wire.lean_client import LeanClient

from .config import ClientConfig
from .runner import TaskItem, TaskRunner
from .pool_verify import SharedVerified
from .trainer import Trainer
from .watch import CoordinatorWatch

log = logging.getLogger(__name__)

def trust(cfg: ClientConfig):
    """(sealer, opener): our signer and the coordinator's verifier; an insecure client says what
    it gives up."""
    if cfg.insecure:
        log.warning("%s: insecure: messages are not signed; this device obeys anyone who can publish on "
                    "the broker (docs/security.md)", cfg.client_id)
    sealer, opener = endpoints(cfg.client_id, insecure=cfg.insecure, key_path=cfg.key_path,
                               trusted=lambda: {"coordinator": load_public_key(cfg.coordinator_pub)},
                               max_age_s=cfg.max_message_age_s)
    if not cfg.insecure:  # another id's key is a one-line error, not a client the coordinator ignores
        check_identity(cfg.key_path, cfg.client_id, sealer.key)
    return sealer, opener


NO_COORDINATOR_WARNING_S = 60.0  # warn once when nothing of our run's coordinator was seen by then
OWN_STATUSES_KEPT = 64  # our last statuses, told apart from a stranger's (10 min of 10 s heartbeats)


# --- work items for the training thread (a task: runner.TaskItem) ---------------------------
@dataclasses.dataclass(frozen=True)
class _Finish:
    control: Control


@dataclasses.dataclass(frozen=True)
class _Stop:
    pass


class EdgeClient:
    def __init__(self, cfg: ClientConfig, broker: BrokerURL, *, train_lock: threading.Lock | None = None,
                 shared: SharedVerified | None = None) -> None:
        self.cfg, self.broker = cfg, broker
        self.shared = shared  # a pool's clients check a broadcast task's bytes once for all
        self.topics = Topics(cfg.run_id)
        self.trainer = Trainer(cfg.client_id, cfg.data, device=cfg.device, threads=cfg.threads,
                               state_dir=cfg.state_dir, eval_local=cfg.eval_local, lock=train_lock)
        self.limits = Limits()
        self.seal, self.opener = trust(cfg)
        self.digests = digests_available()  # announced in our status; what a task may be digested with
        if "blake3" not in self.digests:
            log.info("%s: the blake3 package is not installed: envelopes use SHA-256 (docs/wire.md, Digests)",
                     cfg.client_id)
        self._session_seq = 0
        # the statuses we published lately: their echo on our own status topic can arrive late (behind
        # a task on a narrow downlink), after a newer heartbeat; an old one of ours is not a stranger's
        self._own_statuses: deque[bytes] = deque(maxlen=OWN_STATUSES_KEPT)
        self._reasserted = 0.0
        # in a pool one client hashes a broadcast task as it arrives; the others compare bytes
        # signed runs: only frames whose header the coordinator signed take a slot (docs/security.md)
        self.reassembler = Reassembler(timeout_s=300.0, hash_envelope=shared.claim if shared is not None else None,
                                       authenticate=self.opener.chunk_authenticator("coordinator"))
        self.counters: Counter = Counter()
        # the newest coordinator session and seq we accepted, kept across restarts: a finish must be
        # newer and from that session (a replayed finish of an earlier run stops nobody)
        self.watch = CoordinatorWatch(Path(self.trainer.state.root) / "coordinator.json", cfg.run_id)
        # delta coding with error feedback when a task asks for it (docs/compression.md)
        self.lean = LeanClient(self.trainer.state.root, cfg.run_id, cfg.client_id, rng_lock=self.trainer.lock)
        self._refusals = Throttled(log)  # junk frames are counted; only a few lines a minute are logged
        self.finished = threading.Event()
        self.coordinator_seen = threading.Event()  # its status or a task for our run arrived
        self._quiet_timer: threading.Timer | None = None
        self.finish_meta: dict = {}
        self._seen: set[str] = set()
        self._work: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._incoming: dict[bytes, tuple[float, int]] = {}
        self.energy = None
        if cfg.energy != "off":
            from .energy import EnergyConfig, phase_meter
            self.energy = phase_meter(EnergyConfig.from_dict({**cfg.energy_options, "meter": cfg.energy,
                                                              "device": self.trainer.device.type}))
            log.info("%s: energy meter: %s", cfg.client_id, self.energy.reason)
        self.session: MqttSession | None = None
        self.runner = TaskRunner(cfg, self.trainer, self.seal, self.topics, self.digests, lambda: self.session,
                                 self.energy, lean=self.lean)

    @property
    def rounds_done(self) -> list[int]:
        """The rounds whose update this client delivered (acknowledged by the broker)."""
        return self.runner.rounds_done

    # --- presence --------------------------------------------------------------------------
    def _status(self, state: str, *, will: bool = False) -> bytes:
        """Our signed status. The last will is sealed for each connection, before it is made, with
        ``seq`` equal to the ``session`` every later status of this connection carries: the
        coordinator accepts it once though it is older than our heartbeats, and refuses any other
        old status, the will of an earlier connection included (docs/security.md)."""
        seq = None
        if will:
            seq = self._session_seq = self.seal.next_seq()
        meta = Status(state, self.trainer.num_examples, str(self.trainer.device), heartbeat_s=self.cfg.heartbeat_s,
                      session=self._session_seq, connection=self.session.connects if self.session else 0,
                      digests=self.digests).to_meta()
        meta.update(self.lean.status_meta())  # the codecs we decode and the state we hold
        return self.seal.seal(Message(MessageKind.STATUS, self.cfg.run_id, 0, self.cfg.client_id, meta=meta),
                              seq=seq).data

    def _announce(self, session: MqttSession) -> None:  # on every (re)connect, and as heartbeat
        payload = self._status("online")
        self._own_statuses.append(payload)
        session.publish(self.topics.status(self.cfg.client_id), payload, retain=True)

    def start(self) -> None:
        me = self.cfg.client_id
        will = self._status("offline", will=True)
        self.session = MqttSession(  # an unpredictable MQTT client id: nobody can take our session over
            self.broker, f"fp-{self.cfg.run_id}-{me}-{secrets.token_hex(3)}",
            [(self.topics.task, 1), (self.topics.task_for(me), 1), (self.topics.control, 1),
             (self.topics.coordinator, 1), (self.topics.status(me), 1)],
            will=(self.topics.status(me), will, 1, True), on_connect=self._announce,
            renew_will=lambda: self._status("offline", will=True))
        self.session.start()
        loops = [(self._dispatch, "dispatch"), (self._train_loop, "train")]
        if self.cfg.heartbeat_s > 0:
            loops.append((self._heartbeat, "heartbeat"))
        self._quiet_timer = threading.Timer(NO_COORDINATOR_WARNING_S, self._warn_if_no_coordinator)
        self._quiet_timer.daemon = True
        self._quiet_timer.start()
        for target, name in loops:
            t = threading.Thread(target=target, name=f"{me}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def save_pending(self, timeout: float = 30.0) -> None:
        """Write trained global factors that ``save_every`` left unwritten (at the end of a run, or
        when stopping); waits up to ``timeout`` for a training in progress to finish. Factors
        already overwritten by a newer task's are not pending (the last written round stays)."""
        if not self.trainer.global_pending:
            return
        if not self.trainer.model_lock.acquire(timeout=timeout):
            log.warning("%s: still training after %.0f s; the last global factors are not written",
                        self.cfg.client_id, timeout)
            return
        try:
            self.trainer.save_state()
        except OSError as exc:
            log.warning("%s: could not write the global factors: %s", self.cfg.client_id, exc)
        finally:
            self.trainer.model_lock.release()

    def stop(self) -> None:
        self.save_pending()
        self.finished.set()
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
        if self.session is not None:
            try:
                info = self.session.publish(self.topics.status(self.cfg.client_id), self._status("offline"), retain=True)
                info.wait_for_publish(5)
            except (RuntimeError, ValueError):
                pass
            self.session.stop()
        self._work.put(_Stop())
        if self.energy is not None:
            self.energy.close()

    def _warn_if_no_coordinator(self) -> None:
        if not self.coordinator_seen.is_set() and not self.finished.is_set() and self.counters["bad_signature"]:
            log.error("%s: nothing of run %r verified in %.0f s: %d message(s) from the coordinator did not verify "
                      "against --coordinator-pub %s; copy this run's coordinator.pub", self.cfg.client_id,
                      self.cfg.run_id, NO_COORDINATOR_WARNING_S, self.counters["bad_signature"],
                      self.cfg.coordinator_pub)
        elif not self.coordinator_seen.is_set() and not self.finished.is_set():
            log.warning("%s: no coordinator has announced run %r on %s after %.0f s: is --run right?",
                        self.cfg.client_id, self.cfg.run_id, self.broker, NO_COORDINATOR_WARNING_S)

    def _heartbeat(self) -> None:
        """Repeat the retained online status: liveness that survives a lost last will."""
        while not self.finished.wait(self.cfg.heartbeat_s):
            if self.session.connected.is_set():
                try:
                    self._announce(self.session)
                except (RuntimeError, ValueError) as exc:  # disconnected meanwhile: the next one will do
                    log.debug("%s: heartbeat not sent: %s", self.cfg.client_id, exc)

    # --- inbound (dispatch thread) ---------------------------------------------------------
    def _dispatch(self) -> None:
        while not self.finished.is_set():
            try:
                topic, payload = self.session.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._handle(topic, payload)
            except AuthError as exc:  # unsigned, forged, replayed: counted, never obeyed
                self.counters[exc.reason] += 1
                if exc.reason == "bad_signature" and topic == self.topics.coordinator:
                    # the retained status is the coordinator's own: a wrong --coordinator-pub, or a forgery
                    self._refusals.log(logging.ERROR, "coordinator_pub",
                                       "%s: the coordinator's status does not verify against --coordinator-pub %s: "
                                       "is it this run's coordinator.pub? (or someone forges it)", self.cfg.client_id,
                                       self.cfg.coordinator_pub)
                self._refusals.log(logging.INFO, exc.reason, "%s: refused message on %s: %s", self.cfg.client_id,
                                   topic, str(exc))
            except (WireError, ValueError) as exc:
                self.counters["malformed"] += 1
                self._refusals.log(logging.WARNING, "malformed", "%s: ignored message on %s: %s", self.cfg.client_id,
                                   topic, str(exc))
            except Exception:
                self.counters["error"] += 1
                log.exception("%s: error handling a message on %s", self.cfg.client_id, topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.status(self.cfg.client_id):
            # someone cleared or overwrote our retained status: say again who we are (at most 1/s)
            if (payload not in self._own_statuses and not self.finished.is_set()
                    and time.monotonic() - self._reasserted > 1):
                self._reasserted = time.monotonic()
                self.counters["status_reasserted"] += 1
                self._announce(self.session)
            return
        if topic == self.topics.coordinator:
            if payload:
                msg = self.opener.open(payload, self.limits, sender="coordinator")
                if msg.kind == MessageKind.STATUS and msg.run_id == self.cfg.run_id:
                    self.coordinator_seen.set()
                    status = Status.from_meta(msg.meta)
                    if status.online:
                        self.watch.saw(msg.meta.get("seq", 0), status.coordinator_session)
            return
        if topic == self.topics.control:
            msg = self.opener.open(payload, self.limits, sender="coordinator")
            if msg.kind == MessageKind.CONTROL and msg.run_id == self.cfg.run_id:
                control = Control.from_meta(msg.meta)
                if self.opener.signed:
                    why = self.watch.refuses(msg.meta.get("seq", 0), control.session)
                    if why:  # a finish replayed from an earlier run of this id, or an earlier session
                        self.counters["stale_control"] += 1
                        self._refusals.log(logging.WARNING, "stale_control", "%s: ignored a finish: %s",
                                           self.cfg.client_id, why)
                        return
                    self.watch.saw(msg.meta.get("seq", 0), None, save=True)  # obeyed: never again
                self.finish_meta = control.to_meta()
                log.info("%s: run finished (%s)", self.cfg.client_id, control.status)
                self._work.put(_Finish(control))
            return
        if topic not in (self.topics.task, self.topics.task_for(self.cfg.client_id)):
            self.counters["unexpected_topic"] += 1  # e.g. a broker replaying retained messages
            return
        # transfer accounting per message: first chunk seen -> complete, MQTT bytes of every chunk
        mid = parse_chunk(payload).message_id
        first, framed = self._incoming.pop(mid, (time.monotonic(), 0))
        self._incoming[mid] = (first, framed + framed_bytes([len(payload)], topic))
        while len(self._incoming) > 64:  # partial or bogus message ids do not pile up
            del self._incoming[next(iter(self._incoming))]
        data = self.reassembler.add(payload)
        if data is None:
            return
        first, framed = self._incoming.pop(mid, (first, framed))
        transfer = {"task_payload_bytes": len(data), "task_mqtt_bytes": framed,
                    "download_s": time.monotonic() - first}
        t0 = time.perf_counter()
        # a checked message was hashed as its frames arrived; a version 2 message lies in a buffer
        # of its own (a bytearray), so its tensors can be views into it (the trainer copies them)
        checked, owned = self.reassembler.checked(data), isinstance(data, bytearray)
        if self.shared is not None:
            msg = self.shared.open(data, self.opener, self.limits, sender="coordinator", digest_checked=checked,
                                   alias=owned)
        else:
            msg = self.opener.open(data, self.limits, sender="coordinator", digest_checked=checked, alias=owned)
        if msg.kind != MessageKind.TASK or msg.run_id != self.cfg.run_id:
            raise ValueError(f"expected a task for run {self.cfg.run_id}, got {msg.kind} for {msg.run_id!r}")
        task = Task.from_meta(msg.meta)
        if self.cfg.client_id not in task.selected:
            self.counters["not_selected"] += 1
            return
        if task.task_id in self._seen:  # QoS 1 redelivery, or the coordinator asking again
            self.counters["duplicate"] += 1
            last = self.runner.last_update
            if last is not None and last[0] == task.task_id:  # our update was lost on the way: again
                self.counters["update_resent"] += 1
                for frame in last[2]:
                    self.session.publish(last[1], frame)
            return
        lean = self.lean.receive(msg, task)  # a delta -> the full state (or None: we lack its base)
        if lean is None:
            self.counters["lean_resync"] += 1
            self._announce(self.session)  # says what we hold: the coordinator sends the full state
            return
        msg = lean
        self._seen.add(task.task_id)
        self.coordinator_seen.set()
        self.watch.saw(msg.meta.get("seq", 0), None)
        transfer["decode_s"] = time.perf_counter() - t0
        self._work.put(TaskItem(msg.round, task, msg, transfer))

    # --- training thread -------------------------------------------------------------------
    def _next_work(self):
        """The next item; a newer task supersedes any older one still queued."""
        item = self._work.get()
        while isinstance(item, TaskItem):
            try:
                nxt = self._work.get_nowait()
            except queue.Empty:
                break
            if not isinstance(nxt, TaskItem):
                self._work.put(nxt)
                break
            self.counters["superseded"] += 1
            item = nxt
        return item

    def _train_loop(self) -> None:
        while True:
            item = self._next_work()
            if isinstance(item, _Stop):
                return
            if isinstance(item, _Finish):
                self._on_finish()
                if self.cfg.exit_on_finish:
                    return
                continue  # --stay: serve the next run (or a resumed one) with the same state
            try:
                self.runner.run(item)
            except (ValueError, KeyError, TypeError, WireError, ProtocolError, RuntimeError) as exc:
                self.counters["bad_task"] += 1
                log.warning("%s: could not run round %s: %s", self.cfg.client_id, item.round, exc)
                self.runner.send_failure(item, exc)
            except Exception as exc:
                self.counters["error"] += 1
                log.exception("%s: training failed in round %s", self.cfg.client_id, item.round)
                self.runner.send_failure(item, exc)

    def _on_finish(self) -> None:
        self.save_pending()  # before the process may exit (exit_on_finish)
        if self.cfg.export_on_finish and self.trainer.model is not None:
            try:
                report = self.trainer.export({"round": self.finish_meta.get("round", 0), "run_id": self.cfg.run_id})
                log.info("%s: exported %s (parity %s, int8 %s)", self.cfg.client_id, report.onnx,
                         "ok" if report.ok else "FAILED", report.int8)
            except Exception:  # export is a convenience; the run itself succeeded
                log.exception("%s: export failed", self.cfg.client_id)
        if self.cfg.exit_on_finish:
            self.finished.set()
