"""Narrow links: a client on a narrow uplink stays live while its update is arriving, and a late
echo of its own status (behind a task on a narrow downlink) is not taken for tampering.

An update and the client's heartbeats share one MQTT connection, one TCP stream: on a narrow
uplink a heartbeat published during the upload reaches the broker only after the update's last
frame. When the upload takes longer than ``MISSED_HEARTBEATS`` heartbeat periods (a dense VGG16 at
2 Mbit/s: four minutes; measured with benchmarks/bench_link.py) the coordinator used to declare
the client gone while its update was arriving, and the round failed. The update's own frames now
count as signs of life (``ClientRegistry.touch``)."""

import threading
import time
from collections import defaultdict

import pytest
import torch
from conftest import needs_fmnist
from support import coord_cfg, run_federated

from coordinator.registry import MISSED_HEARTBEATS, ClientRegistry
from fedpara.runtime.messages import Status
from fedpara.runtime.mqtt import MqttSession

torch.set_num_threads(1)
HEARTBEAT_S = 1.0
UPLINK_BYTES_PER_S = 60_000  # an mlp update (342 KB in fp32) takes ~6 s: twice the 3 s the heartbeat allows


@pytest.fixture
def narrow_uplinks(monkeypatch):
    """Every client session publishes through its own serial link of UPLINK_BYTES_PER_S: the frames
    of an update leave one after another at that rate, and a status published meanwhile waits
    until the last of them has left, as it would behind them in a TCP stream. The coordinator's
    publishes are not slowed."""
    honest_publish = MqttSession.publish
    links: dict[str, threading.RLock] = defaultdict(threading.RLock)
    creating = threading.Lock()
    slowed = []

    def link(session) -> threading.RLock:
        with creating:
            return links[session.client_id]

    def is_client(session) -> bool:
        return session.client_id.startswith("fp-")

    def publish(self, topic, payload, qos=1, retain=False):
        if not is_client(self):
            return honest_publish(self, topic, payload, qos, retain)
        with link(self):
            return honest_publish(self, topic, payload, qos, retain)

    def publish_all(self, topic, frames, qos=1, timeout=120.0):
        if not is_client(self):
            return honest_publish_all(self, topic, frames, qos, timeout)
        infos = []
        with link(self):  # the link is busy until the last frame has left
            t0 = time.monotonic()
            for frame in frames:
                time.sleep(len(frame) / UPLINK_BYTES_PER_S)
                infos.append(honest_publish(self, topic, frame, qos))
            slowed.append(time.monotonic() - t0)
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        return all(info.is_published() for info in infos)

    honest_publish_all = MqttSession.publish_all
    monkeypatch.setattr(MqttSession, "publish", publish)
    monkeypatch.setattr(MqttSession, "publish_all", publish_all)
    return slowed


@needs_fmnist
def test_a_client_whose_update_outlasts_its_heartbeats_is_not_given_up(amqtt_broker, tmp_path, narrow_uplinks):
    cfg = coord_cfg(tmp_path, rounds=2, min_clients=2, max_packet=16_384, round_deadline_s=60.0)
    summary, rows, _ = run_federated(amqtt_broker, cfg, tmp_path, 2, heartbeat_s=HEARTBEAT_S, energy="off")
    assert summary["status"] == "completed" and [r["replied"] for r in rows] == [2, 2], (summary, rows)
    # the uplink really was narrow: every update took longer than the heartbeats allow
    uploads = [s for s in narrow_uplinks if s > 1.0]
    assert len(uploads) >= 4 and min(uploads) > MISSED_HEARTBEATS * HEARTBEAT_S, narrow_uplinks


def test_frames_keep_a_client_live_but_not_an_offline_one():
    now = [0.0]
    reg = ClientRegistry(clock=lambda: now[0])
    reg.update("c0", Status("online", 10, "cpu", heartbeat_s=1.0))
    reg.update("c1", Status("online", 10, "cpu", heartbeat_s=1.0))
    now[0] = MISSED_HEARTBEATS * 1.0 + 0.5
    assert reg.live() == []
    reg.touch("c0")
    assert reg.live() == ["c0"] and reg.get("c0").last_seen == now[0]
    reg.update("c1", Status("offline"))
    reg.touch("c1")  # a frame after its last will: still offline
    reg.touch("stranger")  # never announced: not invented
    assert reg.live() == ["c0"] and reg.get("stranger") is None


def test_a_late_echo_of_our_own_status_is_not_a_strangers(tmp_path):
    """On a narrow downlink the broker's echo of a heartbeat arrives behind the task, after newer
    heartbeats went out: it is ours, not a replacement to answer (it used to be re-asserted at up to
    once a second, and counted as `status_reasserted`, the counter of a stranger's tampering)."""
    from edge_client.client import EdgeClient
    from edge_client.config import ClientConfig
    from fedpara.runtime.mqtt import parse_broker_url

    class Session:
        connects = 1

        def __init__(self):
            self.sent = []

        def publish(self, topic, payload, qos=1, retain=False):
            self.sent.append(payload)

    from fedpara.runtime.signing import new_key

    for name, folder in (("coordinator", tmp_path), ("c0", tmp_path / "clients")):
        new_key(name, folder)
    client = EdgeClient(ClientConfig(client_id="c0", run_id="echo", data="synthetic,n=64", energy="off",
                                     state_dir=str(tmp_path / "s"), key=str(tmp_path / "clients"),
                                     coordinator_pub=str(tmp_path / "coordinator.pub")),
                        parse_broker_url("mqtt://127.0.0.1:1"))  # never connects; signed: each status differs
    client.session = Session()
    for _ in range(5):  # heartbeats while the task downloads
        client._announce(client.session)
    oldest, topic = client.session.sent[0], client.topics.status("c0")
    assert len({bytes(s) for s in client.session.sent}) == 5  # signed: each heartbeat has its own seq
    client._handle(topic, oldest)  # its echo, late
    assert client.counters["status_reasserted"] == 0 and len(client.session.sent) == 5
    client._handle(topic, b"")  # a stranger cleared it: say again who we are
    assert client.counters["status_reasserted"] == 1 and len(client.session.sent) == 6
