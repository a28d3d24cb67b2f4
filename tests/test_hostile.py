"""Hostile input, round three (docs/security.md): what a stranger with broker access and a
compromised device holding a trusted key can still try against a signed run on a real Mosquitto,
and what each attempt now costs: re-send floods, failing devices, replayed finishes and wills,
chunk floods that try to evict a genuine message, and the weaker ways to lose a run."""
from __future__ import annotations

import secrets
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from conftest import needs_fmnist

from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from edge_client.client import EdgeClient
from edge_client.config import ClientConfig
from fedpara.runtime.messages import Status
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import RunDir
from fedpara.runtime.signing import Signer, load_private_key, new_key
from fedpara.runtime.topics import Topics
from fedpara.wire import Message, MessageKind

TRAIN = "fashion-mnist,partition=iid,clients=3,index={i},limit=150"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("coordinator", "c0", "c1", "c2"):
        new_key(name, d / ("clients" if name != "coordinator" else ""))
    return d


def _cfg(keys, out, run_id, **kw):
    base = dict(run_id=run_id, model="mlp", scheme="fedpara", ratio=0.3, rounds=2, min_clients=3,
                test_data="fashion-mnist,limit=300", out=str(out / "run"), round_deadline_s=30.0,
                wait_clients_s=60.0, lr=0.05, batch_size=32, coordinator_key=str(keys / "coordinator.key"),
                trusted_keys=str(keys / "clients"))
    return CoordinatorConfig(**{**base, **kw})


def _client(url, keys, out, run_id, i, **kw):
    return EdgeClient(ClientConfig(client_id=f"c{i}", run_id=run_id, data=TRAIN.format(i=i), energy="off",
                                   state_dir=str(out / f"s{i}"), key=str(keys / "clients"),
                                   coordinator_pub=str(keys / "coordinator.pub"), **kw), parse_broker_url(url))


def _raw(url: str, subscribe: str | None = None) -> tuple[mqtt.Client, list]:
    b, seen = parse_broker_url(url), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{secrets.token_hex(3)}")
    ready = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(subscribe, 1) if subscribe else None, ready.set())
    c.on_message = lambda cl, u, m: seen.append((m.topic, bytes(m.payload), time.monotonic()))
    c.connect(b.host, b.port)
    c.loop_start()
    assert ready.wait(10)
    return c, seen


@needs_fmnist
def test_a_status_flood_claiming_reconnects_costs_o1_resends(mosquitto_broker, keys, tmp_path):
    """A compromised c2 (its own key) never answers its task and publishes hundreds of signed
    statuses, each claiming one more reconnect. Each round the coordinator sends c2 its task at
    most 1 + 2 times (ResendLimiter), whatever the number of statuses."""
    run_id = f"resend-{secrets.token_hex(2)}"
    cfg = _cfg(keys, tmp_path, run_id, round_deadline_s=6.0, min_reply_fraction=0.5)
    topics = Topics(run_id)
    spy, seen = _raw(mosquitto_broker, topics.task_for("c2"))
    evil = Signer(load_private_key(keys / "clients" / "c2.key"), "c2")
    flood, halt = _raw(mosquitto_broker)[0], threading.Event()
    sent = [0]

    def statuses():
        session = evil.next_seq()
        while not halt.is_set():
            sent[0] += 1
            meta = Status("online", 150, "cpu", heartbeat_s=0, session=session, connection=sent[0]).to_meta()
            flood.publish(topics.status("c2"), evil.seal(Message(MessageKind.STATUS, run_id, 0, "c2", meta=meta)).data,
                          qos=1, retain=True)
            time.sleep(0.01)

    honest = [_client(mosquitto_broker, keys, tmp_path, run_id, i) for i in (0, 1)]
    for c in honest:
        c.start()
    t = threading.Thread(target=statuses, daemon=True)
    t.start()
    try:
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker)).run()
    finally:
        halt.set()
        t.join(5)
        for c in honest:
            c.stop()
        for cl in (spy, flood):
            cl.loop_stop()
            cl.disconnect()
    rows = RunDir(cfg.out).read_metrics()
    assert summary["status"] == "completed" and all(r["clients"] == ["c0", "c1"] for r in rows)
    assert sent[0] > 200
    ids = {payload[6:22] for _, payload, _ in seen}  # chunk message ids: one per task sent to c2 alone
    assert len(ids) <= 2 * 2, len(ids)  # 2 rounds x at most 2 re-sends (the first task was a broadcast)
    assert summary["ignored"].get("resend_limited", 0) > 50, summary["ignored"]
