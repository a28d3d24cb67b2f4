"""The coordinator's round loop (paper Alg. 1 over MQTT; docs/protocol.md).

Each round: wait for enough live clients, sample K, publish the global factors once (broker
fan-out) or per client, collect updates until all sampled clients replied or the deadline passed,
then FedAvg the factors if at least ``min_reply_fraction`` replied; otherwise keep the model and
sample again. Evaluate, checkpoint, append one line to metrics.jsonl. Failures are values: every
rejected message is logged and counted under ``ignored``; nothing a client sends can crash it.
"""
from __future__ import annotations

import json
import logging
import math
import queue
import random
import secrets
import time
from collections import Counter
from pathlib import Path

import torch

from fedpara import global_state, load_state
from fedpara.checkpoint import ModelSpec, load_checkpoint, save_checkpoint, state_digest
from fedpara.data import load_test_data
from fedpara.state import state_bytes
from fedpara.topics import Topics
from fedpara.training import evaluate
from fedpara.transport import BrokerURL, MqttSession
from fedpara.wire import (Limits, Message, MessageKind, Reassembler, WireConfig, WireError, decode,
                          encode, framed_bytes)

from .aggregate import check_compatible, fedavg
from .config import CoordinatorConfig
from .registry import ClientRegistry

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run cannot continue (no clients, too few replies after every attempt)."""


def read_metrics(path: Path) -> list[dict]:
    """Complete JSON lines of a metrics file; a torn last line (crash mid-write) is dropped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(row, dict) and isinstance(row.get("round"), int):
                rows.append(row)
    return rows


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, broker: BrokerURL, *, resume: bool = False,
                 on_round=None, on_event=None) -> None:
        self.cfg, self.broker = cfg, broker
        self.topics = Topics(cfg.run_id)
        self.out = Path(cfg.out)
        self.on_round, self.on_event = on_round, on_event or (lambda *a: None)
        self.spec: ModelSpec = cfg.spec
        self.wire = WireConfig(downlink=cfg.downlink, uplink=cfg.uplink)
        self.limits = Limits()
        self.registry = ClientRegistry()
        self.reassembler = Reassembler(timeout_s=max(60.0, cfg.round_deadline_s))
        self.ignored: Counter = Counter()
        torch.manual_seed(cfg.seed)
        self.model = self.spec.build()
        self.state = global_state(self.model)
        self.dense_bytes = state_bytes(ModelSpec(**{**self.spec.to_dict(), "scheme": "dense"}).build().state_dict())
        self.rows: list[dict] = []
        self.start_round = 1
        self.metrics_path = self.out / "metrics.jsonl"
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        else:
            if self.metrics_path.exists() and read_metrics(self.metrics_path):
                raise ValueError(f"out: {self.out} already holds a run; use --resume or another --out")
            self.metrics_path.write_text("")
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.test_data = load_test_data(cfg.test_data)
        self.session: MqttSession | None = None
        self._round = 0
        self._attempt = 0
        self._task_id = ""
        self._session_token = secrets.token_hex(4)  # tells tasks of a resumed coordinator apart
        self._sampled: set[str] = set()
        self._replies: dict[str, dict] = {}
        self._up_framed = 0
        self._socket_prev: tuple[int, int] | None = None

    # --- persistence -----------------------------------------------------------------------
    def _checkpoint_path(self, rnd: int) -> Path:
        return self.out / "checkpoints" / f"round-{rnd:04d}.safetensors"

    def _resume(self) -> None:
        rows = read_metrics(self.metrics_path)
        # rewrite without a torn tail so appends stay valid JSON lines
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        if rows:
            last = rows[-1]["round"]
            state, spec, info = load_checkpoint(self._checkpoint_path(last))
            if spec != self.spec:
                raise ValueError(f"resume: checkpoint model {spec} differs from the config's {self.spec}")
            load_state(self.model, state)
            self.state = global_state(self.model)
            self.start_round = last + 1
            self.rows = rows
        log.info("resuming %s at round %d", self.out, self.start_round)

    def _append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    # --- messages ----------------------------------------------------------------------------
    def _status_payload(self, state: str) -> bytes:
        return encode(Message(MessageKind.STATUS, self.cfg.run_id, 0, "coordinator",
                              meta={"state": state, "role": "coordinator"})).data

    def _pump(self, timeout: float) -> None:
        """Handle incoming messages for up to ``timeout`` seconds (returns early when idle)."""
        end = time.monotonic() + timeout
        while True:
            try:
                topic, payload = self.session.inbox.get(timeout=max(0.0, min(0.2, end - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= end:
                    return
                continue
            try:
                self._handle(topic, payload)
            except (WireError, ValueError) as exc:
                self.ignored["malformed"] += 1
                log.warning("ignored message on %s: %s", topic, exc)
            except Exception:  # a bug must not take the coordinator down mid-run
                self.ignored["error"] += 1
                log.exception("error handling a message on %s", topic)
            if time.monotonic() >= end:
                return

    def _handle(self, topic: str, payload: bytes) -> None:
        client = self.topics.client_of(topic)
        if client is None:
            self.ignored["unknown_topic"] += 1
            return
        if topic == self.topics.status(client):
            if not payload:  # a cleared retained status
                self.registry.mark_offline(client)
                return
            msg = decode(payload, self.limits)
            if msg.kind != MessageKind.STATUS or msg.run_id != self.cfg.run_id or msg.sender != client:
                raise ValueError(f"status on {topic} is not a status from {client} for run {self.cfg.run_id}")
            info = self.registry.update(client, msg.meta)
            self.on_event("status", client, info.online)
            return
        if topic != self.topics.update(client):
            self.ignored["unknown_topic"] += 1
            return
        self._up_framed += framed_bytes([len(payload)], topic)
        data = self.reassembler.add(payload)
        if data is None:
            return
        msg = decode(data, self.limits)
        if msg.kind != MessageKind.UPDATE or msg.run_id != self.cfg.run_id:
            raise ValueError(f"not an update for run {self.cfg.run_id}: {msg.kind} {msg.run_id!r}")
        if msg.sender != client:
            raise ValueError(f"sender {msg.sender!r} does not match topic client {client!r}")
        if msg.round != self._round:
            self.ignored["stale" if msg.round < self._round else "future"] += 1
            log.info("ignored update from %s for round %d (now %d)", client, msg.round, self._round)
            return
        if client not in self._sampled:
            self.ignored["not_sampled"] += 1
            log.info("ignored update from %s: not sampled in round %d", client, self._round)
            return
        if client in self._replies:
            self.ignored["duplicate"] += 1
            return
        if msg.meta.get("task_id") != self._task_id:  # an earlier attempt or coordinator session
            self.ignored["stale"] += 1
            return
        n = msg.meta.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"update from {client}: num_examples must be a positive int, got {n!r}")
        check_compatible(self.state, msg.tensors)
        tensors = {k: v.to(self.state[k].dtype) for k, v in msg.tensors.items()}
        metrics = msg.meta.get("metrics") if isinstance(msg.meta.get("metrics"), dict) else {}
        self._replies[client] = {"state": tensors, "num_examples": n, "metrics": metrics,
                                 "payload_bytes": len(data)}
        self.on_event("reply", client, len(self._replies))

    # --- the round loop ----------------------------------------------------------------------
    def _wait_for_clients(self) -> list[str]:
        deadline = time.monotonic() + self.cfg.wait_clients_s
        while len(self.registry.live()) < self.cfg.min_clients:
            if time.monotonic() > deadline:
                raise RunFailed(f"only {len(self.registry.live())} live clients after "
                                f"{self.cfg.wait_clients_s:.0f}s; need min_clients={self.cfg.min_clients}")
            self._pump(0.5)
        return self.registry.live()

    def _send_task(self, rnd: int, attempt: int, sampled: list[str], live: list[str]) -> dict:
        cfg = self.cfg
        self._task_id = f"{self._session_token}-{rnd}-{attempt}"
        meta = {"selected": sampled, "attempt": attempt, "task_id": self._task_id, "spec": self.spec.to_dict(),
                "init_seed": cfg.seed, "deadline_s": cfg.round_deadline_s, "uplink": cfg.uplink,
                "max_packet": cfg.max_packet,
                "train": {"epochs": cfg.local_epochs, "batch_size": cfg.batch_size,
                          "lr": cfg.lr * cfg.lr_decay ** (rnd - 1), "momentum": cfg.momentum,
                          "weight_decay": cfg.weight_decay, "seed": cfg.seed * 100_003 + rnd}}
        enc = encode(Message(MessageKind.TASK, cfg.run_id, rnd, "coordinator", self.state, meta),
                     self.wire)
        broadcast = set(sampled) == set(live)
        topics = [self.topics.task] if broadcast else [self.topics.task_for(c) for c in sampled]
        framed = 0
        for topic in topics:
            frames, stats = enc.split(cfg.max_packet, topic)
            if not self.session.publish_all(topic, frames, timeout=cfg.round_deadline_s):
                log.warning("round %d: publishing the task on %s did not complete", rnd, topic)
            framed += stats.framed_bytes
        # the broker delivers one copy to every subscriber of the fan-out topic
        receivers = len(live) if broadcast else len(sampled)
        mqtt_down = framed * receivers if broadcast else framed
        return {"bytes_down": enc.stats.payload_bytes * receivers, "mqtt_bytes_down": mqtt_down,
                "raw_bytes_down": enc.stats.raw_bytes * receivers, "receivers": receivers}

    def _run_round(self, rnd: int) -> dict:
        cfg = self.cfg
        t0 = time.monotonic()
        sent: Counter = Counter()  # every attempt's bytes count: they crossed the wire
        self._up_framed = 0
        for attempt in range(1, cfg.max_attempts + 1):
            live = self._wait_for_clients()
            k = len(live) if cfg.clients_per_round == 0 else min(cfg.clients_per_round, len(live))
            sampled = sorted(random.Random(f"{cfg.seed}/{rnd}/{attempt}").sample(live, k))
            self._round, self._attempt = rnd, attempt
            self._sampled, self._replies = set(sampled), {}
            sent.update(self._send_task(rnd, attempt, sampled, live))
            self.on_event("task", rnd, sampled)
            deadline = time.monotonic() + cfg.round_deadline_s
            while len(self._replies) < len(sampled) and time.monotonic() < deadline:
                self._pump(min(0.5, max(0.0, deadline - time.monotonic())))
            needed = max(1, math.ceil(cfg.min_reply_fraction * len(sampled)))
            if len(self._replies) >= needed:
                break
            log.warning("round %d attempt %d: %d of %d sampled clients replied (need %d); model kept",
                        rnd, attempt, len(self._replies), len(sampled), needed)
        else:
            raise RunFailed(f"round {rnd}: too few replies after {cfg.max_attempts} attempts")
        replies = self._replies
        ids = sorted(replies)
        self.state = fedavg([replies[c]["state"] for c in ids], [replies[c]["num_examples"] for c in ids])
        load_state(self.model, self.state)
        ev = evaluate(self.model, self.test_data, batch_size=cfg.eval_batch_size)
        row = {"round": rnd, "attempt": attempt, "accuracy": ev["accuracy"], "loss": ev["loss"],
               "sampled": len(sampled), "replied": len(ids), "clients": ids,
               "bytes_down": sent["bytes_down"], "bytes_up": sum(replies[c]["payload_bytes"] for c in ids),
               "mqtt_bytes_down": sent["mqtt_bytes_down"], "mqtt_bytes_up": self._up_framed,
               "dense_bytes_down": self.dense_bytes * sent["receivers"],
               "dense_bytes_up": self.dense_bytes * len(ids),
               "broadcast": set(sampled) == set(live), "lr": cfg.lr * cfg.lr_decay ** (rnd - 1),
               "train_loss": _weighted(replies, ids, "loss"),
               "duration_s": time.monotonic() - t0, "ignored": dict(self.ignored),
               "client_metrics": {c: replies[c]["metrics"] for c in ids}}
        energy = [replies[c]["metrics"].get("energy") for c in ids]
        energy = [e for e in energy if isinstance(e, dict)]
        if energy:
            row["energy_j"] = sum(_num(e.get("total_j")) + _num((e.get("prev_upload") or {}).get("joules"))
                                  for e in energy)
            row["energy_measured"] = all(e.get("measured") is True for e in energy)
        if self.spec.scheme == "pfedpara":
            # personalised models are evaluated by each client on its own test split
            row["global_accuracy"] = row["accuracy"]
            local = _weighted(replies, ids, "local_accuracy")
            if local is not None:
                row["accuracy"] = local
        sock = self.session.socket_bytes()
        if sock is not None:  # what the coordinator's own TCP connection moved this round (kernel count)
            prev = self._socket_prev or sock
            row["socket_bytes_sent"], row["socket_bytes_received"] = sock[0] - prev[0], sock[1] - prev[1]
        self._socket_prev = sock
        save_checkpoint(self._checkpoint_path(rnd), self.state, self.spec, round=rnd,
                        accuracy=row["accuracy"], run_id=cfg.run_id)
        self._append_metrics(row)
        return row

    def run(self) -> dict:
        cfg = self.cfg
        t0 = time.monotonic()
        self.session = MqttSession(self.broker, f"coordinator-{cfg.run_id}",
                                   [(self.topics.status_all, 1), (self.topics.update_all, 1)],
                                   will=(self.topics.coordinator, self._status_payload("offline"), 1, True))
        self.session.start()
        self._socket_prev = self.session.socket_bytes()
        self.session.publish(self.topics.coordinator, self._status_payload("online"), retain=True)
        status = "interrupted"  # unless the loop ends or fails cleanly: then clients keep waiting
        try:
            for rnd in range(self.start_round, cfg.rounds + 1):
                row = self._run_round(rnd)
                self.rows.append(row)
                if self.on_round:
                    self.on_round(row)
            status = "completed"
        except RunFailed as exc:
            status = f"failed: {exc}"
            log.error("%s", exc)
        finally:
            try:
                self._finish(status)
            finally:
                self.session.stop()
        return self._summary(status, time.monotonic() - t0)

    def _finish(self, status: str) -> None:
        """Tell the clients the run is over (not after a crash or Ctrl-C: a resume may follow)."""
        if status == "interrupted":
            self.session.publish(self.topics.coordinator, self._status_payload("offline"), retain=True).wait_for_publish(5)
            return
        done = self.rows[-1]["round"] if self.rows else 0
        msg = Message(MessageKind.CONTROL, self.cfg.run_id, done, "coordinator",
                      meta={"action": "finish", "status": status, "round": done})
        self.session.publish_all(self.topics.control, [encode(msg).data], timeout=10)
        self.session.publish(self.topics.coordinator, self._status_payload("offline"), retain=True).wait_for_publish(5)

    def _summary(self, status: str, wall: float) -> dict:
        rows = self.rows
        tot = {k: sum(r[k] for r in rows) for k in ("bytes_down", "bytes_up", "mqtt_bytes_down",
                                                     "mqtt_bytes_up", "dense_bytes_down", "dense_bytes_up")}
        moved = tot["mqtt_bytes_down"] + tot["mqtt_bytes_up"]
        summary = {
            "status": status, "run_id": self.cfg.run_id, "spec": self.spec.to_dict(),
            "rounds": len(rows), "final_accuracy": rows[-1]["accuracy"] if rows else None,
            "best_accuracy": max((r["accuracy"] for r in rows), default=None),
            "wall_s": wall, **tot,
            "dense_ratio": (tot["dense_bytes_down"] + tot["dense_bytes_up"]) / moved if moved else None,
            "params": sum(t.numel() for t in self.state.values()),
            "energy_j": sum(r.get("energy_j", 0.0) for r in rows),
            "energy_measured": bool(rows) and all(r.get("energy_measured", False) for r in rows),
            "digest": state_digest(self.state), "ignored": dict(self.ignored),
            "checkpoint": str(self._checkpoint_path(rows[-1]["round"])) if rows else None,
        }
        acc = summary["final_accuracy"]
        summary["joules_per_accuracy_point"] = summary["energy_j"] / (100 * acc) if acc else None
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else 0.0


def _weighted(replies: dict, ids: list[str], key: str):
    vals = [(replies[c]["metrics"].get(key), replies[c]["num_examples"]) for c in ids]
    vals = [(v, n) for v, n in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return None
    return sum(v * n for v, n in vals) / sum(n for _, n in vals)
