"""The console script: the main job (demo) end to end, and friendly errors."""
import json
import subprocess
import sys

from conftest import needs_fmnist


def fedpara(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_help_lists_every_command():
    out = fedpara("--help").stdout
    for cmd in ("demo", "broker", "coordinator", "client", "export", "infer", "info"):
        assert cmd in out


def test_info_prints_table5_size():
    r = fedpara("info", "--model", "vgg16", "--ratio", "0.1")
    assert r.returncode == 0 and "1,545,442" in r.stdout and "15,253,578" in r.stdout


def test_bad_input_is_a_message_not_a_traceback(tmp_path):
    r = fedpara("coordinator", "--broker", "http://x", "--out", str(tmp_path))
    assert r.returncode == 2 and "broker" in r.stderr and "Traceback" not in r.stderr
    r = fedpara("export", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m.onnx"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


@needs_fmnist
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = fedpara("demo", "--model", "mlp", "--clients", "2", "--rounds", "2", "--limit", "300", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "test accuracy" in r.stdout and "dense / measured" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["dense_ratio"] > 4  # FedPara 0.1 + fp16 + zstd vs dense fp32
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "checkpoints" / "round-0002.safetensors").exists()


def test_demo_progress_text_follows_the_run():
    from coordinator.cli_demo import DemoProgress
    from coordinator.events import ClientStatusChanged, RoundCompleted, TaskSent

    class Bar:
        n, text = 0, ""

        def set_postfix_str(self, text):
            self.text = text

        def update(self, k):
            self.n += k

    bar = Bar()
    progress = DemoProgress(bar)
    progress(ClientStatusChanged("c0", True))
    assert bar.text == "waiting for clients: c0 online"
    progress(TaskSent(1, 1, ("c0", "c1")))
    assert bar.text == "acc - | round 1: training on 2 clients"
    progress(ClientStatusChanged("c0", True))  # a heartbeat mid-round: not news
    assert bar.text == "acc - | round 1: training on 2 clients"
    progress(ClientStatusChanged("c1", False))
    assert bar.text == "acc - | c1 offline"
    for r, acc in ((1, 0.8123), (2, None)):  # the MB are the run's so far, not the round's
        progress(RoundCompleted(r, {"accuracy": acc, "mqtt_bytes_down": 60_000, "mqtt_bytes_up": 10_000}))
    assert bar.text == "acc 0.812 | 0.14 MB sent" and bar.n == 2


def test_repeated_sigterm_stops_a_client_cleanly(amqtt_broker, tmp_path):
    """A supervisor's SIGTERM, then another while the client is stopping: exit 0, no traceback,
    no 'Exception ignored' from an interrupted stop or atexit callback."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fedpara.runtime.cli", "client", "--broker", amqtt_broker,
                             "--client-id", "c0", "--run", "sigterm", "--data", "synthetic,n=8", "--insecure",
                             "--energy", "off", "--state-dir", str(tmp_path / "s"), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "s").exists() and time.monotonic() < deadline:  # started: its state dir exists
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    for _ in range(5):
        time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "Exception ignored" not in out, out
