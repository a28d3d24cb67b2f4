"""Failing devices and re-sends: what one client may cost a round, bounded (docs/security.md).

Pure bookkeeping, no MQTT: the round loop asks :class:`FailureTracker` which live clients may be
sampled, and :class:`ResendLimiter` whether a client may be sent its task again.

- A failure reply counts against the client that sent it, never against the run: it is left out
  of the round's later attempts, and a client that fails rounds in a row is backed off for
  1, 2, 4, ... rounds (at most ``max_backoff``), reported in metrics.jsonl and summary.json.
  A client that replies with an update again is forgiven at once.
- A re-send of the current task to a client (after a reconnect it announced, or ours) happens at
  most ``max_per_task`` times per (client, task) and not more often than every ``min_interval_s``:
  a device that claims a reconnect in every status costs the coordinator O(1) tasks per round.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence


class FailureTracker:
    """Failure streaks per client, and the rounds a failing client sits out."""

    def __init__(self, max_backoff: int = 32) -> None:
        self.max_backoff = max_backoff
        self.streak: dict[str, int] = {}      # client -> rounds failed in a row
        self.until: dict[str, int] = {}       # client -> first round it may be sampled again
        self.total: dict[str, int] = {}       # client -> failure replies over the run
        self.last_reason: dict[str, str] = {}

    def failed(self, client: str, rnd: int, reason: str) -> int:
        """Record a failure reply in round ``rnd``; returns the rounds the client now sits out
        after this one (0: only the rest of this round)."""
        streak = self.streak[client] = self.streak.get(client, 0) + 1
        self.total[client] = self.total.get(client, 0) + 1
        self.last_reason[client] = reason
        rest = 0 if streak < 2 else min(self.max_backoff, 2 ** (streak - 2))
        self.until[client] = rnd + 1 + rest
        return rest

    def succeeded(self, client: str) -> None:
        self.streak.pop(client, None)
        self.until.pop(client, None)

    def backed_off(self, rnd: int) -> list[str]:
        """Clients that may not be sampled in round ``rnd`` (sorted)."""
        return sorted(c for c, r in self.until.items() if r > rnd)

    def eligible(self, live: Sequence[str], rnd: int, failed_now: Iterable[str]) -> list[str]:
        """The live clients an attempt of round ``rnd`` samples from: not failed in this round, not
        backed off; when that leaves nobody, the backed-off ones too (better than no round)."""
        failed_now = set(failed_now)
        fresh = [c for c in live if c not in failed_now]
        ok = [c for c in fresh if self.until.get(c, 0) <= rnd]
        return ok or fresh

    def report(self) -> dict[str, dict]:
        """{client: {"failures", "streak", "sits_out_until", "last_reason"}} for summary.json."""
        return {c: {"failures": n, "streak": self.streak.get(c, 0), "sits_out_until": self.until.get(c),
                    "last_reason": self.last_reason.get(c, "")} for c, n in sorted(self.total.items())}


class ResendLimiter:
    """At most ``max_per_task`` re-sends per (client, task), ``min_interval_s`` apart."""

    def __init__(self, max_per_task: int = 2, min_interval_s: float = 5.0, clock=time.monotonic) -> None:
        self.max_per_task, self.min_interval_s, self.clock = max_per_task, min_interval_s, clock
        self._sent: dict[tuple[str, str], tuple[int, float]] = {}
        self.refused = 0

    def allow(self, client: str, task_id: str) -> bool:
        key = (client, task_id)
        n, last = self._sent.get(key, (0, float("-inf")))
        now = self.clock()
        if n >= self.max_per_task or now - last < self.min_interval_s:
            self.refused += 1
            return False
        self._sent[key] = (n + 1, now)
        return True

    def forget(self, keep_task: str | None = None) -> None:
        """Drop the counts of every task but ``keep_task`` (called when an attempt starts)."""
        self._sent = {k: v for k, v in self._sent.items() if k[1] == keep_task}
