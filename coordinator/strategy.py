"""Strategy: which clients train each round and how their factors become the next global model.

Pure: no MQTT, no files, no clocks. The round loop asks :meth:`Strategy.sample` for the clients of
an attempt and :meth:`Strategy.accumulator` for what folds their replies in; the accumulator hands
back the round's :class:`Aggregate`. The aggregator and the screen are decided here and nowhere else:
the round loop never asks which aggregator runs. Tests call ``sample``, ``screen`` and ``aggregate``
directly (Prepare/Execute/Assert, as flower's ``server/strategy`` tests do). Aggregation is over the
*factors* (paper Alg. 1), never over composed weights.

Accumulators (one per attempt):

- :class:`StreamingAccumulator`: FedAvg without the screen folds each update into a float64 sum as
  it arrives: memory O(model) whatever the number of clients;
- :class:`BufferedAccumulator`: the screen and the robust aggregators compare updates with each
  other, so every update of the attempt is kept until it ends;
- :class:`PrivateAccumulator`: DP-FedAvg (docs/privacy.md) folds clipped deltas as they arrive and
  releases the noised average (the screen would look at unnoised updates, so it does not run).
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from . import aggregate as agg
from .server_opt import Moments, ServerOptimizer

if TYPE_CHECKING:  # the privacy ledger imports dp-accounting lazily; typing only here
    from .privacy import PrivacyLedger, RoundEvent

AGGREGATORS = ("fedavg", "median", "trimmed-mean:BETA", "krum:F", "norm-clip:TAU")


@dataclasses.dataclass(frozen=True)
class FitResult:
    """One accepted client reply: its factors, how many examples it trained on, its metrics."""

    client_id: str
    state: Mapping[str, Tensor]
    num_examples: int
    metrics: Mapping = dataclasses.field(default_factory=dict)
    payload_bytes: int = 0
    delta_norm: float | None = None  # L2 distance to the round's model, when taken on arrival


def parse_aggregator(text: str) -> tuple[str, float | None]:
    """``fedavg`` | ``median`` | ``trimmed-mean:BETA`` | ``krum:F`` | ``norm-clip:TAU`` -> (name, arg)."""
    name, _, arg = str(text).partition(":")
    needs = {"fedavg": False, "median": False, "trimmed-mean": True, "krum": True, "norm-clip": True}
    if name not in needs or needs[name] != bool(arg):
        raise ValueError(f"aggregator: expected one of {', '.join(AGGREGATORS)}, got {text!r}")
    if not arg:
        return name, None
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"aggregator: {name} needs a number after ':', got {arg!r}") from None
    if name == "trimmed-mean" and not 0 <= value < 0.5:
        raise ValueError(f"aggregator: trimmed-mean BETA must be in [0, 0.5), got {arg}")
    if name == "krum" and (value != int(value) or value < 0):
        raise ValueError(f"aggregator: krum F must be an int >= 0, got {arg}")
    if name == "norm-clip" and not (value > 0 and value != float("inf")):
        raise ValueError(f"aggregator: norm-clip TAU must be a finite number > 0, got {arg}")
    return name, value


@dataclasses.dataclass(frozen=True)
class Aggregate:
    """What an attempt's accumulator releases: the next global state (None: the model is kept,
    ``refused`` says why), the screened-out clients, and a DP round's privacy fields."""

    state: dict[str, Tensor] | None
    screened: tuple[str, ...] = ()
    privacy: Mapping = dataclasses.field(default_factory=dict)
    refused: str | None = None


class Accumulator(Protocol):
    def add(self, result: FitResult) -> FitResult:
        """Fold ``result`` in; returns what the round keeps of it (without tensors once folded)."""

    def result(self) -> Aggregate:
        """The attempt's aggregate (called once, after the last reply)."""


class Strategy:
    """Sample K of the live clients uniformly (seeded per round and attempt); combine the factors
    with the aggregator: FedAvg weighted by example counts (paper Alg. 1) by default, or a robust
    one (docs/security.md). Before that, the screen drops updates whose distance to the current
    model is more than ``screen_factor`` times the median distance (0 turns it off). With a
    privacy ledger, rounds are DP-FedAvg instead (``aggregator`` must be fedavg). The server
    optimiser (coordinator/server_opt.py; plain FedAvg by default) turns the aggregate into the
    next global state."""

    def __init__(self, clients_per_round: int = 0, seed: int = 0, aggregator: str = "fedavg",
                 screen_factor: float = 10.0, *, sampling: str = "fixed", sample_rate: float = 0.1,
                 secret: bool = False, privacy: PrivacyLedger | None = None,
                 server_opt: ServerOptimizer | None = None) -> None:
        if clients_per_round < 0:
            raise ValueError(f"clients_per_round: must be >= 0, got {clients_per_round}")
        self.clients_per_round, self.seed = clients_per_round, seed
        # poisson: each live client independently with probability sample_rate. secret: drawn from
        # the OS, not the run's seed (a DP run's amplification by sampling needs a sample nobody
        # can predict: docs/privacy.md)
        self.sampling, self.sample_rate, self.secret = sampling, sample_rate, secret
        self.aggregator, self.arg = parse_aggregator(aggregator)
        self.screen_factor = screen_factor
        self.privacy = privacy
        self.server_opt = server_opt or ServerOptimizer()
        self._proposed: Moments | None = None  # the last step's moments until it is committed

    @property
    def streams(self) -> bool:
        """Whether replies are folded in as they arrive (memory O(model)) rather than kept."""
        return self.privacy is not None or (self.aggregator == "fedavg" and self.screen_factor == 0)

    def accumulator(self, reference: Mapping[str, Tensor],
                    dp_plan: tuple[RoundEvent, float] | None = None) -> Accumulator:
        """A fresh accumulator for an attempt against the global state ``reference``; a DP run
        passes the attempt's (event, denominator) from :meth:`PrivacyLedger.plan`."""
        if self.privacy is not None:
            if dp_plan is None:
                raise ValueError("a DP round needs its plan (event, denominator)")
            return PrivateAccumulator(self.privacy, reference, dp_plan)
        if self.streams:
            return StreamingAccumulator(reference)
        return BufferedAccumulator(self, reference)

    def step(self, current: Mapping[str, Tensor], aggregate: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The next global state proposed from the current one and the round's aggregate: the
        server optimiser's step along ``aggregate - current`` (plain FedAvg: the aggregate itself).
        Call :meth:`commit` once the state is taken; a step that is not (the step guard refused
        it) leaves the optimiser's moments where they were, and the next ``step`` replaces it."""
        new, self._proposed = self.server_opt.propose(current, aggregate)
        return new

    def commit(self) -> None:
        """The state :meth:`step` proposed was taken: the server optimiser's moments move on."""
        if self._proposed is None:
            raise RuntimeError("commit: no step proposed since the last commit")
        self.server_opt.commit(self._proposed)
        self._proposed = None

    def sample(self, live: Sequence[str], rnd: int, attempt: int) -> list[str]:
        """K clients (all when K is 0 or at least the number live), sorted; reproducible for a
        given (seed, round, attempt) and set of live clients."""
        rng = random.SystemRandom() if self.secret else random.Random(f"{self.seed}/{rnd}/{attempt}")
        if self.sampling == "poisson":
            return [c for c in sorted(live) if rng.random() < self.sample_rate]
        k = len(live) if self.clients_per_round == 0 else min(self.clients_per_round, len(live))
        return sorted(rng.sample(sorted(live), k))

    def screen(self, current: Mapping[str, Tensor], results: Sequence[FitResult]) -> tuple[list[FitResult], list[str]]:
        """(kept results, ids of the screened-out clients), in client-id order."""
        ordered = sorted(results, key=lambda r: r.client_id)
        norms = [r.delta_norm for r in ordered]
        keep = set(agg.screen(current, [r.state for r in ordered], self.screen_factor,
                              None if None in norms else norms))
        return ([r for i, r in enumerate(ordered) if i in keep],
                [r.client_id for i, r in enumerate(ordered) if i not in keep])

    def aggregate(self, current: Mapping[str, Tensor], results: Sequence[FitResult]) -> dict[str, Tensor]:
        """The next global factors from the results (client-id order: deterministic)."""
        if not results:
            raise ValueError("aggregate: no results")
        ordered = sorted(results, key=lambda r: r.client_id)
        states, weights = [r.state for r in ordered], [r.num_examples for r in ordered]
        if self.aggregator == "median":
            return agg.coordinate_median(states)
        if self.aggregator == "trimmed-mean":
            return agg.trimmed_mean(states, self.arg)
        if self.aggregator == "krum":
            return agg.krum(states, int(self.arg))
        if self.aggregator == "norm-clip":
            return agg.norm_clip(current, states, weights, self.arg)
        return agg.fedavg(states, weights)


class StreamingAccumulator:
    """FedAvg folded in as replies arrive (see the module docstring)."""

    def __init__(self, reference: Mapping[str, Tensor]) -> None:
        self._sum = agg.StreamingFedAvg(reference)
        self._count = 0

    def add(self, result: FitResult) -> FitResult:
        self._sum.add(result.state, result.num_examples)
        self._count += 1
        return dataclasses.replace(result, state={})

    def result(self) -> Aggregate:
        if not self._count:
            return Aggregate(None, refused="no updates")
        return Aggregate(self._sum.result())


class BufferedAccumulator:
    """Keeps the attempt's updates for the screen and the robust aggregators; each update's distance
    to the reference (the screen's measure, and its finiteness) is taken on arrival."""

    def __init__(self, strategy: Strategy, reference: Mapping[str, Tensor]) -> None:
        self.strategy, self.reference = strategy, reference
        self.results: list[FitResult] = []

    def add(self, result: FitResult) -> FitResult:
        norm = agg.delta_norms(self.reference, [result.state])[0]
        self.results.append(dataclasses.replace(result, delta_norm=norm))
        return dataclasses.replace(result, state={}, delta_norm=norm)

    def result(self) -> Aggregate:
        if not self.results:
            return Aggregate(None, refused="no updates")
        kept, screened = self.strategy.screen(self.reference, self.results)
        self.results = []
        if not kept:
            return Aggregate(None, tuple(screened), refused="all updates screened")
        try:
            return Aggregate(self.strategy.aggregate(self.reference, kept), tuple(screened))
        except ValueError as exc:  # e.g. krum:F with fewer than 2F + 3 updates this round
            return Aggregate(None, tuple(screened), refused=f"{self.strategy.aggregator} cannot aggregate: {exc}")


class PrivateAccumulator:
    """DP-FedAvg over the attempt's clipped deltas (coordinator/privacy.py); every attempt that
    reaches :meth:`result` releases its noise step and spends its budget, even with no reply."""

    def __init__(self, ledger: PrivacyLedger, reference: Mapping[str, Tensor],
                 plan: tuple[RoundEvent, float]) -> None:
        self.ledger, self.plan = ledger, plan
        self._acc = ledger.accumulator(reference)

    def add(self, result: FitResult) -> FitResult:
        norm = self._acc.add(result.state, result.num_examples)
        return dataclasses.replace(result, state={}, delta_norm=norm)

    def result(self) -> Aggregate:
        state, privacy = self.ledger.release(self._acc, *self.plan)
        return Aggregate(state, privacy=privacy)
