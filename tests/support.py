"""Helpers shared by the tests and the benchmarks: a Mosquitto launcher and port helpers.

Benchmarks import this file by path (``sys.path`` gets ``tests/``); it imports nothing from pytest.
"""
from __future__ import annotations

import os
import re
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

__all__ = ["MOSQUITTO", "TRAIN", "Sniffer", "coord_cfg", "free_port", "mosquitto_conf", "publish_bytes_by_peer",
           "rss_mb", "run_federated", "start_bridged_brokers", "start_clients", "start_mosquitto", "wait_for_port",
           "wait_until"]


def wait_until(condition, timeout: float = 10.0, *, interval: float = 0.01, what: str = "the condition"):
    """Poll ``condition()`` until it returns something true (returned) or ``timeout`` seconds pass
    (AssertionError naming ``what``). Tests wait for what they need, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


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


def start_clients(url, cfg, tmp_path, n, *, first=0, total=None, before_start=None, **kw):
    """``n`` started in-process edge clients c<first>.. of ``total`` IID partitions;
    ``before_start(client)``, if given, may adjust each one before it connects."""
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
        if before_start is not None:
            before_start(c)
        c.start()
        clients.append(c)
    return clients


def run_federated(url, cfg, tmp_path, n, **client_kw):
    """Start ``n`` in-process clients (``start_clients``), run the coordinator of ``cfg`` to its end,
    stop the clients: (summary, metrics.jsonl rows, clients)."""
    from coordinator.server import Coordinator
    from fedpara.runtime.rundir import RunDir

    clients = start_clients(url, cfg, tmp_path, n, **client_kw)
    try:
        summary = Coordinator(cfg, parse_broker_url(url) if isinstance(url, str) else url).run()
    finally:
        for c in clients:
            c.stop()
    return summary, RunDir(cfg.out).read_metrics(), clients


_LOG_PUBLISH = re.compile(r"^\d+: (Received|Sending) PUBLISH (?:from|to) (\S+) \(d\d, q\d, r\d, m\d+, '(.*)', \.\.\. "
                          r"\((\d+) bytes\)\)$")


def publish_bytes_by_peer(log_text: str) -> dict[str, dict[str, dict[str, int]]]:
    """From a Mosquitto ``log_type all`` log: PUBLISH payload bytes per direction ("rx": the broker
    received, "tx": it sent), per peer (MQTT client id, bridges included) and per topic."""
    out: dict[str, dict[str, dict[str, int]]] = {"rx": {}, "tx": {}}
    for line in log_text.splitlines():
        m = _LOG_PUBLISH.match(line)
        if m:
            per = out["rx" if m[1] == "Received" else "tx"].setdefault(m[2], {})
            per[m[3]] = per.get(m[3], 0) + int(m[4])
    return out


def start_bridged_brokers(work: Path, bridge_id: str = "site-bridge"):
    """A central and a site Mosquitto (``log_type all``), the site bridging ``fedpara/v1/#`` both
    ways to the central one as MQTT client ``bridge_id``. Returns ((central proc, port), (site
    proc, port)) once the bridge is connected."""
    def start(sub: str, extra: str):
        (work / sub).mkdir(parents=True, exist_ok=True)
        port = free_port()
        conf = mosquitto_conf(work / sub, port, "log_type all\n" + extra)
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port, timeout=10)
        return proc, port

    central = start("central", "")
    site = start("site", f"connection central\naddress 127.0.0.1:{central[1]}\nremote_clientid {bridge_id}\n"
                         "topic fedpara/v1/# both 1\ncleansession true\ntry_private true\nnotifications false\n"
                         "bridge_protocol_version mqttv311\nstart_type automatic\n")
    deadline = time.monotonic() + 15
    while f"as {bridge_id}" not in (work / "central" / "mosquitto.log").read_text():
        if time.monotonic() > deadline:
            for proc, _ in (site, central):
                proc.kill()
            raise TimeoutError("the site broker's bridge did not connect to the central broker")
        time.sleep(0.1)
    return central, site


def rss_mb(pid: int | str = "self") -> float | None:
    """Resident memory of a process in MB (Linux /proc), None when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
