"""Running one task on the device: train, privatise, seal, upload, report (docs/protocol.md).

The :class:`TaskRunner` is the client's training-thread half: it takes a decoded task from the
session side (:mod:`edge_client.client`), has the :class:`~edge_client.trainer.Trainer` load and
fit it, sends back the global factors only, with the example count and metrics, and keeps what a
round learns only after its update has gone (upload bytes, time, energy, socket counts) for the
next update. A task that cannot run here is answered at once with a failure reply.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

from fedpara.dp import privatize
from fedpara.runtime.messages import Failure, Report, Task, Update
from fedpara.runtime.topics import Topics
from fedpara.wire import CodecPolicy, Message, MessageKind

from .config import ClientConfig
from .trainer import Trainer

log = logging.getLogger("edge_client.client")


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """A decoded task for the training thread, with its download's accounting."""

    round: int
    task: Task
    msg: Message
    transfer: dict


class TaskRunner:
    def __init__(self, cfg: ClientConfig, trainer: Trainer, seal, topics: Topics, digests: tuple[str, ...],
                 session: Callable[[], object], energy=None, lean=None) -> None:
        self.cfg, self.trainer, self.seal, self.topics, self.digests = cfg, trainer, seal, topics, digests
        self.lean = lean  # delta coding with error feedback (fedpara/wire/lean_client.py), when a task asks
        self._session, self.energy = session, energy
        # global factors written every `save_every` rounds (-1: every round, as for one device)
        self.save_every = 1 if cfg.save_every < 0 else cfg.save_every
        self._since_save = 0
        self.rounds_done: list[int] = []
        self._socket_prev: tuple[int, int] | None = None
        # what a round learns only after its update has gone (its upload's bytes, time, energy,
        # socket counts) travels with the next update
        self._carry: dict[str, dict] = {}
        self.last_update: tuple[str, str, list[bytes]] | None = None  # (task id, topic, frames)

    @property
    def session(self):
        return self._session()

    def send_failure(self, item: TaskItem, exc: BaseException) -> None:
        """Tell the coordinator at once that this task cannot run here, and why."""
        meta = Failure(item.task.task_id, str(exc) or type(exc).__name__, type(exc).__name__).to_meta()
        msg = self.seal.seal(Message(MessageKind.UPDATE, self.cfg.run_id, item.round, self.cfg.client_id, meta=meta))
        topic = self.topics.update(self.cfg.client_id)
        frames, _ = msg.split(item.task.max_packet, topic)
        try:
            self.session.publish_until_acked(topic, frames, timeout=30)
        except (RuntimeError, ValueError) as pub_exc:
            log.warning("%s: could not report the failure: %s", self.cfg.client_id, pub_exc)

    def _phase(self, name: str, **kw):
        if self.energy is None:
            return contextlib.nullcontext()
        return self.energy.phase(name, **kw)

    def run(self, item: TaskItem) -> None:
        me, task, rnd, transfer = self.cfg.client_id, item.task, item.round, item.transfer

        def phase(name: str):
            return self._phase(name, bytes_received=transfer["task_mqtt_bytes"]) if name == "download" \
                else self._phase(name)

        self.trainer.load(task, item.msg.tensors, phase)  # our own model: done while another client trains
        out = self.trainer.fit(task, rnd, None, phase)  # holds a pool's shared CPU lock while it trains
        tensors = out.tensors
        if task.dp is not None:  # a DP run: only the clipped (local mode: and noised) delta leaves the device
            tensors = privatize(out.tensors, {k: v.float() for k, v in item.msg.tensors.items()}, task.dp.clip,
                                task.dp.noise if task.dp.mode == "local" else 0.0)
        metrics = {**out.metrics, **transfer}
        for key in ("prev_upload", "prev_socket_bytes"):
            if key in self._carry:
                metrics[key] = self._carry[key]
        if self.energy is not None:
            metrics["energy"] = self.energy.pop_report()
            if "prev_upload_energy" in self._carry:
                metrics["energy"]["prev_upload"] = self._carry["prev_upload_energy"]
        update = Update(task.task_id, out.num_examples, metrics)
        # the digest the task asks for (BLAKE3 where both ends have it), else SHA-256
        digest = task.digest if task.digest in self.digests else "sha256"
        lean_meta: dict = {}
        if self.lean is not None:  # a lean task: the delta + residual
            tensors, lean_meta = self.lean.outgoing(tensors, item.msg, task)
        enc = self.seal.seal(Message(MessageKind.UPDATE, self.cfg.run_id, rnd, me, tensors,
                                     {**update.to_meta(), **lean_meta}),
                             CodecPolicy.parse(task.uplink), digest=digest)
        if self.lean is not None:
            self.lean.sent(enc)  # error feedback: what this envelope does not carry is owed
        topic = self.topics.update(me)
        frames, stats = enc.split(task.max_packet, topic)
        t_up = time.monotonic()
        with self._phase("upload", bytes_sent=stats.framed_bytes):
            ok = self.session.publish_until_acked(topic, frames, timeout=task.deadline_s)
        self.last_update = (task.task_id, topic, frames)  # sent again if the coordinator asks again
        self._carry["prev_upload"] = {"round": rnd, "payload_bytes": stats.payload_bytes,
                                      "mqtt_bytes": stats.framed_bytes, "upload_s": time.monotonic() - t_up,
                                      "acked": ok}
        if self.energy is not None:
            self._carry["prev_upload_energy"] = {"round": rnd, **self.energy.pop_report().get("upload", {})}
        self._socket_report(rnd)
        if ok:
            self.rounds_done.append(rnd)
        log.info("%s: round %d done (loss %.4f, %d bytes up%s)", me, rnd, out.metrics["loss"],
                 stats.framed_bytes, "" if ok else ", publish incomplete")
        self._since_save += 1
        every = self.save_every
        self.trainer.save_state(include_global=every > 0 and self._since_save >= every)
        if not self.trainer.global_pending:
            self._since_save = 0
        if out.metrics.get("report_follows"):  # evaluated after the update went: it did not wait for this
            with self.trainer.lock:
                ev = self.trainer.evaluate_local()
            report = Report(task.task_id, {"local_accuracy": ev["accuracy"], "local_loss": ev["loss"]})
            msg = self.seal.seal(Message(MessageKind.UPDATE, self.cfg.run_id, rnd, me, meta=report.to_meta()))
            frames, _ = msg.split(task.max_packet, topic)
            if not self.session.publish_until_acked(topic, frames, timeout=30):
                log.warning("%s: round %d local evaluation not reported", me, rnd)

    def _socket_report(self, rnd: int) -> None:
        """Kernel-counted bytes of our MQTT connection since the previous round (both directions,
        every MQTT packet), logged and sent with the next update: an update can't count itself."""
        now = self.session.socket_bytes()
        if now is None:
            return
        prev = self._socket_prev or (0, 0)
        self._socket_prev = now
        delta = {"round": rnd, "sent": now[0] - prev[0], "received": now[1] - prev[1]}
        self._carry["prev_socket_bytes"] = delta
        log.info("%s: round %d socket bytes sent %d received %d", self.cfg.client_id, rnd,
                 delta["sent"], delta["received"])
