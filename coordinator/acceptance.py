"""Update acceptance: a pure function from a decoded update and the round's state to a verdict.

The round loop accepts an update only when :func:`judge_update` says so; every refusal has a
reason, which the loop counts under ``ignored`` in metrics.jsonl (docs/protocol.md, idempotency:
QoS 1 may deliver an update twice, a resumed coordinator may see last session's replies).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor

from fedpara.runtime.messages import ProtocolError, Update
from fedpara.wire import Message, MessageKind

from .aggregate import check_compatible


@dataclasses.dataclass(frozen=True)
class RoundState:
    """What acceptance needs to know about the current attempt."""

    run_id: str
    round: int
    task_id: str
    sampled: frozenset[str]
    replied: frozenset[str]
    reference: Mapping[str, Tensor]  # the global state: keys and shapes an update must match


@dataclasses.dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str                     # "ok" or the counter name of the refusal
    detail: str = ""
    update: Update | None = None    # the typed update, when accepted

    @classmethod
    def refuse(cls, reason: str, detail: str = "") -> Verdict:
        return cls(False, reason, detail)


def judge_update(msg: Message, topic_client: str, state: RoundState) -> Verdict:
    """Accept ``msg`` (received on ``update/<topic_client>``) for the current attempt, or say why not.

    Reasons: ``malformed`` (wrong kind or run, sender not the topic's client, bad meta, tensors
    that do not fit the model), ``stale`` / ``future`` (another round, or an earlier attempt or
    coordinator session), ``not_sampled``, ``duplicate``.
    """
    if msg.kind != MessageKind.UPDATE or msg.run_id != state.run_id:
        return Verdict.refuse("malformed", f"not an update for run {state.run_id}: {msg.kind} {msg.run_id!r}")
    if msg.sender != topic_client:
        return Verdict.refuse("malformed", f"sender {msg.sender!r} does not match topic client {topic_client!r}")
    if msg.round != state.round:
        return Verdict.refuse("stale" if msg.round < state.round else "future",
                              f"update from {topic_client} for round {msg.round} (now {state.round})")
    if topic_client not in state.sampled:
        return Verdict.refuse("not_sampled", f"{topic_client} was not sampled in round {state.round}")
    if topic_client in state.replied:
        return Verdict.refuse("duplicate", f"{topic_client} already replied")
    if msg.meta.get("task_id") != state.task_id:
        return Verdict.refuse("stale", f"{topic_client} answered task {msg.meta.get('task_id')!r:.40}")
    try:
        update = Update.from_meta(msg.meta)
        check_compatible(state.reference, msg.tensors)
    except (ProtocolError, ValueError) as exc:
        return Verdict.refuse("malformed", f"update from {topic_client}: {exc}")
    return Verdict(True, "ok", update=update)
