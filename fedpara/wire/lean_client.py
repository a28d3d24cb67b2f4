"""The edge client's side of delta coding (:mod:`fedpara.wire.lean`; docs/compression.md).

``edge_client.client`` calls four hooks: :meth:`LeanClient.status_meta` (what its status
announces), :meth:`LeanClient.receive` (a task's tensors -> the full state to train from, or None:
re-announce and wait for the full state), :meth:`LeanClient.outgoing` (the trained state -> what
to send) and :meth:`LeanClient.sent` (the encoded update -> the new residual).

State kept in the client's state directory, both refused on load for another run or model:
``lean_held.safetensors`` (the state last received, with its digest: a restarted client still
takes deltas) and ``lean_residual.safetensors`` (the uplink's error feedback). A client that
misses rounds keeps its residual and sends it with its next update (late, not lost); a client that
holds an older state than a task's base gets the full state instead of the delta.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import Mapping

from torch import Tensor

from .envelope import Encoded, Message, decode
from .feedback import ErrorFeedback
from .lean import CODECS, apply, state_digest, subtract, task_lean
from .limits import Limits, WireError, envelope_length

log = logging.getLogger(__name__)

HELD_FILE = "lean_held.safetensors"
RESIDUAL_FILE = "lean_residual.safetensors"


_INIT: dict[tuple[str, int], tuple[dict, str]] = {}  # (spec, seed) -> (initial state, digest)
_INIT_LOCK = threading.Lock()


def _initial_state(model_spec, seed: int, spec: str, rng_lock) -> tuple[dict, str]:
    """The initial model's state and digest, built once per process (a pool's clients share it)."""
    with _INIT_LOCK:
        got = _INIT.get((spec, seed))
        if got is None:
            from fedpara import global_state  # every client builds it from the task's spec and seed
            with rng_lock if rng_lock is not None else contextlib.nullcontext():
                model = model_spec.build(seed)
            init = {k: v.detach().float() if v.is_floating_point() else v.detach()
                    for k, v in global_state(model).items()}
            _INIT.clear()  # one run's model at a time
            got = _INIT[(spec, seed)] = (init, state_digest(init))
        return got


class LeanClient:
    def __init__(self, state_root: str | os.PathLike, run_id: str, client_id: str = "", *,
                 rng_lock: threading.Lock | None = None) -> None:
        self.root, self.run_id, self.who = Path(state_root), run_id, client_id or "client"
        # held while building the initial model: training on another thread of this process draws
        # from torch's global RNG too, and a draw in the middle of the build changes the weights
        # (the digest catches it: the full state is sent instead). A pool's shared training lock.
        self.rng_lock = rng_lock
        self.held: dict[str, Tensor] | None = None
        self.held_digest: str | None = None
        self.held_spec: str | None = None
        self.feedback = ErrorFeedback()
        self._residual_loaded_for: str | None = None
        self._pending: tuple[dict, str, str] | None = None  # (what should be sent, base digest, spec)
        self.refused: str | None = None  # the last task refused for want of its base (in our status)
        self._lock = threading.Lock()  # receive (dispatch thread) vs outgoing/sent (training thread)
        self._load_held()

    # --- presence -------------------------------------------------------------------------------
    def status_meta(self) -> dict:
        lean = {"holds": self.held_digest}
        if self.refused is not None:  # the task whose delta we could not apply: send the full state
            lean["refused"] = self.refused
        return {"codecs": list(CODECS), "lean": lean}

    # --- downlink -------------------------------------------------------------------------------
    def receive(self, msg: Message, task) -> Message | None:
        """The task with its full state: a plain task as it is, a lean full state checked against
        its digest, a delta applied to the state it names. None when this client does not hold
        that base (or the result is not the target): the caller re-announces and waits for the
        full state. WireError for a full state that does not match its own digest."""
        lean = task_lean(msg.meta)
        if lean is None:
            return msg
        spec = json.dumps(task.spec.to_dict(), sort_keys=True)
        with self._lock:
            if lean["mode"] == "full":
                state = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in msg.tensors.items()}
                if state_digest(state) != lean["target"]:
                    raise WireError("task.lean: the full state does not match its digest")
            else:
                base = self._base(lean["base"], task, spec)
                if base is None:
                    log.info("%s: task %s is a delta from %s..., this client holds %s: asking for the full "
                             "state", self.who, task.task_id, lean["base"][:12],
                             (self.held_digest or "nothing")[:12])
                    self.refused = task.task_id
                    return None
                state = apply(base, msg.tensors)
                if state_digest(state) != lean["target"]:
                    log.warning("%s: task %s: the delta applied to its base is not the coordinator's state; "
                                "asking for the full state", self.who, task.task_id)
                    self.refused = task.task_id
                    return None
            self.held, self.held_digest, self.held_spec = state, lean["target"], spec
            self.refused = None
            self._save_held()
        return dataclasses.replace(msg, tensors=dict(state))

    def _base(self, digest: str, task, spec: str) -> dict | None:
        if self.held is not None and self.held_digest == digest and self.held_spec == spec:
            return self.held
        init, init_digest = _initial_state(task.spec, task.init_seed, spec, self.rng_lock)
        if init_digest != digest:
            with _INIT_LOCK:  # perhaps built while something else drew random numbers: not kept
                _INIT.pop((spec, task.init_seed), None)
            return None
        return init

    # --- uplink ---------------------------------------------------------------------------------
    def outgoing(self, trained: Mapping[str, Tensor], msg: Message, task) -> tuple[dict, dict]:
        """(tensors, meta to add) of the update: for a lean task the delta to the state trained
        from, plus the residual owed; for a plain task the trained state as before."""
        lean = task_lean(msg.meta)
        if lean is None:
            self._pending = None
            return dict(trained), {}
        spec = json.dumps(task.spec.to_dict(), sort_keys=True)
        owner = {"run_id": self.run_id, "spec": spec}
        if self._residual_loaded_for != spec:
            self.feedback.clear()
            self.feedback.load(self.root / RESIDUAL_FILE, owner)
            self._residual_loaded_for = spec
        delta = subtract(trained, msg.tensors)
        intended = self.feedback.add(delta) if lean["ef"] else delta
        self._pending = (intended, lean["target"], spec) if lean["ef"] else None
        if not lean["ef"]:
            self.feedback.clear()
        return intended, {"lean": {"base": lean["target"]}}

    def sent(self, enc: Encoded) -> None:
        """After sealing the update: the residual = what should have been sent - what the
        coordinator will decode (this very envelope, decoded here), saved with the state."""
        if self._pending is None:
            return
        intended, _, spec = self._pending
        self._pending = None
        data = memoryview(enc.data)[:envelope_length(enc.data)]
        got = decode(data, Limits(max_message_bytes=max(len(data), Limits().max_message_bytes)),
                     digest_checked=True).tensors
        self.feedback.settle(intended, got)
        try:
            self.feedback.save(self.root / RESIDUAL_FILE, {"run_id": self.run_id, "spec": spec})
        except OSError as exc:  # a full disk loses the residual on restart, not the round
            log.warning("%s: could not save the error-feedback residual: %s", self.who, exc)

    # --- persistence ----------------------------------------------------------------------------
    def _save_held(self) -> None:
        from safetensors.torch import save_file

        path = self.root / HELD_FILE
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in self.held.items()}, str(tmp),
                      metadata={"run_id": self.run_id, "digest": self.held_digest, "spec": self.held_spec})
            os.replace(tmp, path)
        except OSError as exc:  # only costs a full state after a restart
            log.warning("%s: could not save the state held for delta coding: %s", self.who, exc)

    def _load_held(self) -> None:
        from safetensors import SafetensorError, safe_open

        path = self.root / HELD_FILE
        if not path.exists():
            return
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("run_id") != self.run_id:
                    return
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("%s: ignoring %s: %s", self.who, path, exc)
            return
        if state_digest(state) == meta.get("digest"):
            self.held, self.held_digest, self.held_spec = state, meta["digest"], meta.get("spec")
