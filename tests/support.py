"""Helpers shared by the tests and the benchmarks: a Mosquitto launcher and port helpers.

Benchmarks import this file by path (``sys.path`` gets ``tests/``); it imports nothing from pytest.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

from coordinator.broker import free_port, wait_for_port
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.topics import Topics
from fedpara.wire import Message, Reassembler, WireError, decode

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)

__all__ = ["MOSQUITTO", "TRAIN", "Sniffer", "coord_cfg", "free_port", "mosquitto_conf", "start_clients",
           "start_mosquitto", "wait_for_port"]


def mosquitto_conf(work: Path, port: int, extra: str = "", *, host: str | None = "127.0.0.1",
                   anonymous: bool = True) -> Path:
    """Write WORK/mosquitto.conf: one listener (on ``host``, or every address when None), no
    persistence, a log file in WORK; as root it stays root so that it can read files in WORK."""
    user = "user root\n" if os.geteuid() == 0 else ""
    listener = f"listener {port} {host}" if host else f"listener {port}"
    conf = Path(work) / "mosquitto.conf"
    conf.write_text(f"{listener}\nallow_anonymous {'true' if anonymous else 'false'}\npersistence false\n"
                    f"{user}log_dest file {Path(work) / 'mosquitto.log'}\n{extra}")
    return conf


def start_mosquitto(work: Path, extra: str = "", *, anonymous: bool = True) -> tuple[subprocess.Popen, str]:
    """Mosquitto on a free loopback port with its config in ``work``; returns (process, url)."""
    if MOSQUITTO is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = mosquitto_conf(work, port, extra, anonymous=anonymous)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port, timeout=10)
    except TimeoutError:
        proc.kill()
        raise
    return proc, f"mqtt://127.0.0.1:{port}"


class Sniffer:
    """A separate MQTT connection that records every message of a run (what the broker carried)."""

    def __init__(self, url: str, run_id: str) -> None:
        b = parse_broker_url(url)
        self.messages: list[tuple[str, bytes]] = []
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sniff-{secrets.token_hex(3)}")
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(f"{Topics(run_id).base}/#", 1), ready.set())
        self.client.connect(b.host, b.port)
        self.client.loop_start()
        assert ready.wait(10)
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes) -> None:
        """QoS 1 publish; on a busy machine the broker may drop us: wait for paho's reconnect."""
        deadline = time.monotonic() + 20
        while True:
            info = self.client.publish(topic, payload, qos=1)
            if info.rc == 0 or time.monotonic() > deadline:
                info.wait_for_publish(10)
                return
            time.sleep(0.2)

    def decoded(self) -> list[tuple[str, Message]]:
        out, reasm = [], Reassembler()
        for topic, payload in self.messages:
            if "/task" in topic or "/update/" in topic:
                try:
                    data = reasm.add(payload)
                except WireError:
                    continue
                if data is not None:
                    out.append((topic, decode(data)))
        return out

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- small federated runs for the runtime tests ------------------------------------------
TRAIN = "fashion-mnist,partition=iid,clients={n},index={i},limit=150"


def coord_cfg(tmp_path, **kw):
    """An insecure mlp run of 2 rounds on Fashion-MNIST for 3 clients; ``kw`` overrides."""
    from coordinator.config import CoordinatorConfig

    base = dict(run_id=f"t-{secrets.token_hex(3)}", model="mlp", scheme="fedpara", ratio=0.3, rounds=2,
                min_clients=3, test_data="fashion-mnist,limit=400", out=str(tmp_path / "run"),
                round_deadline_s=30.0, wait_clients_s=60.0, lr=0.05, batch_size=32, insecure=True)
    base.update(kw)
    return CoordinatorConfig(**base)


def start_clients(url, cfg, tmp_path, n, *, first=0, total=None, **kw):
    """``n`` started in-process edge clients c<first>.. of ``total`` IID partitions."""
    from edge_client.client import EdgeClient
    from edge_client.config import ClientConfig

    total = total or n
    broker = parse_broker_url(url) if isinstance(url, str) else url
    kw.setdefault("energy", "estimate")
    kw.setdefault("insecure", True)
    clients = []
    for i in range(first, first + n):
        c = EdgeClient(ClientConfig(client_id=f"c{i}", run_id=cfg.run_id, data=TRAIN.format(n=total, i=i),
                                    state_dir=str(tmp_path / f"state-c{i}"), **kw), broker)
        c.start()
        clients.append(c)
    return clients
