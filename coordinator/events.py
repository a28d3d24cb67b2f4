"""Typed events the round loop reports while it runs (progress bars, dashboards, tests).

The coordinator calls ``on_event(event)`` with one of these; a listener matches on the type.
Listeners run on the coordinator's thread: they must be quick and must not raise (an exception
is logged and the run goes on).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ClientStatusChanged:
    client_id: str
    online: bool


@dataclasses.dataclass(frozen=True)
class TaskSent:
    round: int
    attempt: int
    sampled: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ReplyAccepted:
    round: int
    client_id: str
    replies: int       # accepted so far in this attempt
    expected: int      # clients sampled in this attempt


@dataclasses.dataclass(frozen=True)
class RoundCompleted:
    round: int
    row: dict          # the metrics.jsonl line of the round


Event = ClientStatusChanged | TaskSent | ReplyAccepted | RoundCompleted
