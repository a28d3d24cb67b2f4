"""Update acceptance: a pure function from a decoded update and the round's state to a verdict.

The round loop accepts an update only when :func:`judge_update` says so; every refusal has a
reason, which the loop counts under ``ignored`` in metrics.jsonl (docs/protocol.md, idempotency:
QoS 1 may deliver an update twice, a resumed coordinator may see last session's replies).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor

from fedpara.runtime.messages import Failure, ProtocolError, Reply, Update, parse_reply
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
    max_examples: int = 10_000_000   # config cap on one update's example count
    announced: Mapping[str, int] = dataclasses.field(default_factory=dict)  # counts from statuses
    max_weight_ratio: float = 0.0    # one update weighs at most this x the (lower) median announced count


def weight_cap(state: RoundState, client: str) -> int:
    """The most examples ``client``'s update may count for: the config cap, what it announced when
    it joined, and ``max_weight_ratio`` times the lower median of what the round's sampled clients
    announced (so that one device claiming 10 million examples cannot freeze FedAvg on an echo
    of the global model)."""
    cap = min(state.max_examples, state.announced.get(client) or state.max_examples)
    counts = sorted(n for n in state.announced.values() if n > 0)
    if state.max_weight_ratio > 0 and counts:
        cap = min(cap, max(1, int(state.max_weight_ratio * counts[(len(counts) - 1) // 2])))
    return cap


@dataclasses.dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str                     # "ok" or the counter name of the refusal
    detail: str = ""
    update: Update | None = None    # the typed update, when accepted
    failure: Failure | None = None  # the client's failure report (reason "failed")

    @classmethod
    def refuse(cls, reason: str, detail: str = "") -> Verdict:
        return cls(False, reason, detail)


def judge_update(msg: Message, topic_client: str, state: RoundState, reply: Reply | None = None) -> Verdict:
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
        if reply is None:  # the caller may have parsed it already (messages.parse_reply)
            reply = parse_reply(msg.meta)
        if isinstance(reply, Failure):
            return Verdict(False, "failed", failure=reply)
        if not isinstance(reply, Update):  # a follow-up report belongs to the ledger, never here
            raise ProtocolError("a report is not an update")
        check_compatible(state.reference, msg.tensors)
    except (ProtocolError, ValueError) as exc:
        return Verdict.refuse("malformed", f"reply from {topic_client}: {exc}")
    update = reply
    # an update weighs no more than the client announced when it joined, nor than the config cap
    cap = weight_cap(state, topic_client)
    if update.num_examples > cap:
        update = dataclasses.replace(update, num_examples=cap)
    return Verdict(True, "ok", update=update)
