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

from .aggregate import fedavg


@dataclasses.dataclass(frozen=True)
class FitResult:
    """One accepted client reply: its factors, how many examples it trained on, its metrics."""

    client_id: str
    state: Mapping[str, Tensor]
    num_examples: int
    metrics: Mapping = dataclasses.field(default_factory=dict)
    payload_bytes: int = 0


class FedAvg:
    """Sample K of the live clients uniformly (seeded per round and attempt); average the factors
    weighted by example counts (paper Alg. 1)."""

    name = "fedavg"

    def __init__(self, clients_per_round: int = 0, seed: int = 0) -> None:
        if clients_per_round < 0:
            raise ValueError(f"clients_per_round: must be >= 0, got {clients_per_round}")
        self.clients_per_round, self.seed = clients_per_round, seed

    def sample(self, live: Sequence[str], rnd: int, attempt: int) -> list[str]:
        """K clients (all when K is 0 or at least the number live), sorted; reproducible for a
        given (seed, round, attempt) and set of live clients."""
        k = len(live) if self.clients_per_round == 0 else min(self.clients_per_round, len(live))
        return sorted(random.Random(f"{self.seed}/{rnd}/{attempt}").sample(sorted(live), k))

    def aggregate(self, results: Sequence[FitResult]) -> dict[str, Tensor]:
        """The example-weighted average of the results' factors (client-id order: deterministic)."""
        if not results:
            raise ValueError("aggregate: no results")
        ordered = sorted(results, key=lambda r: r.client_id)
        return fedavg([r.state for r in ordered], [r.num_examples for r in ordered])
