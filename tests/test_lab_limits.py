"""Clients at the limits of a device, under real cgroup limits (edge_client/devprofile.py,
edge_client/fit.py, docs/lab.md): a task too big for the memory is refused at once with the
reason; a client the kernel kills mid-round is seen as gone and the round completes with the
others; restarted, it rejoins with its state. Needs root and the cgroup cpu and memory
controllers (skipped otherwise, with the reason); CI runs as root."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_fmnist
from support import MOSQUITTO, coord_cfg, start_clients, wait_until

from coordinator.events import ClientStatusChanged, TaskSent
from coordinator.server import Coordinator
from edge_client import devprofile
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import read_json_lines

ROOT = Path(__file__).resolve().parent.parent
_reason = devprofile.unavailable_reason()
needs_cgroups = pytest.mark.skipif(_reason is not None, reason=f"device profiles: {_reason}")
pytestmark = [needs_fmnist, needs_cgroups,
              pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")]

# test profiles: enough CPU to start quickly; memory for the client (~300 MB with cnn28), or less
PROFILES = """
[profile.small]
description = "a device with 450 MB for the client"
cores = 1
core_speed = 0.6
memory_mb = 550
reserved_mb = 100

[profile.roomy]
description = "a device with 900 MB for the client"
cores = 1
core_speed = 0.6
memory_mb = 1000
reserved_mb = 100
"""
BIG_DATA = "fashion-mnist,partition=iid,clients=3,index=0,limit=3000"


def profiled_client(tmp_path: Path, url: str, run_id: str, profile: str, *, env: dict | None = None,
                    log: str = "c0.log") -> subprocess.Popen:
    """``fedpara client --profile PROFILE`` as c0, its output in tmp_path/LOG."""
    (tmp_path / "profiles.toml").write_text(PROFILES)
    cmd = [sys.executable, "-m", "fedpara.runtime.cli", "-v", "client", "--profile", profile,
           "--profile-report", str(tmp_path / f"{log}.json"), "--broker", url, "--client-id", "c0",
           "--run", run_id, "--threads", "1", "--data", BIG_DATA, "--state-dir", str(tmp_path / "state-c0"),
           "--insecure", "--heartbeat-s", "2"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", devprofile.ENV_PROFILES: str(tmp_path / "profiles.toml"),
                **(env or {})}
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / log, "wb"))


def wait_online(coordinator_events: list, client: str, timeout: float = 90.0) -> None:
    wait_until(lambda: any(isinstance(e, ClientStatusChanged) and e.client_id == client and e.online
                           for e in coordinator_events), timeout, interval=0.2, what=f"{client} online")


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_a_task_too_big_for_the_memory_is_refused_with_the_reason(mosquitto_broker, tmp_path):
    # cnn28 at batch 3000 needs ~1 GB to train; c0 has 450 MB: it says so instead of being killed
    cfg = coord_cfg(tmp_path, model="cnn28", rounds=1, batch_size=3000, round_deadline_s=120.0,
                    wait_clients_s=120.0)
    c0 = profiled_client(tmp_path, mosquitto_broker, cfg.run_id, "small")
    others = start_clients(mosquitto_broker, cfg, tmp_path, 2, first=1, total=3)
    try:
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker)).run()
        code = c0.wait(60)  # the run is over: the client exits, its runner with it
    finally:
        for c in others:
            c.stop()
        stop([c0])
    rows = read_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed"
    assert rows[0]["sampled"] == 3 and rows[0]["replied"] == 2
    reason = rows[0]["failures"]["c0"]
    assert "needs about" in reason and "MB" in reason and "cgroup limit 450 MB" in reason, reason
    report = json.loads((tmp_path / "c0.log.json").read_text())
    assert code == 0 and report["exit_code"] == 0 and report["oom_kills"] == 0
    assert report["memory_limit_bytes"] == 450 << 20 and report["peak_rss_bytes"] < 450 << 20


@pytest.mark.slow
def test_a_client_killed_by_the_kernel_mid_round_is_gone_then_rejoins_with_its_state(mosquitto_broker, tmp_path):
    # pFedPara: the local half lives only on the device, in its state directory
    cfg = coord_cfg(tmp_path, model="cnn28", scheme="pfedpara", rounds=3, round_deadline_s=120.0,
                    wait_clients_s=120.0, min_reply_fraction=0.5)
    events: list = []
    # its fit check off: it would refuse the round once the other process has taken the memory
    c0 = profiled_client(tmp_path, mosquitto_broker, cfg.run_id, "roomy", log="c0-first.log",
                         env={"FEDPARA_FIT_CHECK": "0"})
    runners = [c0]
    others = start_clients(mosquitto_broker, cfg, tmp_path, 2, first=1, total=3)
    hog: list[subprocess.Popen] = []
    name = devprofile.cgroup_name("roomy", "c0", c0.pid)

    def grow_in_the_device(cgroup_name: str) -> None:
        """Another process on the device grows: the kernel kills the client, the OOM killer's
        first choice (oom_score_adj 1000, as systemd's OOMScoreAdjust= sets it for a unit)."""
        procs = [d / "cgroup.procs" for d in devprofile.cgroup_dirs(cgroup_name)]
        code = ("import os, sys, time\n"
                "for p in sys.argv[1:]:\n"
                "    with open(p, 'w') as f: f.write(str(os.getpid()))\n"
                "held = [b'x' * (8 << 20) for _ in range(90)]\n"  # 720 MB of the 900
                "time.sleep(600)\n")
        hog.append(subprocess.Popen([sys.executable, "-c", code, *map(str, procs)]))

    def on_event(e) -> None:
        events.append(e)
        if isinstance(e, TaskSent) and e.round == 2 and not hog:
            # c0 writes round 1's local half right after its update went (what a restart restores)
            saved = tmp_path / "state-c0" / "local.safetensors"
            deadline = time.monotonic() + 30
            while not saved.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            # then c0 is held where it is, round 2's task just sent (SIGSTOP, here, long before it
            # could train and reply): the kill lands mid-round whatever the machine's speed; the
            # kernel kills a stopped process all the same
            for d in devprofile.cgroup_dirs(name)[-1:]:
                for pid in (d / "cgroup.procs").read_text().split():
                    Path(f"/proc/{pid}/oom_score_adj").write_text("1000")
                    os.kill(int(pid), signal.SIGSTOP)
            threading.Thread(target=grow_in_the_device, args=(name,), daemon=True).start()
        if isinstance(e, ClientStatusChanged) and e.client_id == "c0" and not e.online and hog:
            def restart() -> None:  # what systemd's Restart=on-failure does, after the runner has exited
                hog[0].kill()
                hog[0].wait(10)
                runners[0].wait(30)
                runners.append(profiled_client(tmp_path, mosquitto_broker, cfg.run_id, "roomy", log="c0-again.log"))
            if len(runners) == 1:
                threading.Thread(target=restart, daemon=True).start()

    try:
        probe: list = []
        t = threading.Thread(target=lambda: probe.append(Coordinator(cfg, parse_broker_url(mosquitto_broker),
                                                                     on_event=on_event).run()))
        t.start()
        t.join(400)
        assert not t.is_alive(), "the run did not finish"
        summary = probe[0]
    finally:
        for c in others:
            c.stop()
        stop(hog + runners)
    rows = read_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2, 3]
    assert "c0" in rows[0]["clients"]
    # round 2: c0 was sampled, killed by the kernel while it trained, and the round went on without it
    assert rows[1]["sampled"] == 3 and rows[1]["replied"] == 2 and "c0" not in rows[1]["clients"]
    first = json.loads((tmp_path / "c0-first.log.json").read_text())
    assert first["oom_kills"] >= 1 and first["exit_code"] == 137, first  # 128 + SIGKILL: systemd restarts it
    assert "KILLED by the kernel's OOM killer" in (tmp_path / "c0-first.log").read_text()
    # round 3: restarted, it rejoined and trained with the local half it had saved in round 1
    assert "c0" in rows[2]["clients"]
    assert "restored local factors" in (tmp_path / "c0-again.log").read_text()
    unit = (ROOT / "deploy" / "systemd" / "fedpara-client.service").read_text()
    assert "Restart=on-failure" in unit
