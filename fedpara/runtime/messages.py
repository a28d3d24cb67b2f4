"""The application protocol: one typed dataclass per message kind (docs/protocol.md).

A wire :class:`~fedpara.wire.Message` carries tensors and a JSON ``meta`` dict; these classes are
what that dict means. Each has ``to_meta()`` (sender) and ``from_meta()`` (receiver), which
validates every field once and raises :class:`ProtocolError` naming the field, so that nothing
downstream (training, aggregation) ever sees a raw dict. Defaults live here, once, for both ends.

    task      coordinator -> sampled clients: who is selected, the model spec, training parameters
    update    client -> coordinator: example count and metrics (the factors are the tensors)
    status    client or coordinator presence (retained; the last will says offline)
    control   coordinator -> everyone: the run is over
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedpara.models import ModelSpec
from fedpara.validate import check_choice, check_int, check_number, check_str
from fedpara.wire.digest import DIGESTS


class ProtocolError(ValueError):
    """A message whose meta does not follow the protocol; the text names the field."""


def _field(kind: str, meta: Mapping, name: str, check, *args, default=dataclasses.MISSING, **kw):
    """``check(f"{kind}.{name}", meta[name], ...)``, turning every failure into ProtocolError."""
    if name not in meta:
        if default is dataclasses.MISSING:
            raise ProtocolError(f"{kind}.{name}: missing")
        return default
    try:
        return check(f"{kind}.{name}", meta[name], *args, **kw)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def _meta(kind: str, meta: Any) -> Mapping:
    if not isinstance(meta, Mapping):
        raise ProtocolError(f"{kind}: meta must be a JSON object, got {type(meta).__name__}")
    return meta


# --- task -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Local training settings the coordinator sends with every task (paper Table 6: plain SGD)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    prox_mu: float = 0.0  # FedProx: (prox_mu / 2) ||w - w_global||^2 over the global factors (0: off)

    @classmethod
    def from_meta(cls, meta: Any) -> TrainParams:
        m = _meta("task.train", meta)
        k = "task.train"
        return cls(epochs=_field(k, m, "epochs", check_int, min=1, max=10_000),
                   batch_size=_field(k, m, "batch_size", check_int, min=1, max=1 << 20),
                   lr=_field(k, m, "lr", check_number, min=0.0, max=1e3, min_open=True),
                   momentum=_field(k, m, "momentum", check_number, min=0.0, max=1.0, max_open=True, default=0.0),
                   weight_decay=_field(k, m, "weight_decay", check_number, min=0.0, max=1.0, default=0.0),
                   seed=_field(k, m, "seed", check_int, min=0, max=(1 << 63) - 1, default=0),
                   prox_mu=_field(k, m, "prox_mu", check_number, min=0.0, max=1e3, default=0.0))

    def to_meta(self) -> dict:
        meta = dataclasses.asdict(self)
        if not self.prox_mu:  # off: the task reads as it did before FedProx (older clients take it as is)
            del meta["prox_mu"]
        return meta


@dataclasses.dataclass(frozen=True)
class DPParams:
    """What a client does for differential privacy (docs/privacy.md): clip its update's delta to
    ``clip`` (L2, over every tensor it sends); in local mode also add N(0, (noise x clip)^2) to it
    before it leaves the device."""

    clip: float
    noise: float = 0.0   # local mode's noise multiplier; 0 in central mode (the coordinator adds it)
    mode: str = "central"

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: Any) -> DPParams:
        m, k = _meta("task.dp", meta), "task.dp"
        return cls(clip=_field(k, m, "clip", check_number, min=0.0, max=1e9, min_open=True),
                   noise=_field(k, m, "noise", check_number, min=0.0, max=1e6, default=0.0),
                   mode=_field(k, m, "mode", check_choice, ("central", "local"), default="central"))


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str
    selected: tuple[str, ...]
    spec: ModelSpec
    train: TrainParams
    attempt: int = 1
    init_seed: int = 0
    deadline_s: float = 120.0
    uplink: str = "fp32"
    max_packet: int = 1_000_000
    digest: str = "sha256"  # the envelope digest the coordinator asks updates to use, if the client can
    dp: DPParams | None = None  # differentially private runs: clip (and, local mode, noise) the update

    def to_meta(self) -> dict:
        meta = {"selected": list(self.selected), "attempt": self.attempt, "task_id": self.task_id,
                "spec": self.spec.to_dict(), "init_seed": self.init_seed, "deadline_s": self.deadline_s,
                "uplink": self.uplink, "max_packet": self.max_packet, "train": self.train.to_meta(),
                "digest": self.digest}
        if self.dp is not None:
            meta["dp"] = self.dp.to_meta()
        return meta

    @classmethod
    def from_meta(cls, meta: Any) -> Task:
        m = _meta("task", meta)
        selected = m.get("selected")
        if not isinstance(selected, list) or len(selected) > 100_000:
            raise ProtocolError("task.selected: must be a list of client ids")
        try:
            spec = ModelSpec.from_dict(m["spec"]) if isinstance(m.get("spec"), Mapping) else None
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"task.spec: {exc}") from None
        if spec is None:
            raise ProtocolError("task.spec: missing or not an object")
        return cls(task_id=_field("task", m, "task_id", _check_task_id),
                   selected=tuple(c for c in selected if isinstance(c, str)),
                   spec=spec, train=TrainParams.from_meta(m.get("train")),
                   attempt=_field("task", m, "attempt", check_int, min=1, max=1_000_000, default=1),
                   init_seed=_field("task", m, "init_seed", check_int, min=0, max=(1 << 63) - 1, default=0),
                   deadline_s=_field("task", m, "deadline_s", check_number, min=0.0, max=7 * 86400.0,
                                     min_open=True, default=120.0),
                   uplink=_field("task", m, "uplink", check_str, max_len=256, default="fp32"),
                   max_packet=_field("task", m, "max_packet", check_int, min=1024, max=1 << 28,
                                     default=1_000_000),
                   # a digest this version does not know (a newer coordinator's): SHA-256, which every peer checks
                   digest=m["digest"] if m.get("digest") in DIGESTS else "sha256",
                   dp=DPParams.from_meta(m["dp"]) if m.get("dp") is not None else None)


def _check_task_id(name: str, value: Any) -> str:
    if not check_str(name, value, max_len=128):
        raise ValueError(f"{name}: must not be empty")
    return value


# --- update ---------------------------------------------------------------------------------
#: The metrics an update may carry (anything else is dropped): the client's training and local
#: evaluation, the task's transfer, what its previous upload cost, and its energy report.
METRIC_KEYS = frozenset({"loss", "train_s", "steps", "local_accuracy", "local_loss", "task_payload_bytes",
                         "task_mqtt_bytes", "download_s", "decode_s", "prev_upload", "prev_socket_bytes",
                         "energy", "report_follows"})
MAX_METRIC_NUMBER = 1e15   # larger values are dropped: no counter or joule figure gets near it
MAX_METRIC_STRING = 128    # characters
MAX_METRIC_ITEMS = 64      # entries per nested object
MAX_METRIC_DEPTH = 3


def sanitize_metrics(value: Any, depth: int = 0) -> dict:
    """Only known top-level keys; nested objects of short string keys, bools, short strings and
    finite numbers within +-1e15; at most 64 entries and 3 levels. Everything else is dropped, so
    what reaches metrics.jsonl is bounded in size and is strict JSON."""
    if not isinstance(value, Mapping):
        return {}
    out: dict = {}
    for k, v in list(value.items())[:MAX_METRIC_ITEMS]:
        if not isinstance(k, str) or len(k) > 64 or (depth == 0 and k not in METRIC_KEYS):
            continue
        if isinstance(v, bool):
            out[k] = v
        elif isinstance(v, (int, float)):
            if abs(v) <= MAX_METRIC_NUMBER:  # also false for NaN; exact for huge ints (no overflow)
                out[k] = v
        elif isinstance(v, str):
            if len(v) <= MAX_METRIC_STRING:
                out[k] = v
        elif isinstance(v, Mapping) and depth + 1 < MAX_METRIC_DEPTH:
            out[k] = sanitize_metrics(v, depth + 1)
    return out


@dataclasses.dataclass(frozen=True)
class Update:
    task_id: str
    num_examples: int
    metrics: dict = dataclasses.field(default_factory=dict)

    def to_meta(self) -> dict:
        return {"num_examples": self.num_examples, "task_id": self.task_id, "metrics": self.metrics}

    @classmethod
    def from_meta(cls, meta: Any) -> Update:
        m = _meta("update", meta)
        return cls(task_id=_field("update", m, "task_id", _check_task_id),
                   num_examples=_field("update", m, "num_examples", check_int, min=1, max=1 << 53),
                   metrics=sanitize_metrics(m.get("metrics", {})))


@dataclasses.dataclass(frozen=True)
class Report:
    """What a client learns about a round after its update has gone: its local evaluation of the
    trained model, sent as a small follow-up (an UPDATE envelope without tensors, meta
    ``{task_id, report}``) so that evaluating does not delay the update (docs/protocol.md)."""

    task_id: str
    metrics: dict = dataclasses.field(default_factory=dict)

    def to_meta(self) -> dict:
        return {"task_id": self.task_id, "report": self.metrics}

    @classmethod
    def from_meta(cls, meta: Any) -> Report:
        m = _meta("report", meta)
        report = sanitize_metrics(m.get("report"))
        return cls(task_id=_field("report", m, "task_id", _check_task_id),
                   metrics={k: report[k] for k in ("local_accuracy", "local_loss") if k in report})


@dataclasses.dataclass(frozen=True)
class Failure:
    """A client that cannot run a task says so at once (an update with no tensors)."""

    task_id: str
    reason: str
    error: str = ""   # the exception type

    def to_meta(self) -> dict:
        return {"task_id": self.task_id, "failure": {"reason": self.reason[:500], "error": self.error[:64]}}

    @classmethod
    def from_meta(cls, meta: Any) -> Failure:
        m = _meta("failure", meta)
        f = _meta("failure.failure", m.get("failure"))
        return cls(task_id=_field("failure", m, "task_id", _check_task_id),
                   reason=str(f.get("reason", ""))[:500], error=str(f.get("error", ""))[:64])


Reply = Update | Report | Failure


def parse_reply(meta: Any) -> Reply:
    """A client's reply on its update topic, typed: an :class:`Update` (tensors follow), a
    follow-up :class:`Report`, or a :class:`Failure`. The one place that tells them apart (by the
    ``report`` / ``failure`` key); raises :class:`ProtocolError` naming the field otherwise."""
    m = _meta("reply", meta)
    if "report" in m:
        return Report.from_meta(m)
    if "failure" in m:
        return Failure.from_meta(m)
    return Update.from_meta(m)


# --- status ---------------------------------------------------------------------------------
STATES = ("online", "offline")


@dataclasses.dataclass(frozen=True)
class Status:
    """Presence. A client repeats its online status every ``heartbeat_s`` seconds (0: it does
    not), so that a coordinator can tell a dead client from a quiet one when the last will is lost."""

    state: str
    num_examples: int = 0
    device: str = ""
    role: str = "client"
    heartbeat_s: float = 0.0
    session: int = 0  # signed runs: the seq of this connection's last will (see docs/security.md)
    coordinator_session: str = ""  # a coordinator's status: the session token its tasks and finish carry
    connection: int = 0  # counts the client's MQTT (re)connects: a rise means messages may have been lost
    digests: tuple[str, ...] = ("sha256",)  # envelope digests the client can check (docs/wire.md, Digests)

    @property
    def online(self) -> bool:
        return self.state == "online"

    def to_meta(self) -> dict:
        if self.role == "coordinator":
            return {"state": self.state, "role": "coordinator", "coordinator_session": self.coordinator_session}
        return {"state": self.state, "num_examples": self.num_examples, "device": self.device,
                "heartbeat_s": self.heartbeat_s, "session": self.session, "connection": self.connection,
                "digests": list(self.digests)}

    @classmethod
    def from_meta(cls, meta: Any) -> Status:
        m = _meta("status", meta)
        device = m.get("device", "")
        return cls(state=_field("status", m, "state", check_choice, STATES),
                   num_examples=_field("status", m, "num_examples", check_int, min=0, default=0),
                   device=str(device)[:64] if isinstance(device, str) else "",
                   role="coordinator" if m.get("role") == "coordinator" else "client",
                   heartbeat_s=_field("status", m, "heartbeat_s", check_number, min=0.0, max=86400.0, default=0.0),
                   session=_field("status", m, "session", check_int, min=0, max=(1 << 63) - 1, default=0),
                   connection=_field("status", m, "connection", check_int, min=0, max=(1 << 31) - 1, default=0),
                   digests=_digests(m.get("digests")),
                   coordinator_session=_session_token(m.get("coordinator_session")))


def _session_token(value: Any) -> str:
    """A coordinator session token: up to 32 hex digits, else "" (unknown)."""
    if isinstance(value, str) and 0 < len(value) <= 32 and all(c in "0123456789abcdef" for c in value):
        return value
    return ""


def _digests(value: Any) -> tuple[str, ...]:
    """The known digests a status lists (unknown or malformed entries dropped); SHA-256 always."""
    names = value[:8] if isinstance(value, list) else []
    return ("sha256",) + tuple(d for d in DIGESTS if d != "sha256" and d in names)


# --- control --------------------------------------------------------------------------------
ACTIONS = ("finish",)


@dataclasses.dataclass(frozen=True)
class Control:
    action: str
    status: str = ""
    round: int = 0
    session: str = ""  # the coordinator session that sends it: clients obey only their current one

    def to_meta(self) -> dict:
        return {"action": self.action, "status": self.status, "round": self.round, "session": self.session}

    @classmethod
    def from_meta(cls, meta: Any) -> Control:
        m = _meta("control", meta)
        return cls(action=_field("control", m, "action", check_choice, ACTIONS),
                   status=_field("control", m, "status", check_str, max_len=1024, default=""),
                   round=_field("control", m, "round", check_int, min=0, default=0),
                   session=_session_token(m.get("session")))
