"""The edge client: MQTT session, task handling, local training off the network thread.

Flow per round (docs/protocol.md): receive the task chunks (fan-out topic or our own), reassemble
and decode them, load the global factors, train E local epochs, send back the global factors only
(pFedPara's local half stays in ``state_dir`` across rounds and restarts), with example count and
metrics. Handlers are idempotent on (round, attempt) because QoS 1 may deliver twice; any bad
message is logged and counted, never fatal.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from fedpara import global_state, load_state, local_state
from fedpara.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from fedpara.data import load_client_data, load_client_test, parse_data_spec
from fedpara.topics import Topics
from fedpara.training import evaluate, resolve_device, train_epochs
from fedpara.transport import BrokerURL, MqttSession
from fedpara.wire import (CodecPolicy, Limits, Message, MessageKind, Reassembler, WireError, decode,
                          encode, framed_bytes, parse_chunk)

from .config import ClientConfig

log = logging.getLogger(__name__)


class EdgeClient:
    def __init__(self, cfg: ClientConfig, broker: BrokerURL, *, train_lock: threading.Lock | None = None) -> None:
        self.cfg, self.broker = cfg, broker
        self.topics = Topics(cfg.run_id)
        self.device = resolve_device(cfg.device)
        self.data_spec = parse_data_spec(cfg.data)
        self.train_data, self.data_info = load_client_data(self.data_spec)
        self._test_data = None
        self.state_dir = Path(cfg.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.limits = Limits()
        self.reassembler = Reassembler(timeout_s=300.0)
        self.counters: Counter = Counter()
        self.train_lock = train_lock or threading.Lock()
        self.model = None
        self.model_spec: ModelSpec | None = None
        self.rounds_done: list[int] = []
        self.finished = threading.Event()
        self.finish_meta: dict = {}
        self._seen: set[str] = set()
        self._tasks: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.energy = None
        self._last_accuracy: float | None = None
        self._socket_prev: tuple[int, int] | None = None
        # what a round learns only after its update has gone (its upload's bytes, time, energy,
        # socket counts) travels with the next update
        self._carry: dict[str, dict] = {}
        self._incoming: dict[bytes, tuple[float, int]] = {}
        if cfg.energy != "off":
            from .energy import EnergyConfig, phase_meter
            self.energy = phase_meter(EnergyConfig.from_dict({**cfg.energy_options, "meter": cfg.energy,
                                                              "device": self.device.type}))
            log.info("%s: energy meter: %s", cfg.client_id, self.energy.reason)
        self.session: MqttSession | None = None

    # --- presence --------------------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        meta = {"state": state, "num_examples": len(self.train_data), "device": str(self.device)}
        return encode(Message(MessageKind.STATUS, self.cfg.run_id, 0, self.cfg.client_id, meta=meta)).data

    def _announce(self, session: MqttSession) -> None:  # on every (re)connect
        session.publish(self.topics.status(self.cfg.client_id), self._status("online"), retain=True)

    def start(self) -> None:
        me = self.cfg.client_id
        self.session = MqttSession(
            self.broker, f"fp-{self.cfg.run_id}-{me}",
            [(self.topics.task, 1), (self.topics.task_for(me), 1), (self.topics.control, 1)],
            will=(self.topics.status(me), self._status("offline"), 1, True), on_connect=self._announce)
        self.session.start()
        for target, name in ((self._dispatch, "dispatch"), (self._work, "train")):
            t = threading.Thread(target=target, name=f"{me}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def stop(self) -> None:
        self.finished.set()
        if self.session is not None:
            try:
                info = self.session.publish(self.topics.status(self.cfg.client_id), self._status("offline"), retain=True)
                info.wait_for_publish(5)
            except (RuntimeError, ValueError):
                pass
            self.session.stop()
        self._tasks.put(None)
        if self.energy is not None:
            self.energy.close()

    # --- inbound ---------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while not self.finished.is_set():
            try:
                topic, payload = self.session.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._handle(topic, payload)
            except (WireError, ValueError) as exc:
                self.counters["malformed"] += 1
                log.warning("%s: ignored message on %s: %s", self.cfg.client_id, topic, exc)
            except Exception:
                self.counters["error"] += 1
                log.exception("%s: error handling a message on %s", self.cfg.client_id, topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.control:
            msg = decode(payload, self.limits)
            if msg.kind == MessageKind.CONTROL and msg.run_id == self.cfg.run_id and msg.meta.get("action") == "finish":
                self.finish_meta = dict(msg.meta)
                log.info("%s: run finished (%s)", self.cfg.client_id, msg.meta.get("status"))
                self._tasks.put("finish")
            return
        if topic not in (self.topics.task, self.topics.task_for(self.cfg.client_id)):
            self.counters["unexpected_topic"] += 1  # e.g. a broker replaying retained messages
            return
        # transfer accounting per message: first chunk seen -> complete, MQTT bytes of every chunk
        mid = parse_chunk(payload).message_id
        first, framed = self._incoming.pop(mid, (time.monotonic(), 0))
        self._incoming[mid] = (first, framed + framed_bytes([len(payload)], topic))
        while len(self._incoming) > 64:  # partial or bogus message ids do not pile up
            del self._incoming[next(iter(self._incoming))]
        data = self.reassembler.add(payload)
        if data is None:
            return
        first, framed = self._incoming.pop(mid, (first, framed))
        transfer = {"task_payload_bytes": len(data), "task_mqtt_bytes": framed,
                    "download_s": time.monotonic() - first}
        t0 = time.perf_counter()
        msg = decode(data, self.limits)
        if msg.kind != MessageKind.TASK or msg.run_id != self.cfg.run_id:
            raise ValueError(f"expected a task for run {self.cfg.run_id}, got {msg.kind} for {msg.run_id!r}")
        selected = msg.meta.get("selected")
        if not isinstance(selected, list) or self.cfg.client_id not in selected:
            self.counters["not_selected"] += 1
            return
        task_id = msg.meta.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("task without a task_id")
        if task_id in self._seen:  # QoS 1 redelivery
            self.counters["duplicate"] += 1
            return
        self._seen.add(task_id)
        transfer["decode_s"] = time.perf_counter() - t0
        self._tasks.put((msg, transfer))

    # --- training ----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._tasks.get()
            # a newer task supersedes any older one still queued
            while item not in (None, "finish"):
                try:
                    nxt = self._tasks.get_nowait()
                except queue.Empty:
                    break
                if nxt in (None, "finish"):
                    self._tasks.put(nxt)
                    break
                self.counters["superseded"] += 1
                item = nxt
            if item is None:
                return
            if item == "finish":
                self._on_finish()
                return
            try:
                with self.train_lock:
                    self._train_round(*item)
            except (ValueError, KeyError, TypeError, WireError) as exc:
                self.counters["bad_task"] += 1
                log.warning("%s: could not run round %s: %s", self.cfg.client_id, item[0].round, exc)
            except Exception:
                self.counters["error"] += 1
                log.exception("%s: training failed in round %s", self.cfg.client_id, item[0].round)

    @property
    def test_data(self):
        if self._test_data is None:
            self._test_data = load_client_test(self.data_spec)
        return self._test_data

    def _ensure_model(self, spec: ModelSpec, seed: int) -> None:
        if self.model is not None and spec == self.model_spec:
            return
        torch.manual_seed(seed)  # the coordinator's seed: every client starts from the same factors
        model = spec.build()
        local_path = self.state_dir / "local.safetensors"
        if local_state(model) and local_path.exists():
            try:
                state, saved_spec, _ = load_checkpoint(local_path)
                if saved_spec != spec:
                    raise ValueError(f"saved for {saved_spec}, run uses {spec}")
                load_state(model, state, part="local")
                log.info("%s: restored local factors from %s", self.cfg.client_id, local_path)
            except (ValueError, FileNotFoundError) as exc:
                log.warning("%s: ignoring local state %s: %s", self.cfg.client_id, local_path, exc)
        self.model, self.model_spec = model.to(self.device), spec

    def _phase(self, name: str, **kw):
        if self.energy is None:
            import contextlib
            return contextlib.nullcontext()
        return self.energy.phase(name, **kw)

    def _train_round(self, msg: Message, transfer: dict) -> None:
        torch.set_num_threads(self.cfg.threads)
        me, meta = self.cfg.client_id, msg.meta
        with self._phase("download", bytes_received=transfer["task_mqtt_bytes"]):
            spec = ModelSpec.from_dict(meta["spec"])
            self._ensure_model(spec, int(meta.get("init_seed", 0)))
            load_state(self.model, {k: v.to(self.device) for k, v in msg.tensors.items()})
        t = meta["train"]
        with self._phase("train"):
            res = train_epochs(self.model, self.train_data, epochs=int(t["epochs"]),
                               batch_size=int(t["batch_size"]), lr=float(t["lr"]),
                               momentum=float(t.get("momentum", 0.0)),
                               weight_decay=float(t.get("weight_decay", 0.0)), device=self.device,
                               seed=int(t.get("seed", msg.round)))
        metrics = {"loss": res["loss"], "train_s": res["seconds"], "steps": res["steps"], **transfer}
        for key in ("prev_upload", "prev_socket_bytes"):
            if key in self._carry:
                metrics[key] = self._carry[key]
        local, shared = local_state(self.model), global_state(self.model)
        if local:
            save_checkpoint(self.state_dir / "local.safetensors", local, spec, round=msg.round, client_id=me)
        save_checkpoint(self.state_dir / "global.safetensors", shared, spec, round=msg.round, client_id=me)
        if self.cfg.eval_local:
            ev = evaluate(self.model, self.test_data, device=self.device)
            metrics["local_accuracy"], metrics["local_loss"] = ev["accuracy"], ev["loss"]
            self._last_accuracy = ev["accuracy"]
        if self.energy is not None:
            metrics["energy"] = self.energy.pop_report()
            if "prev_upload_energy" in self._carry:
                metrics["energy"]["prev_upload"] = self._carry["prev_upload_energy"]
        update = Message(MessageKind.UPDATE, self.cfg.run_id, msg.round, me,
                         {k: v.cpu() for k, v in shared.items()},
                         {"num_examples": len(self.train_data), "task_id": meta["task_id"],
                          "metrics": metrics})
        enc = encode(update, CodecPolicy.parse(meta.get("uplink", "fp32")))
        topic = self.topics.update(me)
        frames, stats = enc.split(int(meta.get("max_packet", 1_000_000)), topic)
        t_up = time.monotonic()
        with self._phase("upload", bytes_sent=stats.framed_bytes):
            ok = self.session.publish_all(topic, frames, timeout=float(meta.get("deadline_s", 120)))
        self._carry["prev_upload"] = {"round": msg.round, "payload_bytes": stats.payload_bytes,
                                      "mqtt_bytes": stats.framed_bytes, "upload_s": time.monotonic() - t_up,
                                      "acked": ok}
        if self.energy is not None:
            self._carry["prev_upload_energy"] = {"round": msg.round, **self.energy.pop_report().get("upload", {})}
        self._socket_report(msg.round)
        if ok:
            self.rounds_done.append(msg.round)
        log.info("%s: round %d done (loss %.4f, %d bytes up%s)", me, msg.round, res["loss"],
                 stats.framed_bytes, "" if ok else ", publish incomplete")

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

    def _on_finish(self) -> None:
        if self.cfg.export_on_finish and self.model is not None:
            try:
                self._export()
            except Exception:  # export is a convenience; the run itself succeeded
                log.exception("%s: export failed", self.cfg.client_id)
        if self.cfg.exit_on_finish:
            self.finished.set()

    def _export(self) -> None:
        """The final (for pFedPara: personalised) model -> STATE_DIR/model.onnx (+ model.int8.onnx),
        checked against torch on the local test split and calibrated on local training data."""
        from export import export_model

        test = self.test_data.tensors
        with self.train_lock:
            report = export_model(self.model, self.model_spec, self.state_dir / "model.onnx",
                                  info={"client_id": self.cfg.client_id, "round": self.finish_meta.get("round", 0),
                                        "accuracy": self._last_accuracy, "run_id": self.cfg.run_id},
                                  eval_data=(test[0], test[1]), calibration=self.train_data.tensors[0][:256],
                                  int8=True, threads=self.cfg.threads, latency_runs=10)
        log.info("%s: exported %s (parity %s, int8 %s)", self.cfg.client_id, report.onnx,
                 "ok" if report.ok else "FAILED", report.int8)
