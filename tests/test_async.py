"""Asynchronous buffered rounds (docs/async.md): the version clock, staleness weighting and
refusal, the buffer as the strategy's accumulator, and whole runs on a real broker."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import needs_fmnist
from support import TRAIN, coord_cfg

from coordinator.acceptance import RoundState, judge_update
from coordinator.asyncloop import AsyncWindow, staleness_weight
from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from coordinator.strategy import FitResult, Strategy
from edge_client.client import EdgeClient
from edge_client.config import ClientConfig
from fedpara.runtime.messages import Update
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import RunDir
from fedpara.wire import Message, MessageKind


def _state(v: float) -> dict:
    return {"w": torch.full((4,), v), "steps": torch.tensor(3)}


def _rules(client: str, version: int, base: dict, task: str = "t") -> RoundState:
    return RoundState("r", version + 1, task, frozenset([client]), frozenset(), base)


def test_staleness_weight_is_fedbuffs_polynomial():
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == pytest.approx(0.5)
    assert all(staleness_weight(s) > staleness_weight(s + 1) > 0 for s in range(20))


def test_a_stale_update_enters_the_buffer_as_its_delta_on_the_current_model():
    v0, v1 = _state(0.0), _state(10.0)
    w = AsyncWindow("r", 0, v0, Strategy(screen_factor=0).accumulator(v0), max_staleness=4)
    w.dispatched("slow", _rules("slow", 0, v0))                       # trained on version 0
    w.release(v1, Strategy(screen_factor=0).accumulator(v1))         # meanwhile the model moved to version 1
    w.dispatched("fast", _rules("fast", 1, v1))
    assert set(w.bases) == {0, 1}                                     # version 0 is kept for the slow task
    assert w.accept(FitResult("slow", {"w": torch.full((4,), 1.0), "steps": torch.tensor(7)}, 100)) is None
    assert w.accept(FitResult("fast", {"w": torch.full((4,), 12.0), "steps": torch.tensor(7)}, 100)) is None
    assert w.staleness == {"slow": 1, "fast": 0}
    # slow moved +1 from version 0: its delta, scaled by 1/sqrt(2), lands on version 1 (FedBuff's step)
    out = w.accumulator.result().state
    torch.testing.assert_close(out["w"], torch.full((4,), ((10.0 + staleness_weight(1)) + 12.0) / 2))
    assert w.results["slow"].num_examples == 100
    w.release(out, Strategy(screen_factor=0).accumulator(out))
    assert set(w.bases) == {2}                                        # nothing in flight needs 0 or 1


def test_an_update_past_max_staleness_is_refused_and_counted():
    v0 = _state(0.0)
    w = AsyncWindow("r", 0, v0, Strategy(screen_factor=0).accumulator(v0), max_staleness=1)
    w.dispatched("slow", _rules("slow", 0, v0))
    for v in (1.0, 2.0):
        w.release(_state(v), Strategy(screen_factor=0).accumulator(_state(v)))
    assert w.accept(FitResult("slow", _state(5.0), 10)) == "too_stale"
    assert w.refused_stale == 1 and not w.results and "slow" not in w.in_flight


def test_replies_are_judged_against_each_clients_own_task():
    v0 = _state(0.0)
    w = AsyncWindow("r", 0, v0, Strategy(screen_factor=0).accumulator(v0), max_staleness=4)
    w.dispatched("a", _rules("a", 0, v0, task="ta"))

    def reply(client, task, rnd=1):
        return Message(MessageKind.UPDATE, "r", rnd, client, _state(1.0), Update(task, 5).to_meta())

    assert judge_update(reply("a", "tb"), "a", w.rules_for("a")).reason == "stale"       # not its task
    assert judge_update(reply("b", "ta"), "b", w.rules_for("b")).reason == "not_sampled"  # no task in flight
    verdict = judge_update(reply("a", "ta"), "a", w.rules_for("a"))
    assert verdict.accepted and w.accept(FitResult("a", _state(1.0), 5)) is None
    assert judge_update(reply("a", "ta"), "a", w.rules_for("a")).reason == "duplicate"    # QoS 1 again


def test_async_config_errors_name_the_field():
    with pytest.raises(ValueError, match="^mode: must be one of"):
        CoordinatorConfig(mode="later", insecure=True)
    with pytest.raises(ValueError, match="^buffer_size"):
        CoordinatorConfig(mode="async", buffer_size=0, insecure=True)
    with pytest.raises(ValueError, match="^sampling: poisson is for sync rounds"):
        CoordinatorConfig(mode="async", sampling="poisson", insecure=True)


def _clients(url, cfg, tmp_path, limits, **kw):
    """In-process clients with different amounts of data: the one with most trains longest."""
    clients = []
    for i, limit in enumerate(limits):
        data = TRAIN.format(n=len(limits), i=i).replace("limit=150", f"limit={limit}")
        c = EdgeClient(ClientConfig(client_id=f"c{i}", run_id=cfg.run_id, data=data, energy="estimate",
                                    state_dir=str(tmp_path / f"state-c{i}"), insecure=True, **kw),
                       parse_broker_url(url))
        c.start()
        clients.append(c)
    return clients


@needs_fmnist
def test_a_slow_client_does_not_hold_the_versions_back(mosquitto_broker, tmp_path):
    cfg = coord_cfg(tmp_path, mode="async", rounds=5, buffer_size=2, max_staleness=8, seed=1)
    clients = _clients(mosquitto_broker, cfg, tmp_path, [2400, 100, 100])  # c0 trains 24x the examples
    try:
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker)).run()
    finally:
        for c in clients:
            c.stop()
    rows = RunDir(cfg.out).read_metrics()
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["mode"] == "async" and r["version"] == r["round"] and r["replied"] == 2 for r in rows)
    assert any("c0" not in r["clients"] for r in rows)        # versions went on without the slow client
    assert all(0 <= s <= 8 for r in rows for s in r["staleness"].values())
    # bytes down count in the version during which a task went out (a version may need none: its
    # updates were all trained on tasks sent earlier); every version received its updates' frames
    assert sum(r["mqtt_bytes_down"] for r in rows) > 0
    assert all(r["mqtt_bytes_up"] > 0 and isinstance(r["wall_s"], float) for r in rows)
    assert rows[-1]["accuracy"] > 0.3 and math.isfinite(rows[-1]["loss"])


@needs_fmnist
def test_an_async_run_resumes_at_its_next_version(amqtt_broker, tmp_path):
    cfg = coord_cfg(tmp_path, mode="async", rounds=2, buffer_size=2)
    clients = _clients(amqtt_broker, cfg, tmp_path, [150, 150, 150], exit_on_finish=False)  # --stay
    try:
        assert Coordinator(cfg, parse_broker_url(amqtt_broker)).run()["status"] == "completed"
        more = dataclasses.replace(cfg, rounds=4)
        summary = Coordinator(more, parse_broker_url(amqtt_broker), resume=True).run()
    finally:
        for c in clients:
            c.stop()
    rows = RunDir(cfg.out).read_metrics()
    assert summary["status"] == "completed" and [r["version"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["wall_s"] >= rows[1]["wall_s"]


def test_prometheus_and_the_report_show_versions_and_staleness():
    from coordinator.observation.htmlreport import headline_items
    from coordinator.observation.prom import RunMetrics

    rows = [{"round": v, "version": v, "mode": "async", "staleness": {"c0": v - 1, "c1": 0}, "too_stale": 1,
             "accuracy": 0.5, "loss": 1.0, "mqtt_bytes_down": 10, "mqtt_bytes_up": 10, "dense_bytes_down": 40,
             "dense_bytes_up": 40, "replied": 2, "sampled": 2} for v in (1, 2, 3)]
    m = RunMetrics()
    for r in rows:
        m.record_row(r)
    text = m.exposition().decode()
    assert "fedpara_global_version 3.0" in text
    assert 'fedpara_update_staleness_bucket{le="0.0"} 4.0' in text and "fedpara_update_staleness_count 6.0" in text
    items = dict(headline_items(rows, {}, {"rounds": 3}))
    assert items["async: updates per version, staleness (mean / max)"] == "2.0, 0.50 / 2; refused as too stale: 3"


@needs_fmnist
def test_pfedpara_keeps_its_local_half_on_the_devices_in_async_mode(amqtt_broker, tmp_path):
    cfg = coord_cfg(tmp_path, mode="async", rounds=3, buffer_size=2, scheme="pfedpara")
    clients = _clients(amqtt_broker, cfg, tmp_path, [150, 150, 150])
    try:
        coord = Coordinator(cfg, parse_broker_url(amqtt_broker))
        summary = coord.run()
    finally:
        for c in clients:
            c.stop()
    import fedpara
    local = set(fedpara.local_state(clients[0].trainer.model))
    assert summary["status"] == "completed" and local and not local & set(coord.state)
    assert all(r["version"] == r["round"] for r in RunDir(cfg.out).read_metrics())


def test_a_signed_async_demo_with_a_robust_aggregator(tmp_path):
    """The demo's way: signed messages, its own broker and client processes, here with median
    aggregation over each version's buffer."""
    import json
    import subprocess
    import sys

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "demo", "--model", "mlp", "--clients", "3",
                        "--rounds", "3", "--limit", "300", "--mode", "async", "--buffer-size", "3",
                        "--aggregator", "median", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and [row["version"] for row in rows] == [1, 2, 3]
    assert all(row["replied"] == 3 and not row["ignored"].get("bad_signature") for row in rows)
    assert (out / "keys" / "coordinator.key").exists()  # signed: the demo made the run's keys


def test_the_buffer_feeds_a_robust_aggregator_unchanged():
    v0 = _state(0.0)
    acc = Strategy(aggregator="median", screen_factor=0).accumulator(v0)
    w = AsyncWindow("r", 0, v0, acc, max_staleness=4)
    for client, value in (("a", 1.0), ("b", 2.0), ("c", 100.0)):
        w.dispatched(client, _rules(client, 0, v0))
        assert w.accept(FitResult(client, {"w": torch.full((4,), value), "steps": torch.tensor(1)}, 10)) is None
    torch.testing.assert_close(w.accumulator.result().state["w"], torch.full((4,), 2.0))  # the outlier is out
