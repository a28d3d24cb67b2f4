"""An operator's slips: each is one clear line and a non-zero exit, nothing corrupted, resume exact."""
from __future__ import annotations

import logging
import secrets
import shutil
import subprocess
import sys
import time

import pytest
from conftest import needs_fmnist
from support import MOSQUITTO, free_port, start_mosquitto, wait_until

from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from fedpara.runtime.mqtt import MqttSession, parse_broker_url
from fedpara.runtime.rundir import RunDir


def fedpara(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def test_config_is_a_directory(tmp_path):
    one_line_error(fedpara("coordinator", "--config", str(tmp_path)), "is a directory")


def test_keys_beside_the_run_table(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('rounds = 3\n[run]\nmodel = "mlp"\n')
    one_line_error(fedpara("coordinator", "--config", str(f)), "outside the [run] table", "rounds")


@pytest.mark.parametrize("flag, value, field", [("--deadline", "inf", "round_deadline_s"), ("--lr", "nan", "lr"),
                                                ("--aggregator", "krum", "aggregator")])
def test_bad_numbers_name_the_field(flag, value, field):
    one_line_error(fedpara("coordinator", flag, value, "--insecure"), field)


def test_no_broker_is_one_line_after_the_timeout():
    url = parse_broker_url(f"mqtt://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach MQTT broker") as exc:
        MqttSession(url, "x", []).start(timeout=1)
    assert time.monotonic() - t0 < 5 and "\n" not in str(exc.value)


@pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")
def test_tls_to_a_plain_port_and_refused_credentials(tmp_path):
    proc, url = start_mosquitto(tmp_path, anonymous=False)
    port = url.rsplit(":", 1)[1]
    assert fedpara("keys", "new", "coordinator", "client-0", "--dir", str(tmp_path / "k")).returncode == 0
    signed = ["--key", str(tmp_path / "k" / "client-0.key"), "--coordinator-pub", str(tmp_path / "k" / "coordinator.pub"),
              "--data", "synthetic,n=8", "--state-dir", str(tmp_path / "s"), "--energy", "off"]
    try:
        t0 = time.monotonic()
        one_line_error(fedpara("client", "--broker", f"mqtts://127.0.0.1:{port}", *signed), "TLS")
        one_line_error(fedpara("client", "--broker", url, "--username", "mallory", "--password", "x", *signed),
                       "refused the connection")
        assert time.monotonic() - t0 < 60  # no 30 s retries for either
    finally:
        proc.terminate()
        proc.wait(5)


def test_demo_with_a_bad_partition_says_so_at_once(tmp_path):
    t0 = time.monotonic()
    one_line_error(fedpara("demo", "--partition", "bogus", "--out", str(tmp_path / "d")), "partition")
    assert time.monotonic() - t0 < 30


def test_a_client_on_the_wrong_run_warns(monkeypatch, caplog, amqtt_broker, tmp_path):
    from edge_client import client as client_mod
    from edge_client.client import EdgeClient
    from edge_client.config import ClientConfig

    monkeypatch.setattr(client_mod, "NO_COORDINATOR_WARNING_S", 0.5)
    c = EdgeClient(ClientConfig(client_id="c0", run_id=f"nobody-{secrets.token_hex(2)}", data="synthetic,n=8",
                                state_dir=str(tmp_path / "s"), energy="off", insecure=True), parse_broker_url(amqtt_broker))
    with caplog.at_level(logging.WARNING, logger="edge_client.client"):
        c.start()
        try:
            wait_until(lambda: any("no coordinator has announced run" in r.getMessage() for r in caplog.records),
                       what="the client's warning")
        finally:
            c.stop()


@needs_fmnist
def test_a_full_disk_fails_cleanly_and_resume_is_exact(amqtt_broker, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    from edge_client.client import EdgeClient
    from edge_client.config import ClientConfig

    base = dict(run_id=f"t-{secrets.token_hex(3)}", model="mlp", scheme="fedpara", ratio=0.3, rounds=2,
                min_clients=2, test_data="fashion-mnist,limit=200", round_deadline_s=30.0, lr=0.05, batch_size=32, insecure=True)
    clients = [EdgeClient(ClientConfig(client_id=f"c{i}", run_id=base["run_id"],
                                       data=f"fashion-mnist,partition=iid,clients=2,index={i},limit=100",
                                       state_dir=str(tmp_path / f"s{i}"), energy="off", exit_on_finish=False, insecure=True),
                          parse_broker_url(amqtt_broker)) for i in range(2)]
    for c in clients:
        c.start()
    try:
        try:
            summary = Coordinator(CoordinatorConfig(**base, out=str(disk / "run")), parse_broker_url(amqtt_broker)).run()
            assert summary["status"].startswith("failed: round 1: cannot write the run directory")
            assert RunDir(disk / "run").read_metrics() == []
            shutil.copytree(disk / "run", tmp_path / "run")  # "free space": carry on elsewhere
        finally:
            subprocess.run(["umount", str(disk)], check=False)
        cfg = CoordinatorConfig(**base, out=str(tmp_path / "run"))
        summary = Coordinator(cfg, parse_broker_url(amqtt_broker), resume=True).run()
    finally:
        for c in clients:
            c.stop()
    assert summary["status"] == "completed"
    assert [r["round"] for r in RunDir(tmp_path / "run").read_metrics()] == [1, 2]


def test_the_demo_ends_the_run_when_a_client_process_dies(tmp_path):
    """ClientWatch: a client process that exits makes the coordinator fail the run at once,
    quoting the client's own last log line."""
    from coordinator.cli_demo import ClientWatch

    class Coordinator:
        reason = None

        def abort(self, reason):
            self.reason = reason

    run = RunDir(tmp_path / "run")
    run.logs.mkdir(parents=True)
    with open(run.logs / "client-0.log", "w") as log0, open(run.logs / "client-1.log", "w") as log1:
        alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stdout=log0)
        dying = subprocess.Popen([sys.executable, "-c", "print('loading'); print('fedpara client: error: data: no such "
                                  "file /nope'); raise SystemExit(2)"], stdout=log1)
    coord = Coordinator()
    watch = ClientWatch([alive, dying], run, coord)
    watch.start()
    try:
        watch.join(15)
        assert coord.reason == "client-1 exited with code 2: fedpara client: error: data: no such file /nope"
    finally:
        watch.stop()
        alive.kill()
        alive.wait(5)
