"""mqtts:// with a CA file and a password from the environment, against a real Mosquitto."""
import shutil
import subprocess

import pytest
from conftest import MOSQUITTO, needs_fmnist, start_mosquitto
from test_runtime import coord_cfg, run_coordinator, start_clients, stop_all

from fedpara.runtime.mqtt import MqttSession, parse_broker_url
from fedpara.runtime.rundir import read_json_lines as read_metrics

pytestmark = [needs_fmnist, pytest.mark.skipif(
    not (MOSQUITTO and shutil.which("openssl") and shutil.which("mosquitto_passwd")),
    reason="needs mosquitto, mosquitto_passwd and openssl")]


def make_pki(d):
    """A throw-away CA and a server certificate for 127.0.0.1, and a password file for alice."""
    def run(*a):
        subprocess.run(a, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
        str(d / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(d / "san.ext"), "-out", str(d / "server.crt"))
    run("mosquitto_passwd", "-c", "-b", str(d / "passwd"), "alice", "s3cret")


def test_tls_and_password_auth(tmp_path, monkeypatch):
    make_pki(tmp_path)
    proc, url = start_mosquitto(tmp_path, f"cafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
                                          f"keyfile {tmp_path / 'server.key'}\npassword_file {tmp_path / 'passwd'}\n",
                                anonymous=False)
    port = url.rsplit(":", 1)[1]
    ca = str(tmp_path / "ca.crt")
    monkeypatch.setenv("FEDPARA_MQTT_PASSWORD", "s3cret")
    broker = parse_broker_url(f"mqtts://alice@127.0.0.1:{port}", ca_file=ca)
    try:
        with pytest.raises(ConnectionError):  # plain MQTT cannot talk to the TLS listener
            MqttSession(parse_broker_url(f"mqtt://127.0.0.1:{port}"), "plain", []).start(timeout=3)
        with pytest.raises(ConnectionError):  # a wrong password is refused
            MqttSession(parse_broker_url(f"mqtts://alice@127.0.0.1:{port}", password="wrong", ca_file=ca),
                        "intruder", []).start(timeout=3)
        cfg = coord_cfg(tmp_path, min_clients=2, rounds=1)
        clients = start_clients(broker, cfg, tmp_path, 2, energy="off")
        try:
            summary = run_coordinator(cfg, broker)
        finally:
            stop_all(clients)
        assert summary["status"] == "completed"
        assert [r["replied"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [2]
    finally:
        proc.kill()
        proc.wait(5)
