"""The coordinator's round loop (paper Alg. 1 over MQTT; docs/protocol.md). Orchestration only.

Each round: wait for enough live clients, let the strategy sample K, publish the global factors
once (broker fan-out) or per client, collect updates until every sampled client replied or the
deadline passed, then release the strategy's aggregate if at least ``min_reply_fraction`` replied;
otherwise keep the model and sample again. The evaluation, checkpoint and metrics.jsonl line follow
on the evaluator thread while the next round trains.

Who decides what: a :class:`~coordinator.attempt.RoundAttempt` holds one attempt's replies and its
accumulator, a :class:`~coordinator.attempt.RoundTally` what the round's attempts add up to;
:mod:`.inbound` drains and opens messages, :mod:`.outbound` seals and publishes tasks,
:mod:`.strategy` samples and aggregates, :mod:`.acceptance` judges each update, :mod:`.registry`
knows who is live, :mod:`.ledger` writes each round down, :class:`~fedpara.runtime.rundir.RunDir`
owns the files. Failures are values: every refused message is counted under ``ignored``; nothing
a client sends can crash the loop.
"""
from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter

from fedpara import global_state, load_state, local_state
from fedpara.data import load_test_data
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import load_checkpoint, state_digest
from fedpara.runtime.inbox import Inbox
from fedpara.runtime.messages import Control, Task, TrainParams
from fedpara.runtime.mqtt import BrokerURL, MqttSession
from fedpara.runtime.rundir import RunDir
from fedpara.runtime.topics import Topics
from fedpara.state import state_bytes
from fedpara.training import check_model_fits_data
from fedpara.wire import Message, MessageKind

from .observation import records
from .acceptance import RoundState
from .aggregate import StepGuard
from .asyncloop import AsyncRounds
from .attempt import RoundAttempt, RoundTally
from .backoff import FailureTracker
from .config import CoordinatorConfig
from .errors import RunFailed
from .events import TaskSent
from .inbound import Inbound
from .ledger import PendingRound, RoundLedger
from .outbound import Outbound
from .presence import Presence, trust
from .privacy import BudgetExhausted, PrivacyLedger
from .registry import ClientRegistry
from .server_opt import ServerOptimizer
from .strategy import Aggregate, Strategy

log = logging.getLogger(__name__)

REPORT_GRACE_S = 10.0  # after the last round, how long to wait for the clients' follow-up reports

__all__ = ["Coordinator", "RunFailed"]


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, broker: BrokerURL, *, resume: bool = False, on_event=None) -> None:
        self.cfg, self.broker = cfg, broker
        self.topics = Topics(cfg.run_id)
        self.run_dir = RunDir(cfg.out)
        self.on_event = on_event
        self.spec: ModelSpec = cfg.spec
        # differential privacy (docs/privacy.md): DP-FedAvg, secret sampling, a budget that ends the run
        self.dp = PrivacyLedger(cfg) if cfg.dp_noise_multiplier > 0 else None
        self.strategy = Strategy(cfg.clients_per_round, cfg.seed, cfg.aggregator, cfg.screen_factor,
                                 sampling=cfg.sampling, sample_rate=cfg.sample_rate, secret=self.dp is not None,
                                 privacy=self.dp, server_opt=ServerOptimizer.from_config(cfg))
        self.seal, opener = trust(cfg)
        self.registry = ClientRegistry()
        self.ignored: Counter = Counter()
        self.model = self.spec.build(cfg.seed)
        self.state = global_state(self.model)
        self.dense_bytes = state_bytes(self.spec.dense().build(cfg.seed).state_dict())
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        self.test_data = load_test_data(cfg.test_data)
        check_model_fits_data(self.model, self.spec, self.test_data, cfg.test_data)
        # personalised schemes keep part of the model on the clients: their accuracy is the
        # clients' own (follow-up reports), the coordinator's is only the global part's
        self.personalised = bool(local_state(self.model))
        # pipeline: the evaluator thread evaluates and checkpoints round r while round r+1 trains
        self.ledger = RoundLedger(self.run_dir, cfg, self.spec.build(cfg.seed), self.test_data,
                                  personalised=self.personalised, ignored=self.ignored, emit=self._emit)
        self.presence = Presence(self.seal, cfg.run_id, self.topics.coordinator)
        from .leanwire import LeanServer  # delta coding (docs/compression.md); None: whole states
        self.lean = LeanServer(cfg, self.spec, cfg.out, resume=resume) if cfg.wire != "plain" else None
        self.outbound = Outbound(cfg, self.topics, self.seal, self.registry, self.ignored, broker, lean=self.lean)
        # a sender's unfinished messages may hold at most two full fp32 updates of this model
        self._partial_cap = max(1 << 20, 2 * state_bytes(self.state) + (1 << 16))
        self.inbound = Inbound(cfg, self.topics, opener, self.registry, self.presence, self.ledger,
                               ignored=self.ignored, partial_cap=self._partial_cap, emit=self._emit, lean=self.lean,
                               reask=self._reask)
        self.start_round = 1
        # wall_s of every metrics line: seconds since the run started (a resumed run goes on from its
        # last line's, not counting the time it was down), so time-to-accuracy reads off any run
        self._wall_base, self._t_start = 0.0, time.monotonic()
        self._first_task_s: float | None = None  # wall_s when this process sent its first task
        if resume:
            self._resume()
        else:
            if self.run_dir.holds_rounds():
                raise ValueError(f"out: {self.run_dir.root} already holds a run; use --resume or another --out")
            self.run_dir.start_metrics()
        self.run_dir.write_config(cfg.to_dict())
        self.session: MqttSession | None = None
        self.failing = FailureTracker()  # a failing device sits out, the run goes on
        self.guard = StepGuard(cfg.max_step_factor)  # no aggregate moves the model unboundedly
        self._socket_prev: tuple[int, int] | None = None

    @property
    def rows(self) -> list[dict]:
        """The metrics.jsonl lines written so far."""
        return self.ledger.rows

    def abort(self, reason: str) -> None:
        """End the run as failed from another thread (e.g. the demo saw a client process die)."""
        self.inbound.abort(reason)

    def _emit(self, event) -> None:
        if isinstance(event, TaskSent) and self._first_task_s is None:  # the training clock starts here
            self._first_task_s = round(self._wall_base + time.monotonic() - self._t_start, 3)
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
            self.ledger.rows.extend(rows)
            if self.dp is not None:
                self.dp.resume(rows)  # the spent budget and the clip norm carry over
            if self.strategy.server_opt.stateful:  # its moments after that round, written beside the checkpoint
                self.ledger.resume_server_opt(self.strategy.server_opt, last)
            if isinstance(rows[-1].get("wall_s"), (int, float)):
                self._wall_base = float(rows[-1]["wall_s"])
        log.info("resuming %s at round %d", self.run_dir.root, self.start_round)

    def _reask(self, clients: list[str]) -> None:
        """A client reconnected: what it sent meanwhile may be lost (the current attempt decides)."""
        if self.inbound.attempt is not None:
            self.inbound.attempt.reask(self.outbound, clients)

    def _pump(self, timeout: float, until=None) -> None:
        self.inbound.pump(timeout, until)

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
                            momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed * 100_003 + rnd,
                            prox_mu=cfg.prox_mu)
        return Task(task_id=f"{self.presence.token}-{rnd}-{attempt}", selected=tuple(sampled), spec=self.spec,
                    train=train, attempt=attempt, init_seed=cfg.seed, deadline_s=cfg.round_deadline_s,
                    uplink=cfg.uplink, max_packet=cfg.max_packet, digest=self.outbound.uplink_digest,
                    dp=self.dp.task_params() if self.dp is not None else None)

    def _attempt(self, tally: RoundTally, number: int, live: list[str], eligible: list[str]) -> RoundAttempt:
        """One attempt: sample from ``eligible``, send the task, wait for replies until all or the
        deadline. ``live``: every live client (a task for all of them goes out as one broadcast)."""
        rnd = tally.number
        sampled = self.strategy.sample(eligible, rnd, number)
        dp_plan = None
        if self.dp is not None:  # before anything is sent: a round past the budget never starts
            try:
                dp_plan = self.dp.plan(len(eligible), len(sampled))
            except ValueError as exc:
                raise RunFailed(f"round {rnd}: {exc}") from None
            self.dp.check(dp_plan[0], rnd)
        task = self._task(rnd, number, sampled)
        announced = {c: info.num_examples for c in sampled if (info := self.registry.get(c)) is not None}
        rules = RoundState(self.cfg.run_id, rnd, task.task_id, frozenset(sampled), frozenset(), self.state,
                           self.cfg.max_examples, announced, self.cfg.max_weight_ratio)
        a = RoundAttempt(rules, self.strategy.accumulator(self.state, dp_plan), number)
        if not sampled:  # Poisson sampling drew nobody: the round releases the noise alone (docs/privacy.md)
            return a
        a.broadcast = set(sampled) == set(live)
        self.inbound.attempt = a
        for c in sampled:  # each sampled client may reply (update + report) however short the round
            self.session.inbox.grant(self.topics.update(c), self._partial_cap)
        t_send = time.monotonic()
        sent, complete = self.outbound.send(rnd, task, self.state, live)
        tally.timing["send_s"] += time.monotonic() - t_send
        tally.sent.update(sent)
        self.ledger.submit()  # the previous round's evaluation overlaps this round's training
        self._emit(TaskSent(rnd, number, tuple(sampled)))
        # a task that did not reach the broker will get no replies: try again at once
        deadline = time.monotonic() + (self.cfg.round_deadline_s if complete else 0.0)
        connects = self.session.connects
        while time.monotonic() < deadline and not a.done():
            if self.session.connects != connects:  # we reconnected: replies sent meanwhile are lost
                connects = self.session.connects
                a.reask(self.outbound, a.pending(), ours=True)
            if not any(self.registry.is_live(c) for c in a.pending()):  # last will, offline, or silent
                log.warning("round %d attempt %d: %s gone; not waiting for the deadline", rnd, number,
                            ", ".join(a.pending()))
                break
            self._pump(min(0.5, max(0.0, deadline - time.monotonic())),
                       until=lambda: self.ledger.ready() or a.done())
            self.ledger.finalize()  # the previous round's line, once evaluated and reported
        self.inbound.attempt = None
        return a

    def _collect(self, tally: RoundTally) -> RoundAttempt:
        """Attempts until enough sampled clients replied (each failure counts against its client)."""
        cfg, rnd = self.cfg, tally.number
        for number in range(1, cfg.max_attempts + 1):
            live = self._wait_for_clients()
            eligible = self.failing.eligible(live, rnd, tally.failures)
            if not eligible:
                raise RunFailed(f"round {rnd}: every live client failed this round" + tally.failure_text())
            a = self._attempt(tally, number, live, eligible)
            tally.close(a)
            for c, reason in a.failures.items():
                rest = self.failing.failed(c, rnd, reason)
                if rest:
                    log.warning("round %d: %s failed %d rounds in a row; it sits out %d round(s)",
                                rnd, c, self.failing.streak[c], rest)
            for c in a.results:
                self.failing.succeeded(c)
            needed = max(1, math.ceil(cfg.min_reply_fraction * len(a.sampled)))
            if len(a.results) >= needed or not a.sampled:
                return a
            log.warning("round %d attempt %d: %d of %d sampled clients replied (need %d); model kept%s",
                        rnd, number, len(a.results), len(a.sampled), needed,
                        "; sampling again from the others" if a.failures else "")
            self.ledger.forget(a.task_id)
        raise RunFailed(f"round {rnd}: too few replies after {cfg.max_attempts} attempts" + tally.failure_text())

    def _release(self, rnd: int, agg: Aggregate) -> str | None:
        """Take the aggregate as the new global state unless the step guard refuses it; says why not."""
        for c in agg.screened:
            self.ignored["screened"] += 1
            log.warning("round %d: update from %s screened out (far from the others)", rnd, c)
        refused, new = agg.refused, None
        if agg.state is not None:
            new = self.strategy.step(self.state, agg.state)
            ok, move, limit = self.guard.check(self.state, new)
            if not ok:
                refused = (f"the aggregate would move the model by {move:.3g} (limit {limit:.3g}: max_step_factor "
                           f"{self.cfg.max_step_factor:g} x the recent moves)" if move == move and move != float("inf")
                           else "the aggregate is not finite")
        if refused is not None:
            self.ignored["aggregate_rejected"] += 1
            log.warning("round %d: aggregate refused, model kept: %s", rnd, refused)
        else:
            self.state = new
            self.strategy.commit()  # the server optimiser's moments move with the state, not otherwise
        if self.strategy.server_opt.stateful:  # checkpointed with the round (resume continues exactly)
            self.ledger.keep_server_opt(rnd, self.strategy.server_opt)
        return refused

    def _run_round(self, rnd: int) -> None:
        """Collect and aggregate round ``rnd``; its evaluation and checkpoint go to the evaluator
        thread, and the next round's task goes out at once (the metrics line follows later)."""
        tally = self.inbound.tally = RoundTally(rnd)
        a = self._collect(tally)
        tally.timing["wait_s"] = time.monotonic() - tally.started - tally.timing["send_s"]
        self.ledger.finalize(block=True)  # round rnd-1's line: its reports came before these updates
        self._conclude(tally, a.accumulator, attempt=a.number, sampled=sorted(a.sampled), broadcast=a.broadcast,
                       results=list(a.results.values()), tasks={c: a.task_id for c in a.results})

    def _conclude(self, tally: RoundTally, accumulator, *, attempt: int, sampled: list[str], broadcast: bool,
                  results: list, tasks: dict[str, str], extra: dict | None = None) -> None:
        """Release the accumulator's aggregate as round (or version) ``tally.number`` and hand the
        round to the ledger: evaluation, checkpoint and metrics line follow on the evaluator thread."""
        rnd, t0 = tally.number, time.monotonic()
        if self.session.inbox.dropped:
            self.ignored["backpressure"] = sum(self.session.inbox.dropped.values())
        agg = accumulator.result()
        refused = self._release(rnd, agg)
        tally.timing["aggregate_s"] = time.monotonic() - t0
        fields = dict(rnd=rnd, attempt=attempt, sampled=sampled, broadcast=broadcast, sent=tally.sent,
                      mqtt_bytes_up=tally.mqtt_bytes_up, dense_bytes=self.dense_bytes, lr=self._lr(rnd),
                      duration_s=time.monotonic() - tally.started)
        # the line's fields beyond records.round_row's: added to it as they are
        extra = {**(extra or {}), "screened": list(agg.screened), "failures": tally.failures,
                 "backed_off": self.failing.backed_off(rnd + 1),
                 **({"aggregate_refused": refused} if refused is not None else {}),  # the model was kept: why
                 **agg.privacy,  # epsilon, delta and the round's DP record (resume rebuilds the budget from it)
                 "wall_s": round(self._wall_base + time.monotonic() - self._t_start, 3),  # the aggregate's time
                 "first_task_s": self._first_task_s}  # before it: waiting for the clients to come online
        socket = {}
        sock = self.session.socket_bytes()
        if sock is not None:  # what the coordinator's own TCP connection moved this round (kernel count)
            prev = self._socket_prev or sock
            socket = {"socket_bytes_sent": sock[0] - prev[0], "socket_bytes_received": sock[1] - prev[1]}
        self._socket_prev = sock
        evaluate_now = rnd == self.cfg.rounds or rnd % self.cfg.eval_every == 0
        # submitted once the next task is out (ledger.submit): evaluating would slow its sending
        self.ledger.add(PendingRound(rnd, tasks, fields, extra, results, dict(tally.timing), socket,
                                     job=(self.state, evaluate_now)))

    def _wait_reports(self, p: PendingRound) -> None:
        self._pump(min(REPORT_GRACE_S, self.cfg.round_deadline_s), until=lambda: self.ledger.reports_in(p))

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
                                   will=(self.topics.coordinator, self.presence.payload("offline"), 1, True),
                                   inbox=inbox)
        self.presence.session = self.inbound.session = self.outbound.session = self.session
        self.session.start()
        self._socket_prev = self.session.socket_bytes()
        self.presence.publish("online")
        status = "interrupted"  # unless the loop ends or fails cleanly: then clients keep waiting
        tell_clients = False
        self.ledger.start()
        try:
            self._pump(0.5)  # the clients' retained statuses arrive in a burst after subscribing
            if cfg.mode == "async":  # a version clock instead of rounds (docs/async.md)
                AsyncRounds(self).run()
            else:
                for rnd in range(self.start_round, cfg.rounds + 1):
                    self._run_round(rnd)
            self.ledger.finalize(block=True, wait_reports=self._wait_reports)
            status, tell_clients = "completed", True
        except BudgetExhausted as exc:  # a clean stop, said as such: the budget is the operator's limit
            status, tell_clients = f"stopped: {exc}", True
            log.warning("%s", exc)
            self.ledger.finalize(block=True)
        except RunFailed as exc:
            status, tell_clients = f"failed: {exc}", not exc.resumable
            log.error("%s", exc)
            if not exc.resumable:  # rounds aggregated before the failure still get their lines
                try:
                    self.ledger.finalize(block=True)
                except RunFailed as late:
                    log.error("%s", late)
        finally:
            try:
                self.ledger.stop()
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
                          meta=Control("finish", status, done, self.presence.token).to_meta())
            self.session.publish_all(self.topics.control, [self.seal.seal(msg).data], timeout=10)
        self.presence.publish("offline").wait_for_publish(5)

    def _summary(self, status: str, wall: float) -> dict:
        rows = self.rows
        summary = records.summarize(
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
