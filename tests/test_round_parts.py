"""The coordinator's pure parts without a broker: strategy, update acceptance, registry, report;
the run directory; the typed protocol messages; the lean method library."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from coordinator.acceptance import RoundState, judge_update
from coordinator.registry import ClientRegistry
from coordinator.observation.records import round_row, summarize
from coordinator.strategy import FitResult, Strategy
from fedpara.models import ModelSpec
from fedpara.runtime.messages import (
    Control,
    ProtocolError,
    Status,
    Task,
    TrainParams,
    Update,
)
from fedpara.runtime.rundir import RunDir
from fedpara.wire import Message, MessageKind

REF = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}


# --- strategy ---------------------------------------------------------------------------------
def _result(cid, value, n, **metrics):
    return FitResult(cid, {"w": torch.full((2, 3), float(value)), "b": torch.full((2,), float(value))}, n, metrics)


def test_fedavg_weights_by_examples_in_float64():
    out = Strategy().aggregate(REF, [_result("a", 1.0, 1), _result("b", 4.0, 2)])
    assert torch.allclose(out["w"], torch.full((2, 3), 3.0)) and out["w"].dtype == torch.float32


def test_fedavg_is_order_independent():
    rs = [_result(c, v, n) for c, v, n in (("a", 0.1, 3), ("b", 0.7, 5), ("c", 1e-3, 11))]
    a, b = Strategy().aggregate(REF, rs), Strategy().aggregate(REF, rs[::-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_refuses_mismatched_or_empty():
    bad = FitResult("x", {"w": torch.zeros(3, 2), "b": torch.zeros(2)}, 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        Strategy().aggregate(REF, [_result("a", 1, 1), bad])
    with pytest.raises(ValueError, match="no results"):
        Strategy().aggregate(REF, [])


def test_sampling_is_seeded_sorted_and_bounded():
    live = [f"c{i}" for i in range(10)]
    s = Strategy(clients_per_round=4, seed=3)
    first = s.sample(live, rnd=2, attempt=1)
    assert first == sorted(first) and len(first) == 4 and set(first) <= set(live)
    assert s.sample(live[::-1], rnd=2, attempt=1) == first  # order of the live list does not matter
    assert s.sample(live, rnd=2, attempt=2) != first or s.sample(live, rnd=3, attempt=1) != first
    assert Strategy(0).sample(live, 1, 1) == live and Strategy(50).sample(live, 1, 1) == live


# --- acceptance -------------------------------------------------------------------------------
def _state(**kw):
    base = dict(run_id="r", round=3, task_id="t-3-1", sampled=frozenset({"a", "b"}), replied=frozenset(),
                reference=REF)
    base.update(kw)
    return RoundState(**base)


def _update(sender="a", rnd=3, task_id="t-3-1", n=5, run="r", kind=MessageKind.UPDATE, tensors=None, **meta):
    m = {"task_id": task_id, "num_examples": n, "metrics": {"loss": 0.5}, **meta}
    return Message(kind, run, rnd, sender, REF if tensors is None else tensors, m)


@pytest.mark.parametrize("msg, topic_client, state, reason", [
    (_update(), "a", _state(), "ok"),
    (_update(run="other"), "a", _state(), "malformed"),
    (_update(kind=MessageKind.STATUS), "a", _state(), "malformed"),
    (_update(sender="b"), "a", _state(), "malformed"),
    (_update(rnd=2), "a", _state(), "stale"),
    (_update(rnd=4), "a", _state(), "future"),
    (_update(sender="z"), "z", _state(), "not_sampled"),
    (_update(), "a", _state(replied=frozenset({"a"})), "duplicate"),
    (_update(task_id="old-3-1"), "a", _state(), "stale"),
    (_update(n=0), "a", _state(), "malformed"),
    (_update(n=True), "a", _state(), "malformed"),
    (_update(tensors={"w": torch.zeros(2, 3)}), "a", _state(), "malformed"),
    (_update(tensors={"w": torch.zeros(3, 3), "b": torch.zeros(2)}), "a", _state(), "malformed"),
])
def test_judge_update(msg, topic_client, state, reason):
    verdict = judge_update(msg, topic_client, state)
    assert verdict.reason == reason and verdict.accepted == (reason == "ok")
    if verdict.accepted:
        assert verdict.update == Update("t-3-1", 5, {"loss": 0.5})
    else:
        assert verdict.detail


# --- registry ---------------------------------------------------------------------------------
def test_registry_newest_status_wins_and_offline_leaves_live_set():
    now = [0.0]
    reg = ClientRegistry(clock=lambda: now[0])
    reg.update("b", Status("online", 10, "cpu"))
    now[0] = 5.0
    reg.update("a", Status("online", 3))
    assert reg.live() == ["a", "b"] and reg.get("a").last_seen == 5.0 and reg.get("b").num_examples == 10
    reg.update("b", Status("offline"))
    reg.mark_offline("a")
    reg.mark_offline("never-seen")
    assert reg.live() == [] and len(reg) == 2


# --- typed messages ---------------------------------------------------------------------------
def _task() -> Task:
    return Task("abc-1-1", ("c0", "c1"), ModelSpec(model="mlp", ratio=0.3), TrainParams(2, 16, 0.05, seed=9),
                attempt=1, init_seed=4, deadline_s=30.0, uplink="fp16", max_packet=4096)


def test_messages_round_trip_through_json():
    for msg in (_task(), Update("t", 7, {"loss": 0.1}), Status("online", 5, "cpu"), Control("finish", "completed", 3),
                Status("offline", role="coordinator")):
        meta = json.loads(json.dumps(msg.to_meta()))
        assert type(msg).from_meta(meta) == msg


@pytest.mark.parametrize("patch, field", [
    ({"train": {"epochs": 10**6, "batch_size": 1, "lr": 0.1}}, "task.train.epochs"),
    ({"train": {"epochs": 1, "batch_size": 1, "lr": float("nan")}}, "task.train.lr"),
    ({"train": {"epochs": 1, "batch_size": 1, "lr": 1e30}}, "task.train.lr"),
    ({"train": {"epochs": 1, "batch_size": "8", "lr": 0.1}}, "task.train.batch_size"),
    ({"train": "fast"}, "task.train"),
    ({"spec": {"model": "resnet"}}, "task.spec"),
    ({"task_id": ""}, "task.task_id"),
    ({"deadline_s": float("inf")}, "task.deadline_s"),
    ({"max_packet": 10}, "task.max_packet"),
    ({"selected": "c0"}, "task.selected"),
])
def test_bad_tasks_raise_protocol_error_naming_the_field(patch, field):
    meta = {**_task().to_meta(), **patch}
    with pytest.raises(ProtocolError, match=field.replace(".", r"\.")):
        Task.from_meta(meta)


@pytest.mark.parametrize("cls, meta, field", [
    (Update, {"task_id": "t", "num_examples": -1}, "update.num_examples"),
    (Update, {"num_examples": 1}, "update.task_id"),
    (Status, {"state": "sleeping"}, "status.state"),
    (Status, {"state": "online", "num_examples": 1.5}, "status.num_examples"),
    (Control, {"action": "reboot"}, "control.action"),
    (Control, ["finish"], "control"),
])
def test_bad_metas_raise_protocol_error(cls, meta, field):
    with pytest.raises(ProtocolError, match=field.replace(".", r"\.")):
        cls.from_meta(meta)


# --- report -----------------------------------------------------------------------------------
def test_round_row_and_summary_add_up():
    results = [_result("b", 0, 30, loss=1.0, local_accuracy=0.5, energy={"total_j": 2.0, "measured": False}),
               _result("a", 0, 10, loss=3.0, local_accuracy=0.9, energy={"total_j": 1.0, "prev_upload": {"joules": 0.5}})]
    sent = {"bytes_down": 100, "mqtt_bytes_down": 120, "receivers": 3}
    row = round_row(rnd=1, attempt=1, evaluation={"accuracy": 0.8, "loss": 0.4}, sampled=["a", "b", "c"],
                    broadcast=True, results=results, sent=sent, mqtt_bytes_up=50, dense_bytes=1000, lr=0.1,
                    duration_s=2.0, ignored={"stale": 1}, personalised=True)
    assert row["clients"] == ["a", "b"] and row["replied"] == 2 and row["sampled"] == 3
    assert row["train_loss"] == pytest.approx((3.0 * 10 + 1.0 * 30) / 40)
    assert row["accuracy"] == pytest.approx((0.9 * 10 + 0.5 * 30) / 40) and row["global_accuracy"] == 0.8
    assert (row["dense_bytes_down"], row["dense_bytes_up"]) == (3000, 2000)
    assert row["energy_j"] == pytest.approx(3.5) and row["energy_measured"] is False
    s = summarize([row, {**row, "round": 2}], status="completed", run_id="r", spec={}, wall_s=1.0, params=5)
    assert s["rounds"] == 2 and s["mqtt_bytes_down"] == 240 and s["dense_ratio"] == pytest.approx(10000 / 340)


# --- run directory ----------------------------------------------------------------------------
def test_run_dir_layout_and_torn_metrics(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.start_metrics()
    rd.append_metrics({"round": 1, "accuracy": 0.5})
    rd.append_metrics({"round": 2, "accuracy": 0.6})
    with open(rd.metrics_path, "a") as f:
        f.write('{"round": 3, "accu')  # a crash mid-write
    assert [r["round"] for r in rd.read_metrics()] == [1, 2] and rd.last_recorded_round() == 2
    rd.repair_metrics()
    rd.append_metrics({"round": 3})
    assert [r["round"] for r in rd.read_metrics()] == [1, 2, 3]
    for r in (2, 3, 7):
        rd.checkpoint(r).parent.mkdir(parents=True, exist_ok=True)
        rd.checkpoint(r).write_bytes(b"x")
    assert rd.latest_checkpoint() == rd.checkpoint(3)  # the last recorded round, not round 7 on disk
    assert rd.checkpoint(3).name == "round-0003.safetensors"
    rd.write_config({"a": 1})
    assert rd.read_config() == {"a": 1} and rd.read_summary() == {}
    rd.summary_path.write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        rd.read_summary()


def test_run_dir_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        RunDir(tmp_path).latest_checkpoint()


# --- layering ---------------------------------------------------------------------------------
def test_import_fedpara_loads_no_runtime():
    code = ("import sys, fedpara; bad = [m for m in ('paho', 'amqtt', 'zstandard', 'coordinator', 'edge_client') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_spec_build_is_seeded_and_leaves_global_rng_alone():
    spec = ModelSpec(model="mlp", scheme="pfedpara", ratio=0.3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = spec.build(seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.randn(1000)  # whatever ran first does not matter
    b = spec.build(seed=5)
    c = spec.build(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_every_metrics_line_carries_wall_s_and_resume_goes_on_from_it(amqtt_broker, tmp_path):
    """``wall_s``: seconds since the run started, increasing; a resumed run continues from its last
    line's (time-to-accuracy reads off any run)."""
    import dataclasses

    from conftest import fashion_mnist_available
    if not fashion_mnist_available():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    from support import coord_cfg, run_federated

    cfg = coord_cfg(tmp_path, rounds=2)
    summary, rows, _ = run_federated(amqtt_broker, cfg, tmp_path, 3, energy="off", exit_on_finish=False)
    walls = [r["wall_s"] for r in rows]
    assert summary["status"] == "completed" and 0 < walls[0] < walls[1] <= summary["wall_s"]
    from coordinator.server import Coordinator
    from fedpara.runtime.mqtt import parse_broker_url
    from fedpara.runtime.rundir import RunDir
    from support import start_clients

    clients = start_clients(amqtt_broker, cfg, tmp_path, 3, energy="off")
    try:
        Coordinator(dataclasses.replace(cfg, rounds=3), parse_broker_url(amqtt_broker), resume=True).run()
    finally:
        for c in clients:
            c.stop()
    rows = RunDir(cfg.out).read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3] and rows[2]["wall_s"] > walls[1]
