"""Memory and liveness on a real Mosquitto: a flooding insider, chunks injected across topics, and a
client that dies while the broker is down (its last will is lost: its heartbeat decides)."""
from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
from conftest import needs_fmnist
from support import MOSQUITTO, coord_cfg, start_clients, start_mosquitto, wait_for_port

from coordinator.events import RoundCompleted
from coordinator.server import Coordinator
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import RunDir
from fedpara.runtime.topics import Topics

pytestmark = needs_fmnist
def _clients(url, cfg, tmp_path, n, **kw):
    return start_clients(url, cfg, tmp_path, n, energy="off", **kw)


def _raw(url: str, on_message=None, subscribe: str | None = None) -> mqtt.Client:
    b = parse_broker_url(url)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{secrets.token_hex(3)}")
    ready = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe(subscribe, 1) if subscribe else None, ready.set())
    if on_message:
        c.on_message = on_message
    c.connect(b.host, b.port)
    c.loop_start()
    assert ready.wait(10)
    return c


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_a_flooding_insider_costs_bounded_memory(mosquitto_broker, tmp_path):
    """c2 floods its own update topic with 2 MB messages (what the per-client ACL allows) for the
    whole run; the coordinator's memory stays bounded and the honest clients' rounds complete."""
    cfg = coord_cfg(tmp_path, min_clients=2)
    clients = _clients(mosquitto_broker, cfg, tmp_path, 2)
    b = parse_broker_url(mosquitto_broker)
    flood = (  # the attacker is its own process: its send queue is not our memory
        "import os, sys, time, paho.mqtt.client as m\n"
        "c = m.Client(m.CallbackAPIVersion.VERSION2, client_id='flood')\n"
        f"c.connect({b.host!r}, {b.port}); c.loop_start(); blob = os.urandom(2_000_000)\n"
        "for i in range(400):\n"
        f"    c.publish({Topics(cfg.run_id).update('c2')!r}, blob, qos=1).wait_for_publish(30)\n"
        "    print(i + 1, flush=True)\n")
    peak = [0.0]

    def watch(event):
        peak[0] = max(peak[0], _rss_mb())
        pending[0] = max(pending[0], coordinator.session.inbox.pending_bytes())

    pending = [0]
    coordinator = Coordinator(cfg, parse_broker_url(mosquitto_broker), on_event=watch)  # test data loaded
    before = peak[0] = _rss_mb()
    log = open(tmp_path / "flood.log", "w")
    flooder = subprocess.Popen([sys.executable, "-c", flood], stdout=log, stderr=subprocess.STDOUT)
    try:
        summary = coordinator.run()
    finally:
        flooder.kill()
        flooder.wait(10)
        for c in clients:
            c.stop()
    lines = (tmp_path / "flood.log").read_text().split()
    sent = [int(lines[-1]) if lines else 0]
    rows = RunDir(cfg.out).read_metrics()
    assert sent[0] >= 50 and summary["status"] == "completed" and all(r["replied"] == 2 for r in rows)
    assert peak[0] - before < 300, f"RSS grew {peak[0] - before:.0f} MB during a {2 * sent[0]} MB flood"
    assert pending[0] <= coordinator.session.inbox.total_bytes


def test_chunks_injected_on_another_topic_do_not_void_an_update(mosquitto_broker, tmp_path):
    """c2 reads c0's update chunks and re-publishes each, altered, with c0's message id on its own
    topic: per-sender reassembly keeps c0's multi-chunk updates intact."""
    cfg = coord_cfg(tmp_path, min_clients=2, max_packet=4096)
    topics = Topics(cfg.run_id)
    injected = [0]
    spy = None

    def forge(cl, u, m):
        chunk = bytearray(m.payload)
        chunk[-1] ^= 0xFF  # same header and message id, different bytes
        cl.publish(topics.update("c2"), bytes(chunk), qos=1)
        injected[0] += 1

    spy = _raw(mosquitto_broker, forge, topics.update("c0"))
    clients = _clients(mosquitto_broker, cfg, tmp_path, 2)
    try:
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker)).run()
    finally:
        spy.loop_stop()
        spy.disconnect()
        for c in clients:
            c.stop()
    rows = RunDir(cfg.out).read_metrics()
    assert injected[0] > 4
    assert summary["status"] == "completed" and all(r["clients"] == ["c0", "c1"] for r in rows)


def test_a_client_that_dies_while_the_broker_is_down_leaves_the_live_set(tmp_path):
    """Broker SIGKILLed, a client dies meanwhile (no last will reaches anyone), broker back: the
    next round does not wait for the dead client's deadline: its heartbeats stopped."""
    if MOSQUITTO is None:
        import pytest
        pytest.skip("mosquitto is not installed")
    proc, url = start_mosquitto(tmp_path)
    port = int(url.rsplit(":", 1)[1])
    cfg = coord_cfg(tmp_path, rounds=3, min_clients=2, round_deadline_s=40.0, max_attempts=3)
    clients = _clients(url, cfg, tmp_path, 3, heartbeat_s=1.0)
    state = {"proc": proc}

    def bounce(event):
        if isinstance(event, RoundCompleted) and event.round == 1:
            state["proc"].kill()
            state["proc"].wait(5)
            dead = clients[2]
            dead.finished.set()  # stops its heartbeat; its session goes without a word
            dead.session.stop(graceful=False)
            time.sleep(1)
            state["proc"] = subprocess.Popen([MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port("127.0.0.1", port)

    try:
        summary = Coordinator(cfg, parse_broker_url(url), on_event=bounce).run()
    finally:
        for c in clients:
            c.stop()
        state["proc"].kill()
        state["proc"].wait(5)
    rows = RunDir(cfg.out).read_metrics()
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2, 3]
    # round 2 was under way when round 1's line was written (the pipeline) and c2 may have answered
    # it before dying; neither round waits for the 40 s deadline, and round 3 goes on without c2
    assert rows[1]["duration_s"] < 30 and rows[2]["duration_s"] < 30
    assert "c2" not in rows[2]["clients"]
