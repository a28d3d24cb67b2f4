"""Strategy: which clients train each round and how their factors become the next global model.

Pure: no MQTT, no files, no clocks. The round loop asks ``sample`` for the clients of an attempt
and hands every accepted result to ``aggregate``; tests call both directly (Prepare/Execute/Assert,
as flower's ``server/strategy`` tests do). Aggregation is over the *factors* (paper Alg. 1), never
over composed weights.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence

from torch import Tensor

from . import aggregate as agg

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


class FedAvg:
    """Sample K of the live clients uniformly (seeded per round and attempt); combine the factors
    with the aggregator: FedAvg weighted by example counts (paper Alg. 1) by default, or a robust
    one (docs/security.md). Before that, the screen drops updates whose distance to the current
    model is more than ``screen_factor`` times the median distance (0 turns it off)."""

    def __init__(self, clients_per_round: int = 0, seed: int = 0, aggregator: str = "fedavg",
                 screen_factor: float = 10.0, *, sampling: str = "fixed", sample_rate: float = 0.1,
                 secret: bool = False) -> None:
        if clients_per_round < 0:
            raise ValueError(f"clients_per_round: must be >= 0, got {clients_per_round}")
        self.clients_per_round, self.seed = clients_per_round, seed
        # poisson: each live client independently with probability sample_rate. secret: drawn from
        # the OS, not the run's seed (a DP run's amplification by sampling needs a sample nobody
        # can predict: docs/privacy.md)
        self.sampling, self.sample_rate, self.secret = sampling, sample_rate, secret
        self.aggregator, self.arg = parse_aggregator(aggregator)
        self.screen_factor = screen_factor

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
