"""The coordinator's side of delta coding (``wire = "delta"`` or ``"lean"``; fedpara.wire.lean,
docs/compression.md). The round loop calls it through a few hooks: :func:`configure` (config
check), :meth:`LeanServer.send_task` (instead of encoding the global state for every receiver),
:meth:`LeanServer.resend_enc` (a re-sent task: the delta again, or the full state), :meth:`LeanServer.saw_status`
(a client that cannot apply its delta re-announces what it holds: send it the full state) and
:meth:`LeanServer.expand_update` (a client's delta + the global state = the state FedAvg folds in).

The downlink's error feedback is the mirror itself (one for the fan-out, not one per client):
each task sends G - M, so whatever earlier tasks' codecs dropped is sent again. The mirror is
saved in the run directory after every task, so a resumed coordinator goes on sending deltas to
clients that hold it; without that file the first task after a resume is a delta from the initial
model (every client can build it), which costs about as much as a full state.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from fedpara import global_state
from fedpara.wire import CodecPolicy, Message, MessageKind, WireError
from fedpara.wire.codecs import roundtrip
from fedpara.wire.lean import (
    FULL_POLICY,
    LEAN_DOWNLINK,
    LEAN_UPLINK,
    WIRE_MODES,
    apply,
    delta_policy,
    digest_field,
    policy_codecs,
    state_digest,
    status_holds,
    subtract,
)

from .errors import RunFailed

log = logging.getLogger("coordinator.server")
MIRROR_FILE = "lean_mirror.safetensors"


def configure(cfg) -> None:
    """Check ``wire`` / ``error_feedback`` and set the lean preset's policies (names the field)."""
    if cfg.wire not in WIRE_MODES:
        raise ValueError(f"wire: must be one of {', '.join(WIRE_MODES)}, got {cfg.wire!r}")
    if not isinstance(cfg.error_feedback, bool):
        raise ValueError(f"error_feedback: must be a bool, got {cfg.error_feedback!r}")
    if cfg.wire == "plain":
        return
    if cfg.wire == "lean":
        cfg.downlink, cfg.uplink = LEAN_DOWNLINK, LEAN_UPLINK
    for name in ("downlink", "uplink"):
        delta_policy(getattr(cfg, name), name)
    if getattr(cfg, "dp_noise_multiplier", 0) > 0:
        raise ValueError(f"wire: {cfg.wire!r} (delta coding with error feedback) cannot be combined with "
                         "differential privacy: the residual would carry unclipped updates; use wire = \"plain\"")


def _float_state(state) -> dict:
    return {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in state.items()}


class LeanServer:
    def __init__(self, cfg, spec, out_dir: str | Path, *, resume: bool = False) -> None:
        self.cfg, self.ef = cfg, cfg.error_feedback
        self.down = delta_policy(cfg.downlink, "downlink")
        #: what a client must announce to be sent deltas under these policies (else: full fp32)
        self.needs = policy_codecs(self.down, delta_policy(cfg.uplink, "uplink"))
        self.full = CodecPolicy.parse(FULL_POLICY)
        self.init = _float_state(global_state(spec.build(cfg.seed)))
        self.init_digest = state_digest(self.init)
        self.mirror, self.digest = self.init, self.init_digest
        self.last_global = self.init  # without error feedback, deltas are G_r - G_{r-1}
        self.path = Path(out_dir) / MIRROR_FILE
        if resume:
            self._load()
        self.capable: set[str] = set()
        self.holds: dict[str, str | None] = {}
        self.base = self.digest           # the current attempt's delta base and target
        self.sent_delta: set[str] = set()  # clients sent a delta in the current attempt
        self.receivers: set[str] = set()   # clients sent the current attempt's task
        self.task_id: str | None = None
        self._full_msg: Message | None = None
        self._delta_msg: Message | None = None
        self.counts = {"delta": 0, "full": 0}

    # --- downlink -------------------------------------------------------------------------------
    def _in_sync(self, client: str) -> bool:
        return client in self.capable and (self.holds.get(client) == self.digest or self.digest == self.init_digest)

    def send_task(self, out, rnd: int, task, state, live: list[str]) -> tuple[dict, bool]:
        """Encode and publish the round's task: one delta on the fan-out topic when every receiver
        holds the mirror, else per client a delta or (for the others) the full state."""
        cfg, G = out.cfg, state
        broadcast = set(task.selected) == set(live)
        receivers = list(live) if broadcast else list(task.selected)
        x = subtract(G, self.mirror if self.ef else self.last_global)
        decoded = {k: roundtrip(v, self.down.for_tensor(k)) for k, v in x.items()}
        new = apply(self.mirror, decoded)
        self.base, base, target = self.digest, self.digest, state_digest(new)
        in_sync = [c for c in receivers if self._in_sync(c)]
        meta = task.to_meta()
        out._task_msg = Message(MessageKind.TASK, cfg.run_id, rnd, "coordinator", G, meta)
        self._delta_msg = delta_msg = Message(MessageKind.TASK, cfg.run_id, rnd, "coordinator", x,
                            {**meta, "lean": {"mode": "delta", "base": base, "target": target, "ef": self.ef}})
        self._full_msg = Message(MessageKind.TASK, cfg.run_id, rnd, "coordinator", new,
                                 {**meta, "lean": {"mode": "full", "target": target, "ef": self.ef}})
        if broadcast and len(in_sync) == len(receivers):
            plan = [(delta_msg, self.down, [out.topics.task], receivers)]
        else:  # per client: the delta, the full state, or (a client that did not announce delta
            # coding: an older version) the full state with an uplink policy it can parse
            full = [c for c in receivers if c not in in_sync and c in self.capable]
            legacy = [c for c in receivers if c not in in_sync and c not in self.capable]
            legacy_msg = dataclasses.replace(self._full_msg, meta={**self._full_msg.meta, "uplink": "fp32"})
            plan = [(m, pol, [out.topics.task_for(c) for c in cs], cs)
                    for m, pol, cs in ((delta_msg, self.down, in_sync), (self._full_msg, self.full, full),
                                       (legacy_msg, self.full, legacy)) if cs]
        self.mirror, self.digest, self.last_global = new, target, _float_state(G)
        self.sent_delta, self.receivers, self.task_id = set(in_sync), set(receivers), task.task_id
        for c in receivers:
            self.holds[c] = target  # optimistic: a client that did not get it says so in its status
        self._save(cfg.run_id)
        if not out.session.connected.wait(cfg.wait_clients_s):  # never publish into a dead connection
            raise RunFailed(f"round {rnd}: no connection to the broker {out.broker} for {cfg.wait_clients_s:.0f} s")
        sent = {"bytes_down": 0, "mqtt_bytes_down": 0, "raw_bytes_down": 0, "receivers": len(receivers)}
        complete = True
        for msg, pol, topics, cs in plan:
            enc = out.seal.seal(msg, pol, digest=out.digest_for(cs))
            copies = len(cs) if len(topics) == 1 else 1  # the broker fans one topic out to every receiver
            for topic in topics:
                frames, stats = enc.split(cfg.max_packet, topic)
                if not out.session.publish_all(topic, frames, timeout=cfg.round_deadline_s):
                    log.warning("round %d: publishing the task on %s did not complete", rnd, topic)
                    complete = False
                sent["mqtt_bytes_down"] += stats.framed_bytes * copies
                sent["bytes_down"] += enc.stats.payload_bytes * copies
                sent["raw_bytes_down"] += enc.stats.raw_bytes * copies
        self.counts["delta"] += len(in_sync)
        self.counts["full"] += len(receivers) - len(in_sync)
        log.info("round %d: task as a delta to %d client(s), in full to %d (%d bytes down)", rnd, len(in_sync),
                 len(receivers) - len(in_sync), sent["mqtt_bytes_down"])
        return sent, complete

    def resend_enc(self, out, receivers):
        """The current task for clients asked again (a reconnect, or a client that could not apply
        its delta): the delta again when each of them was sent it and has not refused it (one that
        never got it still holds the base), else the full state (exact)."""
        if self._delta_msg is not None and all(c in self.sent_delta for c in receivers):
            self.counts["delta"] += len(receivers)
            return out.seal.seal(self._delta_msg, self.down, digest=out.digest_for(receivers))
        for c in receivers:
            self.holds[c] = self.digest
            self.sent_delta.discard(c)
        self.counts["full"] += len(receivers)
        msg = self._full_msg
        if any(c not in self.capable for c in receivers):  # an older client: an uplink policy it parses
            msg = dataclasses.replace(msg, meta={**msg.meta, "uplink": "fp32"})
        return out.seal.seal(msg, self.full, digest=out.digest_for(receivers))

    def saw_status(self, client: str, meta) -> bool:
        """Record what a client announces; True when it refused this attempt's delta (it names the
        task: a status older than the task cannot be taken for a refusal): send the full state."""
        capable, holds, refused = status_holds(meta, self.needs)
        (self.capable.add if capable else self.capable.discard)(client)
        if client in self.receivers:  # a status older than the task must not undo what it was sent
            if client in self.sent_delta and refused is not None and refused == self.task_id:
                self.holds[client] = holds
                self.sent_delta.discard(client)  # the re-send is the full state
                return self._full_msg is not None
            return False
        self.holds[client] = holds
        return False

    # --- uplink ---------------------------------------------------------------------------------
    def expand_update(self, client: str, msg: Message, attempt, state) -> Message:
        """A client's delta update as the full state G + delta (what the strategy folds in);
        a plain update, a report or an answer to another task unchanged (acceptance judges it)."""
        lean = msg.meta.get("lean")
        a = attempt
        if lean is None or not msg.tensors or a is None or msg.meta.get("task_id") != a.task_id:
            return msg
        if not isinstance(lean, dict):
            raise WireError(f"update from {client}: meta 'lean' must be an object")
        base = digest_field(lean.get("base"), "update.lean.base")
        if base != self.digest:
            raise WireError(f"update from {client} is a delta from {base[:12]}..., this round's state is "
                            f"{self.digest[:12]}...")
        self.holds[client] = base
        return dataclasses.replace(msg, tensors=apply(state, msg.tensors))

    # --- persistence ----------------------------------------------------------------------------
    def _save(self, run_id: str) -> None:
        from safetensors.torch import save_file

        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            save_file({k: v.contiguous() for k, v in self.mirror.items()}, str(tmp),
                      metadata={"run_id": run_id, "digest": self.digest})
            tmp.replace(self.path)
        except OSError as exc:  # costs one full-size task after a resume, nothing else
            log.warning("cannot save the delta-coding mirror %s: %s", self.path, exc)

    def _load(self) -> None:
        from safetensors import SafetensorError, safe_open

        if not self.path.exists():
            return
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return
        if meta.get("run_id") == self.cfg.run_id and set(state) == set(self.init) and state_digest(state) == meta.get("digest"):
            self.mirror, self.digest = state, meta["digest"]
            log.info("delta coding: resumed from the mirror %s...", self.digest[:12])
