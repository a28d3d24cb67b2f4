"""End-to-end runs through a real broker: coordinator + edge clients over MQTT on real data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import needs_fmnist
from support import TRAIN, Sniffer, coord_cfg, start_clients

from coordinator.events import RoundCompleted, TaskSent
from coordinator.server import Coordinator
from edge_client.client import EdgeClient
from edge_client.config import ClientConfig
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import read_json_lines as read_metrics
from fedpara.runtime.topics import Topics
from fedpara.wire import Message, MessageKind, encode

pytestmark = needs_fmnist

def stop_all(clients):
    for c in clients:
        c.stop()


def run_coordinator(cfg, url, *, on_round=None, on_task=None, **kw) -> dict:
    if on_round is not None:  # a listener for the end of each round only
        kw["on_event"] = lambda e: on_round(e.row) if isinstance(e, RoundCompleted) else None
    if on_task is not None:  # a listener for each task sent (a round's start)
        kw["on_event"] = lambda e: on_task(e) if isinstance(e, TaskSent) else None
    return Coordinator(cfg, parse_broker_url(url) if isinstance(url, str) else url, **kw).run()


def test_three_clients_two_rounds(any_broker, tmp_path):
    cfg = coord_cfg(tmp_path)
    clients = start_clients(any_broker, cfg, tmp_path, 3)
    try:
        summary = run_coordinator(cfg, any_broker)
    finally:
        stop_all(clients)
    assert summary["status"] == "completed" and summary["rounds"] == 2
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("round", "accuracy", "loss", "sampled", "replied", "bytes_down", "bytes_up",
                    "mqtt_bytes_down", "mqtt_bytes_up", "duration_s"):
            assert key in r
        assert r["sampled"] == r["replied"] == 3
        assert r["mqtt_bytes_up"] > r["bytes_up"] > 0 and r["mqtt_bytes_down"] > r["bytes_down"] > 0
        assert r["dense_bytes_up"] > r["bytes_up"]  # FedPara sends less than the dense model would
    assert rows[-1]["accuracy"] > 0.5  # well above chance (0.1) after two rounds of 450 examples
    assert (tmp_path / "run" / "checkpoints" / "round-0002.safetensors").exists()
    summary_file = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary_file["final_accuracy"] == rows[-1]["accuracy"]
    assert all(c.rounds_done == [1, 2] for c in clients)
    # energy per client by phase, labelled with its source (estimated on this machine)
    for r in rows:
        assert r["energy_j"] > 0 and r["energy_measured"] is False
        for m in r["client_metrics"].values():
            assert {"download", "train"} <= set(m["energy"]) and m["energy"]["train"]["source"] == "estimate"
    assert "prev_upload" in rows[1]["client_metrics"]["c0"]["energy"]
    # kernel-counted socket bytes bound the MQTT accounting from above (they add PUBACKs, pings, ...)
    for r in rows:
        assert r["socket_bytes_received"] >= r["mqtt_bytes_up"]
        assert r["socket_bytes_sent"] >= r["mqtt_bytes_down"] // 3  # one broadcast copy to the broker
        assert r["socket_bytes_received"] - r["mqtt_bytes_up"] < 0.05 * r["mqtt_bytes_up"] + 4096
    m1 = rows[1]["client_metrics"]["c0"]
    assert m1["task_mqtt_bytes"] > m1["task_payload_bytes"] > 0 and m1["download_s"] >= 0
    # what the clients say they sent in round 1 is exactly what the coordinator counted arriving
    assert m1["prev_upload"]["round"] == 1 and m1["prev_upload"]["acked"]
    assert sum(m["prev_upload"]["mqtt_bytes"] for m in rows[1]["client_metrics"].values()) == rows[0]["mqtt_bytes_up"]
    assert sum(m["task_mqtt_bytes"] for m in rows[0]["client_metrics"].values()) == rows[0]["mqtt_bytes_down"]
    prev = rows[1]["client_metrics"]["c0"]["prev_socket_bytes"]
    assert prev["round"] == 1 and prev["sent"] >= rows[0]["mqtt_bytes_up"] // 3
    assert summary["energy_j"] == pytest.approx(sum(r["energy_j"] for r in rows))
    assert summary["joules_per_accuracy_point"] > 0


def test_sigkilled_client_ends_the_attempt_by_its_last_will(amqtt_broker, tmp_path):
    cfg = coord_cfg(tmp_path, min_clients=2, rounds=2, round_deadline_s=6.0, min_reply_fraction=0.5)
    clients = start_clients(amqtt_broker, cfg, tmp_path, 2, total=3)
    # the third client is a real process with a big partition, killed while it trains round 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    victim = subprocess.Popen([sys.executable, "-m", "fedpara.runtime.cli", "client", "--broker", amqtt_broker,
                               "--client-id", "victim", "--run", cfg.run_id, "--threads", "1",
                               "--data", "fashion-mnist,partition=iid,clients=3,index=2",
                               "--state-dir", str(tmp_path / "victim"), "--energy", "estimate", "--insecure"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "victim.log", "wb"))

    def on_event(event):
        if isinstance(event, TaskSent) and event.round == 1 and victim.poll() is None:
            threading.Timer(0.5, lambda: victim.send_signal(signal.SIGKILL)).start()

    sniffer = Sniffer(amqtt_broker, cfg.run_id)  # start round 1 only once the victim is online
    deadline = time.monotonic() + 60
    while not any(t.endswith("/status/victim") for t, _ in sniffer.messages) and time.monotonic() < deadline:
        time.sleep(0.1)
    sniffer.stop()
    try:
        summary = run_coordinator(cfg, amqtt_broker, on_event=on_event)
    finally:
        stop_all(clients)
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2]
    assert rows[0]["sampled"] == 3 and rows[0]["replied"] == 2 and "victim" not in rows[0]["clients"]
    # the victim's last will ended the attempt as soon as the survivors had replied
    assert rows[0]["duration_s"] < 6.0
    # the last will took the victim offline: round 2 samples only the survivors
    assert rows[1]["sampled"] == 2 and rows[1]["replied"] == 2


def test_late_joiner_is_used_in_a_later_round(amqtt_broker, tmp_path):
    cfg = coord_cfg(tmp_path, min_clients=2, rounds=4)
    clients = start_clients(amqtt_broker, cfg, tmp_path, 2, total=3)
    late = []

    def on_round(row):
        if row["round"] == 1:
            late.extend(start_clients(amqtt_broker, cfg, tmp_path, 1, first=2, total=3))

    try:
        summary = run_coordinator(cfg, amqtt_broker, on_round=on_round)
    finally:
        stop_all(clients + late)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed"
    assert "c2" not in rows[0]["clients"]
    assert any("c2" in r["clients"] for r in rows[1:])
    assert late[0].rounds_done and min(late[0].rounds_done) >= 2


def _bad_payloads(run_id: str) -> dict[str, bytes]:
    valid = encode(Message(MessageKind.UPDATE, run_id, 1, "c0", {}, {"num_examples": 1})).data
    wrong_version = bytearray(valid)
    wrong_version[4] = 99  # major version byte after the 4-byte magic
    return {"garbage": os.urandom(300), "truncated": valid[: len(valid) // 2],
            "oversized": b"\x00" * 3_000_000, "wrong_version": bytes(wrong_version), "empty": b""}


def test_bad_payloads_on_every_inbound_topic_are_ignored(amqtt_broker, tmp_path):
    cfg = coord_cfg(tmp_path, min_clients=2, rounds=2)
    t = Topics(cfg.run_id)
    clients = start_clients(amqtt_broker, cfg, tmp_path, 2)
    attacker = Sniffer(amqtt_broker, cfg.run_id)
    topics = [t.update("c0"), t.update("stranger"), t.status("mallory"), t.task, t.task_for("c0"),
              t.control, f"{t.base}/unknown/x"]

    def attack(*_):
        for topic in topics:
            for payload in _bad_payloads(cfg.run_id).values():
                attacker.publish(topic, payload)

    attack()
    try:
        summary = run_coordinator(cfg, amqtt_broker, on_task=attack)  # while each round collects
    finally:
        attacker.stop()
        stop_all(clients)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2]
    assert all(r["replied"] == 2 for r in rows)
    assert summary["ignored"].get("malformed", 0) >= 5
    for c in clients:
        assert c.counters["malformed"] >= 5 and c.rounds_done == [1, 2]


def test_coordinator_killed_and_resumed_counts_every_round_once(amqtt_broker, tmp_path):
    cfg = coord_cfg(tmp_path, min_clients=2, rounds=4)
    run_dir = tmp_path / "run"
    clients = start_clients(amqtt_broker, cfg, tmp_path, 2)
    args = [sys.executable, "-m", "fedpara.runtime.cli", "coordinator", "--broker", amqtt_broker, "--run", cfg.run_id,
            "--model", "mlp", "--scheme", "fedpara", "--ratio", "0.3", "--rounds", "4", "--min-clients", "2",
            "--test-data", "fashion-mnist,limit=400", "--lr", "0.05", "--batch-size", "32", "--deadline", "30",
            "--insecure"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        first = subprocess.Popen(args + ["--out", str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while len(read_metrics(run_dir / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
            assert first.poll() is None, "coordinator exited early"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        done_before = len(read_metrics(run_dir / "metrics.jsonl"))
        assert 2 <= done_before < 4
        second = subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "coordinator", "--broker", amqtt_broker,
                                 "--resume", str(run_dir)], env=env, capture_output=True, timeout=120)
        assert second.returncode == 0, second.stderr.decode()[-2000:]
    finally:
        stop_all(clients)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_pfedpara_never_publishes_local_factors(amqtt_broker, tmp_path):
    import fedpara
    from fedpara.runtime.checkpoint import load_checkpoint

    cfg = coord_cfg(tmp_path, scheme="pfedpara", ratio=0.5, min_clients=2, rounds=2)
    sniffer = Sniffer(amqtt_broker, cfg.run_id)
    clients = start_clients(amqtt_broker, cfg, tmp_path, 2, export_on_finish=True)
    try:
        summary = run_coordinator(cfg, amqtt_broker)
        assert all(c.wait(120) for c in clients)  # each exports its personalised model, then exits
    finally:
        stop_all(clients)
        sniffer.stop()
    assert summary["status"] == "completed"
    model = cfg.spec.build()
    local, global_ = set(fedpara.local_state(model)), set(fedpara.global_state(model))
    assert local  # x2, y2 and biases
    carried = sniffer.decoded()
    kinds = [m.kind for _, m in carried if "report" not in m.meta]
    assert kinds.count(MessageKind.UPDATE) == 4 and kinds.count(MessageKind.TASK) >= 2
    reports = [m for _, m in carried if "report" in m.meta]  # local evaluations, sent after each update
    assert len(reports) == 4 and all(not m.tensors and m.kind == MessageKind.UPDATE for m in reports)
    for topic, msg in carried:
        if "report" in msg.meta:
            continue
        assert set(msg.tensors) == global_, topic
        assert not set(msg.tensors) & local
    # the local halves persist on each device, and differ between devices
    states = [load_checkpoint(tmp_path / f"state-c{i}" / "local.safetensors")[0] for i in range(2)]
    assert set(states[0]) == local
    assert any(not (states[0][k] == states[1][k]).all() for k in local)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert "global_accuracy" in rows[-1] and rows[-1]["accuracy"] > 0.3  # personalised accuracy
    # the exported ONNX model is the personalised one: it matches this client's own torch model
    import numpy as np

    from export import OnnxModel
    onnx = OnnxModel(tmp_path / "state-c0" / "model.onnx")
    x = clients[0].trainer.test_data.tensors[0][:64]
    clients[0].trainer.model.eval()
    np.testing.assert_allclose(onnx.predict(x.numpy()), clients[0].trainer.model(x).detach().numpy(), atol=1e-4)
    assert onnx.metadata["scheme"] == "pfedpara" and (tmp_path / "state-c1" / "model.int8.onnx").exists()


def test_client_pool_runs_many_logical_clients(mosquitto_broker, tmp_path):
    from edge_client.pool import ClientPool, pool_configs

    cfg = coord_cfg(tmp_path, min_clients=6, clients_per_round=4, rounds=2)
    base = ClientConfig(client_id="pool", run_id=cfg.run_id, data="fashion-mnist,partition=shards:2,clients=6,limit=100",
                        state_dir=str(tmp_path / "pool"), energy="off", eval_local=False, insecure=True)
    configs = pool_configs(base, 6)
    assert [c.client_id for c in configs][:2] == ["pool-000", "pool-001"]
    pool = ClientPool(configs, parse_broker_url(mosquitto_broker))
    pool.start()
    try:
        summary = run_coordinator(cfg, mosquitto_broker)
    finally:
        pool.stop()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed"
    for r in rows:
        assert r["sampled"] == r["replied"] == 4 and r["broadcast"] is False
        # per-client task topics: only the 4 sampled clients download the factors
        assert r["bytes_down"] == 4 * (r["bytes_down"] // 4)
    assert sum(len(c.rounds_done) for c in pool.clients) == 8
    # each round's task (the same bytes on 4 topics) was decoded once and shared with 3 clients
    assert pool.shared is not None and pool.shared.hits >= 6
    with pytest.raises(ValueError, match="exceed"):
        pool_configs(base, 7)


def test_broker_restart_mid_run_everyone_reconnects(tmp_path):
    from conftest import MOSQUITTO, start_mosquitto

    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    proc, url = start_mosquitto(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    cfg = coord_cfg(tmp_path, min_clients=2, rounds=3, round_deadline_s=4.0, max_attempts=6)
    clients = start_clients(url, cfg, tmp_path, 2)
    state = {"proc": proc}

    def bounce(row):
        if row["round"] == 1:  # the broker dies and comes back on the same port 2 s later
            state["proc"].kill()
            state["proc"].wait(5)
            time.sleep(2)
            conf = tmp_path / "mosquitto.conf"
            state["proc"] = subprocess.Popen([MOSQUITTO, "-c", str(conf)],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            from support import wait_for_port
            wait_for_port("127.0.0.1", port)

    try:
        summary = run_coordinator(cfg, url, on_round=bounce)
    finally:
        stop_all(clients)
        state["proc"].kill()
        state["proc"].wait(5)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["replied"] == 2 and all(r["replied"] >= 1 for r in rows)  # >= min_reply_fraction
    assert all(c.session.connects >= 2 for c in clients)  # really reconnected


def test_pfedpara_local_factors_survive_a_client_restart(tmp_path):
    import torch

    import fedpara
    from fedpara.models import ModelSpec
    from fedpara.runtime.checkpoint import save_checkpoint

    spec = ModelSpec(model="mlp", scheme="pfedpara", ratio=0.5)
    cfg = ClientConfig(client_id="pi", run_id="r", data=TRAIN.format(n=2, i=0), state_dir=str(tmp_path / "pi"),
                       energy="off", insecure=True)
    saved = {k: torch.randn_like(v) for k, v in fedpara.local_state(spec.build()).items()}
    save_checkpoint(tmp_path / "pi" / "local.safetensors", saved, spec, round=7)
    client = EdgeClient(cfg, parse_broker_url("mqtt://127.0.0.1:1"))  # never connects
    client.trainer.ensure_model(spec, seed=0)
    for k, v in fedpara.local_state(client.trainer.model).items():
        assert torch.equal(v, saved[k]), k
    # a local state saved for another model is ignored, with a warning, not a crash
    other = EdgeClient(cfg, parse_broker_url("mqtt://127.0.0.1:1"))
    other.trainer.ensure_model(ModelSpec(model="mlp", scheme="pfedpara", ratio=0.2), seed=0)
    assert other.trainer.model is not None


def test_char_lstm_on_shakespeare_roles(amqtt_broker, tmp_path):
    """The paper's LSTM setting through the runtime: FedPara gate matrices, one role group per client."""
    play = "THE TEST\n\n" + "".join(f"HAMLET.\nTo be, or not to be, that is the question {i}.\n\n"
                                    f"HORATIO.\nSo have I heard, and do in part believe it {i}.\n\n"
                                    f"OPHELIA.\nThere is rosemary, that's for remembrance {i}.\n\n" for i in range(40))
    (tmp_path / "plays").mkdir()
    (tmp_path / "plays" / "test_gut.txt").write_text(play)
    data = f"shakespeare,path={tmp_path / 'plays'}"
    cfg = coord_cfg(tmp_path, model="char_lstm", num_classes=96, min_clients=2, rounds=1,
                    test_data=f"{data},limit=200", lr=0.5)
    clients = [EdgeClient(ClientConfig(client_id=f"c{i}", run_id=cfg.run_id, data=f"{data},clients=2,index={i},limit=200",
                                       state_dir=str(tmp_path / f"s{i}"), energy="off", insecure=True), parse_broker_url(amqtt_broker))
               for i in range(2)]
    for c in clients:
        c.start()
    try:
        summary = run_coordinator(cfg, amqtt_broker)
    finally:
        stop_all(clients)
    assert summary["status"] == "completed"
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["replied"] == 2 and 0 <= row["accuracy"] <= 1
    assert any(k.startswith("lstm.weight_ih_l0.") for k in clients[0].trainer.model.state_dict())
