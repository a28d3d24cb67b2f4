"""Asynchronous buffered rounds (``mode = "async"``; docs/async.md): FedBuff over MQTT.

A version clock replaces the round barrier. Every idle live client (at most ``clients_per_round``
at once; 0: all) is handed the newest global factors as soon as it is idle; its update is folded
into a buffer as it arrives, and every ``buffer_size`` updates the buffer becomes the next global
version (``rounds`` counts versions). An update trained on version ``v`` while the model is at
version ``V`` has staleness ``s = V - v``; its delta is scaled by ``1 / sqrt(1 + s)`` (FedBuff's
polynomial choice: the weight falls slowly, so a slow device still counts, but a very old
direction counts less) and it is refused past ``max_staleness`` (``ignored["too_stale"]``).

A stale update is a delta from the version it was trained on. The buffer holds it as
``current + w(s) (update - base)``, weighted by its example count: FedAvg of the buffer is then
``current + sum_i n_i / N w(s_i) delta_i``, FedBuff's step (server lr 1). The staleness weight
shrinks the step, it is not renormalised away: deltas computed on an older model would otherwise
move the model as far as fresh ones, once per version, and overshoot. It is the same factor-space
state a fresh update would be, so the
strategy's accumulator (streaming FedAvg, the screen, the robust aggregators) and the step guard
work on the buffer unchanged. The coordinator keeps the global state of every version some task
in flight was trained on: at most ``max_staleness + 1`` models (docs/async.md, memory).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

from torch import Tensor

from .acceptance import RoundState
from .attempt import RoundTally
from .events import TaskSent
from .strategy import Accumulator, FitResult

log = logging.getLogger("coordinator.server")


def staleness_weight(staleness: int) -> float:
    """FedBuff's polynomial staleness weight, 1 / sqrt(1 + s)."""
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclasses.dataclass
class InFlight:
    """A task one client is training: the version it was handed and the rules its reply meets."""

    version: int
    rules: RoundState
    sent_at: float


class AsyncWindow:
    """The tasks in flight and the buffer of the next version. Plays the attempt's part for the
    inbound side (``rules_for``, ``accept``, ``fail``, ``reask``)."""

    def __init__(self, run_id: str, version: int, state: dict[str, Tensor], accumulator: Accumulator,
                 max_staleness: int) -> None:
        self.run_id, self.version, self.state, self.max_staleness = run_id, version, state, max_staleness
        self.bases: dict[int, dict[str, Tensor]] = {version: state}
        self.in_flight: dict[str, InFlight] = {}
        self.accumulator = accumulator
        self.results: dict[str, FitResult] = {}   # this version's buffer (tensors folded in)
        self.staleness: dict[str, int] = {}
        self.failures: dict[str, str] = {}
        self.answered: dict[str, RoundState] = {}  # buffered clients -> their task (its id goes on the line; a redelivery is a duplicate)
        self.refused_stale = 0
        self.expired = 0

    # --- what the inbound side asks -------------------------------------------------------------
    @property
    def round(self) -> int:
        return self.version + 1

    @property
    def sampled(self) -> frozenset[str]:
        return frozenset(self.results) | frozenset(self.in_flight)

    def rules_for(self, client: str) -> RoundState:
        f = self.in_flight.get(client)
        if f is not None:
            return f.rules
        if client in self.answered:
            return dataclasses.replace(self.answered[client], replied=frozenset([client]))
        # no task in flight: judge_update refuses it (stale, or not_sampled)
        return RoundState(self.run_id, self.round, "", frozenset(), frozenset(), self.state)

    def accept(self, result: FitResult) -> str | None:
        f = self.in_flight.pop(result.client_id)
        s = self.version - f.version
        if s > self.max_staleness:
            self.refused_stale += 1
            return "too_stale"
        base = self.bases[f.version]
        state = {}
        for k, v in result.state.items():
            v = v.to(base[k].dtype)
            state[k] = self.state[k] + staleness_weight(s) * (v - base[k]) if v.is_floating_point() and s else v
        self.results[result.client_id] = self.accumulator.add(dataclasses.replace(result, state=state))
        self.answered[result.client_id] = f.rules
        self.staleness[result.client_id] = s
        return None

    def fail(self, client: str, reason: str) -> None:
        self.in_flight.pop(client, None)
        self.failures[client] = reason[:300]

    def reask(self, outbound, clients: list[str], *, ours: bool = False) -> None:
        """A reconnect may have lost a task or its reply: the client is idle again and gets the newest
        version (a reply to its old task is refused as stale)."""
        for c in clients:
            self.in_flight.pop(c, None)

    # --- what the loop does ---------------------------------------------------------------------
    def dispatched(self, client: str, rules: RoundState) -> None:
        self.in_flight[client] = InFlight(self.version, rules, time.monotonic())

    def release(self, state: dict[str, Tensor], accumulator: Accumulator) -> None:
        """The buffer became version ``version + 1`` with global ``state``; a fresh buffer starts.
        Bases no task in flight needs any more are dropped."""
        self.version += 1
        self.state, self.accumulator = state, accumulator
        self.bases[self.version] = state
        needed = {f.version for f in self.in_flight.values()} | {self.version}
        for v in [v for v in self.bases if v not in needed]:
            del self.bases[v]
        self.results, self.staleness, self.failures, self.answered = {}, {}, {}, {}
        self.refused_stale = self.expired = 0


class AsyncRounds:
    """Runs a coordinator's versions (see the module docstring); the coordinator's round machinery
    (outbound, inbound, ledger, strategy, step guard, failure back-off) does the rest."""

    def __init__(self, coordinator) -> None:
        self.c = coordinator
        self.dispatches = 0

    def run(self) -> None:
        c, cfg = self.c, self.c.cfg
        w = AsyncWindow(cfg.run_id, c.start_round - 1, c.state, c.strategy.accumulator(c.state), cfg.max_staleness)
        c.inbound.attempt = w
        tally = c.inbound.tally = RoundTally(w.round)
        try:
            while w.version < cfg.rounds:
                live = c._wait_for_clients()
                self._expire(w, tally, live)
                self._dispatch(w, tally, live)
                c.ledger.submit()  # the previous version's evaluation overlaps the training
                c._pump(0.5, until=lambda: len(w.results) >= cfg.buffer_size or c.ledger.ready())
                self._note_failures(w, tally)
                c.ledger.finalize()
                if len(w.results) >= cfg.buffer_size:
                    tally = self._release(w, tally)
        finally:
            c.inbound.attempt = None

    def _note_failures(self, w: AsyncWindow, tally: RoundTally) -> None:
        for client, reason in w.failures.items():
            if client not in tally.failures:
                tally.failures[client] = reason
                rest = self.c.failing.failed(client, w.round, reason)
                if rest:
                    log.warning("version %d: %s failed %d times in a row; it sits out %d version(s)",
                                w.round, client, self.c.failing.streak[client], rest)

    def _expire(self, w: AsyncWindow, tally: RoundTally, live: list[str]) -> None:
        """Tasks past the deadline, or whose client went offline, are dropped: the client (when
        live) is handed the newest version instead."""
        now = time.monotonic()
        for client, f in list(w.in_flight.items()):
            if client not in live or now - f.sent_at > self.c.cfg.round_deadline_s:
                del w.in_flight[client]
                w.expired += 1
                log.info("version %d: %s's task (version %d) %s; not waiting for it", w.round, client, f.version,
                         "timed out" if client in live else "lost: the client went offline")

    def _dispatch(self, w: AsyncWindow, tally: RoundTally, live: list[str]) -> None:
        c, cfg = self.c, self.c.cfg
        idle = [x for x in c.failing.eligible(live, w.round, {}) if x not in w.in_flight]
        room = (cfg.clients_per_round or len(live)) - len(w.in_flight)
        if not idle or room <= 0:
            return
        self.dispatches += 1
        chosen = c.strategy.sample(idle, w.round, self.dispatches)[:room]
        announced = {x: info.num_examples for x in live if (info := c.registry.get(x)) is not None}
        for client in chosen:
            task = c._task(w.round, self.dispatches, [client])
            rules = RoundState(cfg.run_id, w.round, task.task_id, frozenset([client]), frozenset(), w.state,
                               cfg.max_examples, announced, cfg.max_weight_ratio)
            c.session.inbox.grant(c.topics.update(client), c._partial_cap)
            t0 = time.monotonic()
            sent, _ = c.outbound.send(w.round, task, w.state, live)
            tally.timing["send_s"] += time.monotonic() - t0
            tally.sent.update(sent)
            w.dispatched(client, rules)
            c._emit(TaskSent(w.round, self.dispatches, (client,)))

    def _release(self, w: AsyncWindow, tally: RoundTally) -> RoundTally:
        c = self.c
        tally.timing["wait_s"] = time.monotonic() - tally.started - tally.timing["send_s"]
        for client in w.results:
            c.failing.succeeded(client)
        stale = sorted(w.staleness.values())
        extra = {"mode": "async", "version": w.round, "staleness": dict(sorted(w.staleness.items())),
                 "staleness_max": stale[-1] if stale else 0, "in_flight": len(w.in_flight),
                 "too_stale": w.refused_stale, "expired": w.expired}
        results = list(w.results.values())
        c._conclude(tally, w.accumulator, attempt=1, sampled=sorted(w.results), broadcast=False, results=results,
                    tasks={c: rules.task_id for c, rules in w.answered.items()}, extra=extra)
        w.release(c.state, c.strategy.accumulator(c.state))
        log.info("version %d released (%d updates, staleness %s, %d in flight)", w.version, len(results),
                 stale, len(w.in_flight))
        tally = c.inbound.tally = RoundTally(w.round)
        return tally
