"""Byte accounting end to end: TCP_INFO socket counters, and the coordinator's MQTT byte
totals (metrics.jsonl) against a real Mosquitto's ``$SYS/broker/bytes/*`` counters.

How the allowance is derived (docs/bandwidth.md, "Agreement with the broker"):

    broker received = one copy of the task PUBLISH packets (mqtt_bytes_down / receivers)
                    + the clients' update PUBLISH packets (mqtt_bytes_up)
                    + control traffic R  (CONNECT, SUBSCRIBE, PUBACK, retained status, DISCONNECT...)
    broker sent     = task deliveries (mqtt_bytes_down) + update deliveries (mqtt_bytes_up)
                    + $SYS messages to our own monitor (counted exactly on the monitor)
                    + control traffic S  (CONNACK, SUBACK, PUBACK, status deliveries, finish...)

R and S must be >= 0 and small (a few KB, < 5 % of the payload). Then R and S are explained
exactly: every packet of the run is sized from Mosquitto's debug log (``log_type all``) with the
MQTT 3.1.1 formulas; the broker's received count must match to the byte, its sent count up to the
$SYS messages at the two window edges (Mosquitto does not log $SYS publishes).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import MOSQUITTO, needs_fmnist, start_mosquitto

from fedpara.runtime.netstats import tcp_bytes, tcp_counters, wait_acked
from fedpara.wire.accounting import mqtt_publish_bytes

ROOT = Path(__file__).resolve().parents[1]
FEDPARA = [sys.executable, "-m", "fedpara.runtime.cli"] if not (Path(sys.executable).parent / "fedpara").exists() \
    else [str(Path(sys.executable).parent / "fedpara")]


# --- TCP_INFO --------------------------------------------------------------------------------
def _pair():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    return srv, cli, acc


def _recv_exact(sock, n):
    got = 0
    while got < n:
        chunk = sock.recv(min(1 << 20, n - got))
        assert chunk
        got += len(chunk)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO byte counters are Linux only")
def test_tcp_bytes_loopback_pair():
    srv, cli, acc = _pair()
    try:
        # the connecting side counts its SYN as one acknowledged byte; the accepting side does not
        assert tcp_bytes(cli) == (1, 0)
        assert tcp_bytes(acc) == (0, 0)
        n_up, n_down = 1_234_567, 54_321
        cli.sendall(os.urandom(n_up))
        _recv_exact(acc, n_up)
        acc.sendall(b"y" * n_down)
        _recv_exact(cli, n_down)
        assert wait_acked(cli) and wait_acked(acc)
        assert tcp_bytes(cli) == (n_up + 1, n_down)
        assert tcp_bytes(acc) == (n_down, n_up)
        c = tcp_counters(cli)
        assert c.state == 1 and c.info_len >= 136
        if c.bytes_sent is not None:  # Linux >= 4.19
            assert c.bytes_sent - (c.bytes_retrans or 0) == n_up
    finally:
        for s in (cli, acc, srv):
            s.close()


def test_tcp_bytes_unavailable():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    closed = socket.socket()
    closed.close()
    try:
        assert tcp_bytes(udp) is None
        assert tcp_bytes(srv) is None  # listening, not connected
        assert tcp_bytes(closed) is None
        assert tcp_bytes(None) is None
    finally:
        udp.close()
        srv.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO byte counters are Linux only")
def test_tcp_bytes_nonlinux(monkeypatch):
    import fedpara.runtime.netstats as ns

    srv, cli, acc = _pair()
    try:
        monkeypatch.setattr(ns.sys, "platform", "darwin")
        assert ns.tcp_bytes(cli) is None
    finally:
        for s in (cli, acc, srv):
            s.close()


# --- Mosquitto $SYS counters vs the coordinator's metrics --------------------------------------
class SysMonitor:
    """A second MQTT connection that records $SYS/broker/bytes/* and counts its own $SYS bytes."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.values: dict[str, str] = {}
        self.updates: dict[str, int] = {}
        self.sys_bytes = 0  # PUBLISH bytes the broker sent to this monitor (QoS 0)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sysmon-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe([("$SYS/broker/bytes/+", 0),
                                                            ("$SYS/broker/load/bytes/+/+", 0)])
        self.client.connect("127.0.0.1", port, keepalive=120)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.sys_bytes += mqtt_publish_bytes(msg.topic, len(msg.payload), qos=0)
            self.values[msg.topic] = msg.payload.decode()
            self.updates[msg.topic] = self.updates.get(msg.topic, 0) + 1

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return (int(self.values.get("$SYS/broker/bytes/received", -1)),
                    int(self.values.get("$SYS/broker/bytes/sent", -1)), self.sys_bytes)

    def settled(self, timeout: float = 15.0) -> tuple[int, int, int]:
        """Counters after the broker's received count has stayed put for two $SYS intervals."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            snap = self.snapshot()
            if snap[0] >= 0 and snap[1] >= 0:
                if last is None or snap[0] != last[0]:
                    last, since = snap, time.monotonic()
                elif time.monotonic() - since > 2.5:
                    return self.snapshot()
            time.sleep(0.1)
        raise TimeoutError(f"$SYS byte counters did not settle: {self.values}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_LOG_PUB = re.compile(r"^\d+: (Received|Sending) PUBLISH (?:from|to) (\S+) \(d\d, q(\d), r\d, m\d+, '(.*)', \.\.\. \((\d+) bytes\)\)$")
_LOG_CONN = re.compile(r"^\d+: New client connected from \S+ as (\S+) \(p(\d), c\d, k\d+\)\.$")
_LOG_WILL = re.compile(r"^\d+: Will message specified \((\d+) bytes\)")


def _varint(n: int) -> int:
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4


def mqtt_bytes_from_log(log_text: str, skip_clients: tuple[str, ...] = ()) -> dict[str, int]:
    """Every MQTT packet Mosquitto (``log_type all``) logged, sized exactly (MQTT 3.1.1, sec. 3).

    Returns {"rx": bytes the broker read, "tx": bytes it wrote, "<packet>_rx/_tx": per type}.
    Not logged by Mosquitto 2.0: $SYS publishes to subscribers (count them on the subscriber).
    """
    out: dict[str, int] = {}

    def add(direction: str, kind: str, n: int) -> None:
        out[direction] = out.get(direction, 0) + n
        out[f"{kind}_{direction}"] = out.get(f"{kind}_{direction}", 0) + n

    lines = log_text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _LOG_CONN.match(line)
        if m and m[1] not in skip_clients:
            assert m[2] == "2", f"expected MQTT 3.1.1 (p2): {line}"
            payload = 2 + len(m[1].encode())
            w = _LOG_WILL.match(lines[i + 1]) if i + 1 < len(lines) else None
            if w:  # will: topic on the next line, after a tab
                topic = lines[i + 2].split(": \t", 1)[1]
                payload += 2 + len(topic.encode()) + 2 + int(w[1])
            remaining = 10 + payload  # "MQTT" name (2+4), level, flags, keepalive (2)
            add("rx", "connect", 1 + _varint(remaining) + remaining)
            i += 1
            continue
        m = _LOG_PUB.match(line)
        if m:
            if m[2] not in skip_clients:
                add("rx" if m[1] == "Received" else "tx", "publish",
                    mqtt_publish_bytes(m[4], int(m[5]), qos=int(m[3])))
            i += 1
            continue
        words = line.split()
        if len(words) >= 4 and words[1] in ("Received", "Sending") and words[3] in ("from", "to"):
            who = words[4] if len(words) > 4 else ""
            direction = "rx" if words[1] == "Received" else "tx"
            kind = words[2]
            if who in skip_clients:
                pass
            elif kind == "SUBSCRIBE":
                # followed by "\t<filter> (QoS n)" and "<client> n <filter>" lines, one pair per filter
                j, body = i + 1, 2  # packet id
                while j < len(lines) and (": \t" in lines[j] or lines[j].split(" ")[1:2] == [who]):
                    if ": \t" in lines[j]:
                        topic = lines[j].split(": \t", 1)[1].rsplit(" (QoS", 1)[0]
                        body += 2 + len(topic.encode()) + 1  # length, filter, requested QoS
                        out["_filters"] = out.get("_filters", 0) + 1
                    j += 1
                add(direction, "subscribe", 1 + _varint(body) + body)
            elif kind == "SUBACK":
                out["_subacks"] = out.get("_subacks", 0) + 1  # sized below from the filter count
            elif kind in ("CONNACK", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "UNSUBACK"):
                add(direction, kind.lower(), 4)
            elif kind in ("PINGREQ", "PINGRESP", "DISCONNECT"):
                add(direction, kind.lower(), 2)
        i += 1
    # every SUBSCRIBE here carries one filter (paho subscribe(topic, qos)): SUBACK = 2 + 2 + 1 bytes
    subs = out.pop("_filters", 0)
    assert subs == out.pop("_subacks", 0), "one filter per SUBSCRIBE expected"
    out["tx"] = out.get("tx", 0) + 5 * subs
    out["suback_tx"] = 5 * subs
    return out


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
@needs_fmnist
def test_metrics_bytes_agree_with_mosquitto_sys(tmp_path):
    broker, url = start_mosquitto(tmp_path, "sys_interval 1\nlog_type all\n")
    port = int(url.rsplit(":", 1)[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen] = []
    monitor = None
    try:
        monitor = SysMonitor(port)
        rx0, tx0, sys0 = monitor.settled()

        run, out = f"bw-{uuid.uuid4().hex[:8]}", tmp_path / "run"
        procs.append(subprocess.Popen(
            FEDPARA + ["coordinator", "--broker", url, "--run", run, "--rounds", "1", "--model", "mlp",
                       "--scheme", "fedpara", "--ratio", "0.1", "--test-data", "fashion-mnist,limit=500",
                       "--min-clients", "2", "--deadline", "60", "--out", str(out), "--insecure"],
            env=env, cwd=tmp_path, stdout=open(tmp_path / "coordinator.log", "w"), stderr=subprocess.STDOUT))
        for i in range(2):
            procs.append(subprocess.Popen(
                FEDPARA + ["client", "--broker", url, "--run", run, "--client-id", f"c{i}",
                           "--data", f"fashion-mnist,partition=iid,clients=2,index={i},limit=300",
                           "--energy", "estimate", "--threads", "1", "--device", "cpu",
                           "--state-dir", str(tmp_path / f"state{i}"), "--insecure"],
                env=env, cwd=tmp_path, stdout=open(tmp_path / f"client{i}.log", "w"), stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=45)
        logs = "\n".join((tmp_path / n).read_text() for n in ("coordinator.log", "client0.log", "client1.log"))
        assert [p.returncode for p in procs] == [0, 0, 0], logs

        rx1, tx1, sys1 = monitor.settled()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1 and rows[0]["replied"] == 2
        down, up, receivers = rows[0]["mqtt_bytes_down"], rows[0]["mqtt_bytes_up"], 2
        rx, tx = rx1 - rx0, tx1 - tx0

        # what the coordinator says crossed the broker as PUBLISH packets
        expect_rx = down // receivers + up          # one task copy in, updates in
        expect_tx = down + up + (sys1 - sys0)       # task fan-out, updates out, our $SYS feed
        extra_rx, extra_tx = rx - expect_rx, tx - expect_tx
        payload = down + up
        report = (f"broker rx {rx} = payload {expect_rx} + {extra_rx}; tx {tx} = payload+$SYS {expect_tx} + "
                  f"{extra_tx}; payload(down+up) {payload}")
        print(report)
        (tmp_path / "agreement.txt").write_text(report + "\n")
        # The broker can only see more than the PUBLISH packets (framing it adds), never less.
        assert extra_rx >= 0 and extra_tx >= 0, report
        # Control traffic of 3 connections over one round: a few KB at most (see module docstring).
        assert extra_rx < 8_000 and extra_tx < 8_000, report
        assert (extra_rx + extra_tx) / (2 * payload) < 0.05, report

        # Exact reconstruction: every packet of the run, sized from Mosquitto's debug log.
        log_text = (tmp_path / "mosquitto.log").read_text()
        monitor_id = monitor.client._client_id.decode()
        pk = mqtt_bytes_from_log(log_text, skip_clients=(monitor_id,))
        # the coordinator's PUBLISH totals are a subset of what the log shows
        assert pk["publish_rx"] >= expect_rx and pk["publish_tx"] >= down + up, (pk, report)
        exact = (f"log-reconstructed rx {pk['rx']} vs $SYS {rx} (diff {rx - pk['rx']}); "
                 f"tx {pk['tx']} + $SYS feed {sys1 - sys0} vs $SYS {tx} (diff {tx - pk['tx'] - (sys1 - sys0)}); "
                 f"breakdown {dict(sorted(pk.items()))}")
        print(exact)
        (tmp_path / "agreement.txt").write_text(report + "\n" + exact + "\n")
        assert rx == pk["rx"], exact
        # $SYS feed: the monitor's count and the broker's differ by the $SYS messages of the pass at
        # each window edge (written after the sampled value, or received after the snapshot): at
        # most one pass of 8 topics x ~45 bytes either way
        assert abs(tx - pk["tx"] - (sys1 - sys0)) < 400, exact
    finally:
        for p in procs:
            _stop(p)
        if monitor is not None:
            monitor.close()
        _stop(broker)
