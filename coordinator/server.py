"""The coordinator's round loop (paper Alg. 1 over MQTT; docs/protocol.md). Orchestration only.

Each round: wait for enough live clients, let the strategy sample K, publish the global factors
once (broker fan-out) or per client, collect updates until every sampled client replied or the
deadline passed, then let the strategy aggregate if at least ``min_reply_fraction`` replied;
otherwise keep the model and sample again. Evaluate, checkpoint, append one line to metrics.jsonl.

Who decides what: :mod:`.inbound` drains and opens messages, :mod:`.strategy` samples and
aggregates, :mod:`.acceptance` judges each update, :mod:`.registry` knows who is live, :mod:`.report` writes rows and the summary,
:class:`~fedpara.runtime.rundir.RunDir` owns the files. Failures are values: every refused
message is counted under ``ignored``; nothing a client sends can crash the loop.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from safetensors import SafetensorError

from fedpara import global_state, load_state, local_state
from fedpara.data import load_test_data
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import load_checkpoint, save_checkpoint, state_digest
from fedpara.runtime.inbox import Inbox
from fedpara.runtime.lograte import Throttled
from fedpara.runtime.messages import Control, Status, Task, TrainParams
from fedpara.runtime.mqtt import BrokerURL, MqttSession
from fedpara.runtime.rundir import RunDir
from fedpara.runtime.topics import Topics
from fedpara.state import state_bytes
from fedpara.training import evaluate
from fedpara.wire import (
    Limits,
    Message,
    MessageKind,
    Reassembler,
    WireConfig,
)
from fedpara.wire.limits import digests_available

from . import report
from .acceptance import RoundState
from .config import CoordinatorConfig
from .events import RoundCompleted, TaskSent
from .inbound import Inbound, RunFailed
from .preflight import check_model_fits_data, trust
from .registry import ClientRegistry
from .aggregate import StepGuard, StreamingFedAvg
from .backoff import FailureTracker, ResendLimiter
from .privacy import BudgetExhausted, PrivacyLedger
from .strategy import FedAvg, FitResult

log = logging.getLogger(__name__)

REPORT_GRACE_S = 10.0  # after the last round, how long to wait for the clients' follow-up reports


@dataclasses.dataclass
class PendingRound:
    """A round aggregated but not yet written down: its evaluation and checkpoint run on the
    evaluator thread while the clients already train the next round (docs/protocol.md)."""

    round: int
    task_id: str
    fields: dict                  # everything report.round_row needs but the evaluation
    extra: dict                   # the line's other fields (screened, failures, privacy, wall_s, ...)
    results: list                 # FitResults without tensors (metrics only)
    future: Future | None         # -> (evaluation or None, eval_s, save_s); None: not submitted yet
    timing: dict
    socket: dict                  # the coordinator's kernel-counted socket bytes of the round
    job: tuple | None = None      # (state, evaluate?) until submitted


class Coordinator(Inbound):
    def __init__(self, cfg: CoordinatorConfig, broker: BrokerURL, *, resume: bool = False, on_event=None) -> None:
        self.cfg, self.broker = cfg, broker
        self.topics = Topics(cfg.run_id)
        self.run_dir = RunDir(cfg.out)
        self.on_event = on_event
        self.spec: ModelSpec = cfg.spec
        # differential privacy (docs/privacy.md): DP-FedAvg, secret sampling, a budget that ends the run
        self.dp = PrivacyLedger(cfg) if cfg.dp_noise_multiplier > 0 else None
        self.strategy = FedAvg(cfg.clients_per_round, cfg.seed, cfg.aggregator, cfg.screen_factor,
                               sampling=cfg.sampling, sample_rate=cfg.sample_rate, secret=self.dp is not None)
        self.wire = WireConfig(downlink=cfg.downlink, uplink=cfg.uplink)
        from .leanwire import LeanServer  # delta coding (docs/compression.md); None: whole states
        self.lean = LeanServer(cfg, self.spec, cfg.out, resume=resume) if cfg.wire != "plain" else None
        self.limits = Limits()
        self.seal, self.opener = trust(cfg)
        # envelope digests: BLAKE3 (about 4x faster than SHA-256 here) with every peer that can check
        # it, SHA-256 with the rest; updates use what the task asks for, if the client can
        blake3 = cfg.digest == "auto" and "blake3" in digests_available()
        self._uplink_digest = "blake3" if blake3 else "sha256"
        if cfg.digest == "auto" and not blake3:
            log.info("the blake3 package is not installed: envelopes use SHA-256 (docs/wire.md, Digests)")
        self._task_digest = "sha256"  # the last task's (logged when it changes)
        self._status_sent = 0.0
        self.registry = ClientRegistry()
        # one reassembler per sender topic: a peer cannot void another's chunks by reusing their
        # message id, and each sender's partial messages are capped on their own
        self._reassemblers: dict[str, Reassembler] = {}
        self.ignored: Counter = Counter()
        self._refusals = Throttled(log)  # refused input: counted always, logged a few lines a minute
        self.model = self.spec.build(cfg.seed)
        self.state = global_state(self.model)
        self.dense_bytes = state_bytes(self.spec.dense().build(cfg.seed).state_dict())
        # a sender's unfinished messages may hold at most two full fp32 updates of this model
        self._partial_cap = max(1 << 20, 2 * state_bytes(self.state) + (1 << 16))
        self.rows: list[dict] = []
        self.start_round = 1
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        # wall_s of every metrics line: seconds since the run started (a resumed run goes on from its
        # last line's, not counting the time it was down), so time-to-accuracy reads off any run
        self._wall_base, self._t_start = 0.0, time.monotonic()
        if resume:
            self._resume()
        else:
            if self.run_dir.holds_rounds():
                raise ValueError(f"out: {self.run_dir.root} already holds a run; use --resume or another --out")
            self.run_dir.start_metrics()
        self.run_dir.write_config(cfg.to_dict())
        self.test_data = load_test_data(cfg.test_data)
        check_model_fits_data(self.model, self.spec, self.test_data, cfg.test_data)
        self._abort: str | None = None
        self.session: MqttSession | None = None
        self._session_token = secrets.token_hex(4)  # tells tasks and the finish of a resumed coordinator apart
        self._status_last = b""  # our retained online status: put back when someone overwrites it
        self._reasserted = 0.0
        self._attempt: RoundState | None = None
        self._task_msg: Message | None = None  # the current attempt's task, to ask again after a reconnect
        self._resent: Counter = Counter()
        self._resends = ResendLimiter()  # a status flood claiming reconnects costs O(1) tasks a round
        self.failing = FailureTracker()  # a failing device sits out, the run goes on
        self.guard = StepGuard(cfg.max_step_factor)  # no aggregate moves the model unboundedly
        self._dp_plan = None  # a DP round's (event, denominator), from its sampling
        self._results: dict[str, FitResult] = {}
        self._failures: dict[str, str] = {}
        self._up_framed = 0
        self._socket_prev: tuple[int, int] | None = None
        # FedAvg without the screen folds each update into a float64 sum as it arrives: memory
        # O(model) whatever the number of clients. The screen and the robust aggregators compare
        # updates with each other, so they keep every update of a round until it ends.
        # DP-FedAvg folds clipped deltas in the same way (the screen would look at unnoised updates)
        self.streaming = self.strategy.aggregator == "fedavg" and (cfg.screen_factor == 0 or self.dp is not None)
        self._stream: StreamingFedAvg | None = None
        # pipeline: the evaluator thread evaluates and checkpoints round r while round r+1 trains
        self._eval_model = self.spec.build(cfg.seed)
        # personalised schemes keep part of the model on the clients: their accuracy is the
        # clients' own (follow-up reports), the coordinator's is only the global part's
        self.personalised = bool(local_state(self.model))
        self._evaluator: ThreadPoolExecutor | None = None
        self._pending: list[PendingRound] = []
        self._accepted: dict[str, set[str]] = {}          # task id -> clients whose update was accepted
        self._reports: dict[str, dict[str, dict]] = {}    # task id -> client -> follow-up report

    def _emit(self, event) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:  # a listener's bug must not end the run
            log.exception("event listener failed on %s", type(event).__name__)

    def _resume(self) -> None:
        rows = self.run_dir.repair_metrics()
        if rows:
            last = rows[-1]["round"]
            state, spec, _ = load_checkpoint(self.run_dir.checkpoint(last))
            if spec != self.spec:
                raise ValueError(f"resume: checkpoint model {spec} differs from the config's {self.spec}")
            load_state(self.model, state)
            self.state = global_state(self.model)
            self.start_round = last + 1
            self.rows = rows
            if self.dp is not None:
                self.dp.resume(rows)  # the spent budget and the clip norm carry over
            if isinstance(rows[-1].get("wall_s"), (int, float)):
                self._wall_base = float(rows[-1]["wall_s"])
        log.info("resuming %s at round %d", self.run_dir.root, self.start_round)

    # --- inbound -----------------------------------------------------------------------------
    def _status_payload(self, state: str) -> bytes:
        self._status_sent = time.monotonic()
        payload = self.seal.seal(Message(MessageKind.STATUS, self.cfg.run_id, 0, "coordinator",
                                         meta=Status(state, role="coordinator",
                                                     coordinator_session=self._session_token).to_meta())).data
        if state == "online":
            self._status_last = payload
        return payload

    def _wait_for_clients(self) -> list[str]:
        deadline = time.monotonic() + self.cfg.wait_clients_s
        while len(self.registry.live()) < self.cfg.min_clients:
            if time.monotonic() > deadline:
                keys = sum(self.ignored.get(r, 0) for r in ("bad_signature", "unknown_sender"))
                hint = (f" ({keys} message(s) from clients did not verify against trusted_keys "
                        f"{self.cfg.trusted_keys}: wrong keys? see the log)" if keys else "")
                raise RunFailed(f"only {len(self.registry.live())} live clients after "
                                f"{self.cfg.wait_clients_s:.0f}s; need min_clients={self.cfg.min_clients}{hint}")
            self._pump(0.5, until=lambda: len(self.registry.live()) >= self.cfg.min_clients)
        self._pump(0.0, until=lambda: len(self.session.inbox) == 0)  # what already arrived counts too
        return self.registry.live()

    def _lr(self, rnd: int) -> float:
        return self.cfg.lr * self.cfg.lr_decay ** (rnd - 1)

    def _task(self, rnd: int, attempt: int, sampled: list[str]) -> Task:
        cfg = self.cfg
        train = TrainParams(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=self._lr(rnd),
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed * 100_003 + rnd)
        return Task(task_id=f"{self._session_token}-{rnd}-{attempt}", selected=tuple(sampled), spec=self.spec,
                    train=train, attempt=attempt, init_seed=cfg.seed, deadline_s=cfg.round_deadline_s,
                    uplink=cfg.uplink, max_packet=cfg.max_packet, digest=self._uplink_digest,
                    dp=self.dp.task_params() if self.dp is not None else None)

    def _digest_for(self, receivers) -> str:
        """BLAKE3 when this run may use it and every receiver announced it can check it; else SHA-256."""
        ok = self._uplink_digest == "blake3" and all(
            (info := self.registry.get(c)) is not None and "blake3" in info.digests for c in receivers)
        digest = "blake3" if ok else "sha256"
        if digest != self._task_digest:
            log.info("tasks are digested with %s from now on", digest)
            self._task_digest = digest
        return digest

    def _send_task(self, rnd: int, task: Task, live: list[str]) -> dict:
        cfg = self.cfg
        if self.lean is not None:  # deltas to the clients that hold the previous state
            return self.lean.send_task(self, rnd, task, live)
        self._task_msg = Message(MessageKind.TASK, cfg.run_id, rnd, "coordinator", self.state, task.to_meta())
        broadcast = set(task.selected) == set(live)
        enc = self.seal.seal(self._task_msg, self.wire, digest=self._digest_for(live if broadcast else task.selected))
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

    def _collect(self, rnd: int, attempt: int, live: list[str], eligible: list[str]) -> tuple[list[str], dict]:
        """One attempt: sample from ``eligible``, send the task, wait for replies until all or the
        deadline. ``live``: every live client (a task for all of them goes out as one broadcast)."""
        sampled = self.strategy.sample(eligible, rnd, attempt)
        if self.dp is not None:  # before anything is sent: a round past the budget never starts
            try:
                self._dp_plan = self.dp.plan(len(eligible), len(sampled))
            except ValueError as exc:
                raise RunFailed(f"round {rnd}: {exc}") from None
            self.dp.check(self._dp_plan[0], rnd)
        task = self._task(rnd, attempt, sampled)
        self._results, self._failures = {}, {}
        self._resent: Counter = Counter()
        self._resends.forget(keep_task=task.task_id)
        self._stream = (self.dp.accumulator(self.state) if self.dp is not None
                        else StreamingFedAvg(self.state) if self.streaming else None)
        if not sampled:  # Poisson sampling drew nobody: the round releases the noise alone (docs/privacy.md)
            return sampled, task.task_id, Counter()
        announced = {c: info.num_examples for c in sampled if (info := self.registry.get(c)) is not None}
        self._attempt = RoundState(self.cfg.run_id, rnd, task.task_id, frozenset(sampled), frozenset(), self.state,
                                   self.cfg.max_examples, announced, self.cfg.max_weight_ratio)
        for c in sampled:  # each sampled client may reply (update + report) however short the round
            self.session.inbox.grant(self.topics.update(c), self._partial_cap)
        t_send = time.monotonic()
        sent, complete = self._send_task(rnd, task, live)
        self._timing["send_s"] += time.monotonic() - t_send
        self._submit_evals()  # the previous round's evaluation overlaps this round's training
        self._emit(TaskSent(rnd, attempt, tuple(sampled)))
        # a task that did not reach the broker will get no replies: try again at once
        deadline = time.monotonic() + (self.cfg.round_deadline_s if complete else 0.0)
        connects = self.session.connects
        while time.monotonic() < deadline:
            pending = [c for c in sampled if c not in self._results and c not in self._failures]
            if not pending:
                break
            if self.session.connects != connects:  # we reconnected: replies sent meanwhile are lost
                connects = self.session.connects
                self._reask(pending, ours=True)
            if not any(self.registry.is_live(c) for c in pending):  # last will, offline, or silent
                log.warning("round %d attempt %d: %s gone; not waiting for the deadline", rnd, attempt,
                            ", ".join(pending))
                break
            self._pump(min(0.5, max(0.0, deadline - time.monotonic())),
                       until=lambda: self._row_ready() or all(c in self._results or c in self._failures
                                                              for c in sampled))
            self._finalize()  # the previous round's line, once evaluated and reported
        return sampled, task.task_id, Counter(sent) + self._resent

    def _reask(self, clients: list[str], *, ours: bool = False) -> None:
        """Send the current task again to those of ``clients`` that were sampled and have not
        answered, after a reconnect (ours or theirs) may have lost their update on the way. A
        client that already trained sends its update again; one that never got the task runs it.
        A reconnect a client announces is its word only: at most ``ResendLimiter.max_per_task``
        re-sends per (client, task), a few seconds apart (``ours``: our own reconnect, which our
        session saw, is not limited)."""
        a = self._attempt
        pending = [c for c in clients if a is not None and c in a.sampled and c not in a.replied]
        if not ours:
            refused = [c for c in pending if not self._resends.allow(c, a.task_id)]
            if refused:
                self.ignored["resend_limited"] += len(refused)
                pending = [c for c in pending if c not in refused]
        if not pending or self._task_msg is None:
            return
        # a fresh seq: the first one was seen already
        enc = (self.lean.resend_enc(self, pending) if self.lean is not None
               else self.seal.seal(self._task_msg, self.wire, digest=self._digest_for(pending)))
        for c in pending:
            topic = self.topics.task_for(c)
            frames, stats = enc.split(self.cfg.max_packet, topic)
            for frame in frames:
                self.session.publish(topic, frame)
            self._resent.update({"bytes_down": enc.stats.payload_bytes, "mqtt_bytes_down": stats.framed_bytes,
                                 "raw_bytes_down": enc.stats.raw_bytes, "receivers": 1})
        log.info("round %d: asked %s again after a reconnect", a.round, ", ".join(pending))

    def _run_round(self, rnd: int) -> None:
        """Collect and aggregate round ``rnd``; its evaluation and checkpoint go to the evaluator
        thread, and the next round's task goes out at once (the metrics line follows later)."""
        cfg = self.cfg
        t0 = time.monotonic()
        self._timing = {"send_s": 0.0}
        sent: Counter = Counter()  # every attempt's bytes count: they crossed the wire
        self._up_framed = 0
        failures: dict[str, str] = {}  # every attempt's failure replies: each counts against its client only
        for attempt in range(1, cfg.max_attempts + 1):
            live = self._wait_for_clients()
            eligible = self.failing.eligible(live, rnd, failures)
            if not eligible:
                self._failures = failures
                raise RunFailed(f"round {rnd}: every live client failed this round" + self._failure_text())
            sampled, task_id, attempt_sent = self._collect(rnd, attempt, live, eligible)
            sent.update(attempt_sent)
            for c, reason in self._failures.items():
                failures[c] = reason
                rest = self.failing.failed(c, rnd, reason)
                if rest:
                    log.warning("round %d: %s failed %d rounds in a row; it sits out %d round(s)",
                                rnd, c, self.failing.streak[c], rest)
            for c in self._results:
                self.failing.succeeded(c)
            needed = max(1, math.ceil(cfg.min_reply_fraction * len(sampled)))
            if len(self._results) >= needed or not sampled:
                break
            log.warning("round %d attempt %d: %d of %d sampled clients replied (need %d); model kept%s",
                        rnd, attempt, len(self._results), len(sampled), needed,
                        "; sampling again from the others" if self._failures else "")
            self._accepted.pop(task_id, None)
            self._reports.pop(task_id, None)
        else:
            self._failures = failures
            raise RunFailed(f"round {rnd}: too few replies after {cfg.max_attempts} attempts"
                            + self._failure_text())
        t_collected = time.monotonic()
        self._timing["wait_s"] = t_collected - t0 - self._timing["send_s"]
        results = list(self._results.values())
        self._attempt = None
        self._finalize(block=True)  # round rnd-1's line: its reports came before these updates
        if self.session.inbox.dropped:
            self.ignored["backpressure"] = sum(self.session.inbox.dropped.values())
        screened: list[str] = []
        privacy: dict = {}
        try:
            if self.dp is not None:
                new_state, privacy = self.dp.release(self._stream, *self._dp_plan)
            elif self._stream is not None:
                new_state = self._stream.result()
            else:
                kept, screened = self.strategy.screen(self.state, results)
                for c in screened:
                    self.ignored["screened"] += 1
                    log.warning("round %d: update from %s screened out (far from the others)", rnd, c)
                new_state = self.strategy.aggregate(self.state, kept) if kept else None
        except ValueError as exc:  # e.g. krum:F with fewer than 2F + 3 updates this round
            log.warning("round %d: %s cannot aggregate: %s", rnd, self.cfg.aggregator, exc)
            new_state = None
        self._stream = None
        refused = None
        if new_state is None:
            refused = "all updates screened"
        else:
            ok, move, limit = self.guard.check(self.state, new_state)
            if not ok:
                refused = (f"the aggregate would move the model by {move:.3g} (limit {limit:.3g}: max_step_factor "
                           f"{cfg.max_step_factor:g} x the recent moves)" if move == move and move != float("inf")
                           else "the aggregate is not finite")
        if refused is not None:
            self.ignored["aggregate_rejected"] += 1
            log.warning("round %d: aggregate refused, model kept: %s", rnd, refused)
        else:
            self.state = new_state
        self._timing["aggregate_s"] = time.monotonic() - t_collected
        fields = dict(rnd=rnd, attempt=attempt, sampled=sampled, broadcast=set(sampled) == set(live), sent=sent,
                      mqtt_bytes_up=self._up_framed, dense_bytes=self.dense_bytes, lr=self._lr(rnd),
                      duration_s=time.monotonic() - t0)
        # the line's fields beyond report.round_row's: added to it as they are
        extra = {"screened": screened, "failures": failures, "backed_off": self.failing.backed_off(rnd + 1),
                 **({"aggregate_refused": refused} if refused is not None else {}),  # the model was kept: why
                 **privacy,  # epsilon, delta and the round's DP record (resume rebuilds the budget from it)
                 "wall_s": round(self._wall_base + time.monotonic() - self._t_start, 3)}  # the aggregate's time
        socket = {}
        sock = self.session.socket_bytes()
        if sock is not None:  # what the coordinator's own TCP connection moved this round (kernel count)
            prev = self._socket_prev or sock
            socket = {"socket_bytes_sent": sock[0] - prev[0], "socket_bytes_received": sock[1] - prev[1]}
        self._socket_prev = sock
        light = [dataclasses.replace(r, state={}) for r in results]  # the tensors are folded in already
        evaluate_now = rnd == cfg.rounds or rnd % cfg.eval_every == 0
        # submitted once the next task is out (_submit_evals): evaluating would slow its sending
        self._pending.append(PendingRound(rnd, task_id, fields, extra, light, None, dict(self._timing), socket,
                                          (self.state, evaluate_now)))

    def _submit_evals(self) -> None:
        for p in self._pending:
            if p.future is None:
                p.future = self._evaluator.submit(self._evaluate_and_save, p.round, *p.job)
                p.job = None

    def _evaluate_and_save(self, rnd: int, state: dict, evaluate_now: bool) -> tuple[dict | None, float, float]:
        """Evaluator thread: the round's global model on the test data, then its checkpoint."""
        t0 = time.monotonic()
        ev = None
        if evaluate_now:
            load_state(self._eval_model, state)
            ev = evaluate(self._eval_model, self.test_data, batch_size=self.cfg.eval_batch_size)
        t1 = time.monotonic()
        save_checkpoint(self.run_dir.checkpoint(rnd), state, self.spec, round=rnd,
                        accuracy=None if ev is None else ev["accuracy"], run_id=self.cfg.run_id)
        return ev, t1 - t0, time.monotonic() - t1

    def _row_ready(self) -> bool:
        p = self._pending[0] if self._pending else None
        return p is not None and p.future is not None and p.future.done() and self._reports_in(p)

    def _reports_in(self, p: PendingRound) -> bool:
        got = self._reports.get(p.task_id, {})
        return all(r.client_id in got for r in p.results if r.metrics.get("report_follows") is True)

    def _finalize(self, block: bool = False, grace_s: float = 0.0) -> None:
        """Write the metrics lines of the pending rounds whose evaluation is done (in order).
        ``block``: wait for the evaluations (with ``grace_s``: and pump up to that long for the
        clients' follow-up reports). Without it, only evaluated rounds whose reports are all in."""
        if block:
            self._submit_evals()
        while self._pending:
            p = self._pending[0]
            if not block and not self._row_ready():
                return
            if grace_s > 0 and not self._reports_in(p):
                self._pump(grace_s, until=lambda: self._reports_in(p))
            try:
                ev, eval_s, save_s = p.future.result()
            except (OSError, SafetensorError) as exc:  # a full disk, a read-only or vanished directory
                self._pending.clear()
                raise RunFailed(f"round {p.round}: cannot write the run directory {self.run_dir.root}: {exc}; "
                                "free space and --resume (no round is lost or repeated)", resumable=True) from None
            self._pending.pop(0)
            self._write_row(p, ev, eval_s, save_s)

    def _write_row(self, p: PendingRound, ev: dict | None, eval_s: float, save_s: float) -> None:
        reports = self._reports.pop(p.task_id, {})
        self._accepted.pop(p.task_id, None)
        results = [dataclasses.replace(r, metrics={**r.metrics, **reports.get(r.client_id, {})}) for r in p.results]
        row = report.round_row(**p.fields, evaluation=ev or {"accuracy": None, "loss": None}, results=results,
                               ignored=self.ignored, personalised=self.personalised)
        row.update(p.extra)
        row["timing"] = {**p.timing, "eval_s": eval_s, "save_s": save_s}
        row.update(p.socket)
        try:  # the checkpoint is on disk already: a resume redoes a round without its line
            self.run_dir.append_metrics(row)
        except OSError as exc:
            raise RunFailed(f"round {p.round}: cannot write the run directory {self.run_dir.root}: {exc}; "
                            "free space and --resume (no round is lost or repeated)", resumable=True) from None
        self.rows.append(row)
        self._emit(RoundCompleted(p.round, row))

    def _failure_text(self) -> str:
        return "; " + "; ".join(f"{c}: {r}" for c, r in sorted(self._failures.items())) if self._failures else ""

    def run(self) -> dict:
        cfg = self.cfg
        t0 = self._t_start = time.monotonic()
        # an unpredictable MQTT client id: nobody can take over our session by connecting with it
        # each sender topic may hold two updates' worth of unread bytes and refills that budget in
        # 10 s: an honest client sends one update per round; a flood beyond is dropped and counted
        budget = max(4 << 20, 2 * self._partial_cap)
        inbox = Inbox(per_topic_bytes=budget, total_bytes=1 << 30, rate_bytes_per_s=max(1 << 20, budget / 10))
        self.session = MqttSession(self.broker, f"coordinator-{cfg.run_id}-{secrets.token_hex(4)}",
                                   [(self.topics.status_all, 1), (self.topics.update_all, 1), (self.topics.coordinator, 1)],
                                   will=(self.topics.coordinator, self._status_payload("offline"), 1, True),
                                   inbox=inbox)
        self.session.start()
        self._socket_prev = self.session.socket_bytes()
        self.session.publish(self.topics.coordinator, self._status_payload("online"), retain=True)
        status = "interrupted"  # unless the loop ends or fails cleanly: then clients keep waiting
        tell_clients = False
        self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="evaluator")
        try:
            self._pump(0.5)  # the clients' retained statuses arrive in a burst after subscribing
            for rnd in range(self.start_round, cfg.rounds + 1):
                self._run_round(rnd)
            self._finalize(block=True, grace_s=min(REPORT_GRACE_S, cfg.round_deadline_s))
            status, tell_clients = "completed", True
        except BudgetExhausted as exc:  # a clean stop, said as such: the budget is the operator's limit
            status, tell_clients = f"stopped: {exc}", True
            log.warning("%s", exc)
            self._finalize(block=True)
        except RunFailed as exc:
            status, tell_clients = f"failed: {exc}", not exc.resumable
            log.error("%s", exc)
            if not exc.resumable:  # rounds aggregated before the failure still get their lines
                try:
                    self._finalize(block=True)
                except RunFailed as late:
                    log.error("%s", late)
        finally:
            try:
                self._evaluator.shutdown(wait=True)
                self._finish(status, tell_clients)
            finally:
                self.session.stop()
        return self._summary(status, time.monotonic() - t0)

    def _finish(self, status: str, tell_clients: bool) -> None:
        """Tell the clients the run is over (not after a crash, Ctrl-C or a resumable failure such
        as a full disk: a resume may follow)."""
        if tell_clients:
            done = self.rows[-1]["round"] if self.rows else 0
            msg = Message(MessageKind.CONTROL, self.cfg.run_id, done, "coordinator",
                          meta=Control("finish", status, done, self._session_token).to_meta())
            self.session.publish_all(self.topics.control, [self.seal.seal(msg).data], timeout=10)
        self.session.publish(self.topics.coordinator, self._status_payload("offline"), retain=True).wait_for_publish(5)

    def _summary(self, status: str, wall: float) -> dict:
        rows = self.rows
        summary = report.summarize(
            rows, status=status, run_id=self.cfg.run_id, spec=self.spec.to_dict(), wall_s=wall,
            params=sum(t.numel() for t in self.state.values()), digest=state_digest(self.state),
            ignored=dict(self.ignored), failing_clients=self.failing.report(),
            **({"privacy": {"epsilon": self.dp.accountant.epsilon(), "delta": self.dp.delta, "mode": self.dp.mode,
                            "noise_multiplier": self.dp.z, "max_epsilon": self.dp.max_epsilon or None,
                            "rounds_released": len(self.dp.accountant.events)}} if self.dp is not None else {}),
            checkpoint=str(self.run_dir.checkpoint(rows[-1]["round"])) if rows else None)
        try:
            self.run_dir.write_summary(summary)
        except OSError as exc:  # a full disk must not turn a clean failure into a traceback
            log.error("cannot write %s: %s", self.run_dir.summary_path, exc)
        return summary
