"""One round attempt, and the tally of a round across its attempts (docs/architecture.md).

A round is tried up to ``max_attempts`` times: each :class:`RoundAttempt` samples clients, sends
one task and collects replies into its strategy's accumulator until every sampled client answered
or the deadline passed. What outlives an attempt (the bytes every attempt sent, every failure
reply, the round's timing) is the round's :class:`RoundTally`. Both are plain state: the round
loop (coordinator/server.py) drives them, the inbound side (coordinator/inbound.py) feeds them.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping

from torch import Tensor

from .acceptance import RoundState
from .strategy import Accumulator, FitResult


@dataclasses.dataclass
class RoundAttempt:
    """The state of one attempt: whom it asked, who answered how, and what it folded in."""

    rules: RoundState                 # what acceptance judges replies against (``replied`` kept current here)
    accumulator: Accumulator          # the strategy's: folds accepted updates in
    number: int = 1
    broadcast: bool = False           # the task went to every live client on the fan-out topic
    results: dict[str, FitResult] = dataclasses.field(default_factory=dict)  # accepted (tensors folded in)
    failures: dict[str, str] = dataclasses.field(default_factory=dict)       # client -> its failure reply
    resent: Counter = dataclasses.field(default_factory=Counter)             # bytes of tasks sent again

    @property
    def round(self) -> int:
        return self.rules.round

    @property
    def task_id(self) -> str:
        return self.rules.task_id

    @property
    def sampled(self) -> frozenset[str]:
        return self.rules.sampled

    @property
    def reference(self) -> Mapping[str, Tensor]:
        return self.rules.reference

    @property
    def replied(self) -> frozenset[str]:
        return frozenset(self.results) | frozenset(self.failures)

    def view(self) -> RoundState:
        """The acceptance rules with the replies so far (judge_update refuses duplicates by it)."""
        return dataclasses.replace(self.rules, replied=self.replied)

    def rules_for(self, client: str) -> RoundState:
        """What a reply from ``client`` is judged against: one task for every sampled client."""
        return self.view()

    def pending(self) -> list[str]:
        """Sampled clients that have not answered, sorted."""
        return sorted(c for c in self.sampled if c not in self.results and c not in self.failures)

    def done(self) -> bool:
        return not self.pending()

    def accept(self, result: FitResult) -> str | None:
        """Fold an accepted update in (tensors cast to the global state's dtypes first); returns
        None (a sync attempt takes every update acceptance let through)."""
        tensors = {k: v.to(self.reference[k].dtype) for k, v in result.state.items()}
        self.results[result.client_id] = self.accumulator.add(dataclasses.replace(result, state=tensors))
        return None

    def reask(self, outbound, clients: list[str], *, ours: bool = False) -> None:
        """A reconnect may have lost replies: send the task again (limited, see Outbound.resend)."""
        outbound.resend(self, clients, ours=ours)

    def fail(self, client: str, reason: str) -> None:
        """The client answered with a failure (or an update that cannot be used): not waited for."""
        self.failures[client] = reason[:300]


@dataclasses.dataclass
class RoundTally:
    """What a round accumulates over its attempts, for its metrics.jsonl line."""

    number: int
    started: float = dataclasses.field(default_factory=time.monotonic)
    sent: Counter = dataclasses.field(default_factory=Counter)   # every attempt's task bytes: they crossed the wire
    mqtt_bytes_up: int = 0                                        # framed bytes of every update frame received
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # every attempt's failure replies
    timing: dict = dataclasses.field(default_factory=lambda: {"send_s": 0.0})

    def close(self, attempt: RoundAttempt) -> None:
        """Take in what an attempt sent again and the failures it heard."""
        self.sent.update(attempt.resent)
        self.failures.update(attempt.failures)

    def failure_text(self) -> str:
        return "; " + "; ".join(f"{c}: {r}" for c, r in sorted(self.failures.items())) if self.failures else ""
