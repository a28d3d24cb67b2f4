"""The round pipeline (docs/protocol.md): the next task goes out before the previous round is
evaluated and written down, clients evaluate after their update has gone, FedAvg folds updates
in as they arrive, and ``eval_every`` skips evaluations."""
from __future__ import annotations

import pytest
import torch
from conftest import needs_fmnist
from support import Sniffer, coord_cfg, start_clients

from coordinator.aggregate import StreamingFedAvg, fedavg
from coordinator.events import RoundCompleted, TaskSent
from coordinator.server import Coordinator
from fedpara.runtime.checkpoint import load_checkpoint
from fedpara.runtime.messages import ProtocolError, Report
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import read_json_lines


def _states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g),
             "steps": torch.tensor(7 + i)} for i in range(n)]


def test_streaming_fedavg_matches_fedavg_in_any_order():
    states, weights = _states(5), [600, 10, 3000, 1, 77]
    ref = fedavg(states, weights)
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        s = StreamingFedAvg(states[0])
        for i in order:
            s.add(states[i], weights[i])
        out = s.result()
        assert s.count == 5 and s.total == sum(weights)
        for k in ("w", "b"):  # float64 sums: equal up to one fp32 rounding
            assert out[k].dtype == torch.float32
            torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-7)
        assert out["steps"].item() == states[order[0]]["steps"].item()  # integer buffers: the first's


def test_streaming_fedavg_refuses_bad_input():
    s = StreamingFedAvg(_states(1)[0])
    with pytest.raises(ValueError, match="no results"):
        s.result()
    with pytest.raises(ValueError, match="positive"):
        s.add(_states(1)[0], 0)
    with pytest.raises(ValueError, match="shape mismatch"):
        s.add({"w": torch.zeros(3, 3), "b": torch.zeros(32), "steps": torch.tensor(1)}, 1)


def test_report_meta_is_bounded():
    r = Report.from_meta({"task_id": "ab-1-1", "report": {"local_accuracy": 0.5, "local_loss": float("nan"),
                                                          "loss": 3.0, "evil": "x" * 10_000}})
    assert r.metrics == {"local_accuracy": 0.5}  # NaN, unknown and non-evaluation keys dropped
    with pytest.raises(ProtocolError, match="report.task_id"):
        Report.from_meta({"report": {}})
    assert Report.from_meta(Report("t-2-1", {"local_accuracy": 1.0}).to_meta()) == Report("t-2-1", {"local_accuracy": 1.0})


@needs_fmnist
def test_next_task_goes_out_before_the_previous_round_is_written(mosquitto_broker, tmp_path):
    cfg = coord_cfg(tmp_path, rounds=3, eval_every=2)
    clients = start_clients(mosquitto_broker, cfg, tmp_path, 3)
    sniffer = Sniffer(mosquitto_broker, cfg.run_id)
    events = []
    try:
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker), on_event=events.append).run()
    finally:
        sniffer.stop()
        for c in clients:
            c.stop()
    assert summary["status"] == "completed"
    order = [(type(e).__name__, e.round) for e in events if isinstance(e, (TaskSent, RoundCompleted))]
    # round r+1's task is sent before round r's line is written (its evaluation overlaps training)
    assert order.index(("TaskSent", 2)) < order.index(("RoundCompleted", 1))
    assert order.index(("TaskSent", 3)) < order.index(("RoundCompleted", 2))
    rows = read_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    # eval_every=2: round 1 not evaluated; round 2 and the last round are
    assert rows[0]["accuracy"] is None and rows[1]["accuracy"] > 0.3 and rows[2]["accuracy"] > 0.3
    assert summary["final_accuracy"] == rows[2]["accuracy"]
    for r in rows:
        assert set(r["timing"]) == {"send_s", "wait_s", "aggregate_s", "eval_s", "save_s"}
        assert all(v >= 0 for v in r["timing"].values())
        # every client evaluated its model after sending its update, and the report reached the line
        for m in r["client_metrics"].values():
            assert m["report_follows"] is True and 0 <= m["local_accuracy"] <= 1 and m["local_loss"] > 0
    # on the wire: each client's report follows its update (no tensors in it)
    for c in ("c0", "c1", "c2"):
        mine = [m for _, m in sniffer.decoded() if m.sender == c]
        kinds = ["report" if "report" in m.meta else "update" for m in mine]
        assert kinds == ["update", "report"] * 3
        assert all(not m.tensors for m in mine if "report" in m.meta)
    # every checkpoint holds the model that the next round's task carried
    for rnd in (1, 2, 3):
        state, _, info = load_checkpoint(tmp_path / "run" / "checkpoints" / f"round-{rnd:04d}.safetensors")
        assert info["round"] == rnd


@needs_fmnist
def test_streaming_and_buffered_fedavg_train_the_same_model(mosquitto_broker, tmp_path):
    finals = {}
    for name, screen in (("streaming", 0.0), ("buffered", 1e9)):  # a screen that never bites keeps updates
        cfg = coord_cfg(tmp_path / name, seed=3, screen_factor=screen)
        clients = start_clients(mosquitto_broker, cfg, tmp_path / name, 3)
        try:
            coord = Coordinator(cfg, parse_broker_url(mosquitto_broker))
            assert coord.strategy.streams is (screen == 0.0)
            summary = coord.run()
        finally:
            for c in clients:
                c.stop()
        assert summary["status"] == "completed"
        finals[name] = load_checkpoint(summary["checkpoint"])[0]
    for k, v in finals["buffered"].items():
        torch.testing.assert_close(finals["streaming"][k], v, rtol=1e-5, atol=1e-6)


@needs_fmnist
def test_updates_lost_while_the_coordinator_reconnects_are_asked_for_again(mosquitto_broker, tmp_path):
    import socket

    cfg = coord_cfg(tmp_path, rounds=3, round_deadline_s=60.0)
    clients = start_clients(mosquitto_broker, cfg, tmp_path, 3)
    box = {}

    def on_event(e):
        if isinstance(e, TaskSent) and e.round == 2:  # our connection drops while the clients train
            box["coord"].session._client.socket().shutdown(socket.SHUT_RDWR)

    try:
        box["coord"] = Coordinator(cfg, parse_broker_url(mosquitto_broker), on_event=on_event)
        summary = box["coord"].run()
    finally:
        for c in clients:
            c.stop()
    rows = read_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed" and [r["replied"] for r in rows] == [3, 3, 3]
    assert rows[1]["attempt"] == 1 and rows[1]["duration_s"] < 20  # not the 60 s deadline
    assert box["coord"].session.connects == 2
    # the updates sent while we were away went to nobody; the clients sent them again when asked
    assert sum(c.counters["update_resent"] for c in clients) >= 1
    assert rows[1]["bytes_down"] > 1.2 * rows[2]["bytes_down"]  # the task went again (+1/3 per copy)


def test_the_streaming_accumulator_keeps_no_update_and_the_buffered_one_keeps_each():
    from coordinator.strategy import BufferedAccumulator, FitResult, Strategy, StreamingAccumulator
    states = _states(3)
    ref = states[0]
    streaming = Strategy(screen_factor=0).accumulator(ref)
    buffered = Strategy(screen_factor=1e9).accumulator(ref)
    assert isinstance(streaming, StreamingAccumulator) and isinstance(buffered, BufferedAccumulator)
    for i, st in enumerate(states):
        for acc in (streaming, buffered):
            kept = acc.add(FitResult(f"c{i}", st, i + 1))
            assert not kept.state  # the round keeps metrics only
    assert not hasattr(streaming, "results") and len(buffered.results) == 3
    a, b = streaming.result().state, buffered.result().state
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
