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
    from coordinator.events import ClientStatusChanged, TaskSent

    class Bar:
        n, text = 0, ""

        def set_postfix_str(self, text):
            self.text = text

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
