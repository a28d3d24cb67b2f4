"""The fleet's password file and ACL on a real Mosquitto: an impostor's publish on another client's
topic never reaches the coordinator, a client cannot read another's updates or tasks, and a
signed run works through it end to end."""
from __future__ import annotations

import base64
import hashlib
import secrets
import subprocess
import sys
import threading

import paho.mqtt.client as mqtt
import pytest
from conftest import needs_fmnist
from support import MOSQUITTO, start_mosquitto, wait_until

from coordinator.config import CoordinatorConfig
from coordinator.broker_acl import password_hash, write_fleet
from coordinator.server import Coordinator
from edge_client.client import EdgeClient
from edge_client.config import ClientConfig
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.signing import new_key
from fedpara.runtime.topics import Topics

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")


def test_password_hash_is_mosquitto_format():
    h = password_hash("s3cret", salt=b"0123456789ab", iterations=101)
    _, v, it, salt, digest = h.split("$")
    assert (v, it, base64.b64decode(salt)) == ("7", "101", b"0123456789ab")
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac("sha512", b"s3cret", b"0123456789ab", 101)


class Peer:
    def __init__(self, url: str, user: str, password: str, subscribe: list[str] = ()) -> None:
        b = parse_broker_url(url)
        self.got: list[tuple[str, bytes]] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{secrets.token_hex(3)}")
        self.c.username_pw_set(user, password)
        ready, self.rc, acked = threading.Event(), None, []

        def on_connect(cl, u, f, rc, p):
            self.rc = rc
            for t in subscribe:
                cl.subscribe(t, 1)
            ready.set()
        self.c.on_connect = on_connect
        self.c.on_subscribe = lambda cl, u, mid, codes, p: acked.append(mid)
        self.c.on_message = lambda cl, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.connect(b.host, b.port)
        self.c.loop_start()
        assert ready.wait(10) and not self.rc.is_failure, self.rc
        wait_until(lambda: len(acked) >= len(subscribe), what=f"{user}'s subscriptions")

    def pub(self, topic: str, payload: bytes = b"x") -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def fleet_broker(tmp_path):
    users = write_fleet(tmp_path / "fleet", ["c0", "c1"])
    proc, url = start_mosquitto(tmp_path, f"password_file {tmp_path / 'fleet' / 'passwd'}\n"
                                          f"acl_file {tmp_path / 'fleet' / 'acl'}\n", anonymous=False)
    yield url, users
    proc.terminate()
    proc.wait(5)


def test_the_acl_keeps_devices_in_their_lanes(fleet_broker):
    url, pw = fleet_broker
    t = Topics("r1")
    coord = Peer(url, "coordinator", pw["coordinator"], [t.update_all, t.status_all])
    c0 = Peer(url, "c0", pw["c0"], [t.task, t.task_for("c0")])
    c1 = Peer(url, "c1", pw["c1"], [t.update("c0"), t.task_for("c0"), t.status("c0")])
    try:
        c1.pub(t.update("c0"), b"impostor")   # on another client's topic: dropped by the broker
        c1.pub(t.status("c0"), b"impostor")
        c1.pub(t.task, b"forged task")        # only the coordinator publishes tasks
        c1.pub(t.update("c1"), b"own update")  # its own lane: delivered
        c0.pub(t.update("c0"), b"c0's update")
        coord.pub(t.task_for("c0"), b"c0's task")
        coord.pub(t.task, b"fan-out task")
        # the last publishes have arrived; the refused ones, published before them, never will
        wait_until(lambda: len(coord.got) >= 2 and len(c0.got) >= 2, what="the allowed messages")
        assert sorted(p for _, p in coord.got) == [b"c0's update", b"own update"]
        assert c1.got == []  # neither c0's update nor c0's task nor c0's status
        assert sorted(p for _, p in c0.got) == [b"c0's task", b"fan-out task"]
        with pytest.raises(AssertionError):  # wrong password: refused
            Peer(url, "c0", "guess")
    finally:
        for p in (coord, c0, c1):
            p.stop()


@needs_fmnist
def test_a_signed_run_through_the_acl(fleet_broker, tmp_path):
    url, pw = fleet_broker
    keys = tmp_path / "keys"
    new_key("coordinator", keys)
    for c in ("c0", "c1"):
        new_key(c, keys / "clients")
    run_id = f"acl-{secrets.token_hex(2)}"
    cfg = CoordinatorConfig(run_id=run_id, model="mlp", ratio=0.3, rounds=2, min_clients=2,
                            test_data="fashion-mnist,limit=200", out=str(tmp_path / "run"), round_deadline_s=30.0,
                            lr=0.05, batch_size=32, coordinator_key=str(keys / "coordinator.key"),
                            trusted_keys=str(keys / "clients"))
    clients = [EdgeClient(ClientConfig(client_id=c, run_id=run_id, energy="off", state_dir=str(tmp_path / c),
                                       data=f"fashion-mnist,partition=iid,clients=2,index={i},limit=100",
                                       key=str(keys / "clients"), coordinator_pub=str(keys / "coordinator.pub")),
                          parse_broker_url(url, username=c, password=pw[c])) for i, c in enumerate(("c0", "c1"))]
    for c in clients:
        c.start()
    try:
        summary = Coordinator(cfg, parse_broker_url(url, username="coordinator", password=pw["coordinator"])).run()
    finally:
        for c in clients:
            c.stop()
    assert summary["status"] == "completed" and all(c.rounds_done == [1, 2] for c in clients)


def test_the_command_writes_private_credentials(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "broker-acl", "pi-1", "pi-2", "--out", str(tmp_path / "f"),
                        "--run", "farm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f" / "passwd").stat().st_mode & 0o077 == 0
    assert "FEDPARA_MQTT_USERNAME=pi-1" in (tmp_path / "f" / "credentials" / "pi-1.env").read_text()
    assert "pattern write fedpara/v1/farm/update/%u" in (tmp_path / "f" / "acl").read_text()
