"""deploy/: the systemd units pass ``systemd-analyze verify`` with no warning, the example configs
load into the real config classes, and the coordinator unit resumes a run directory after a crash."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED = "/opt/fedpara/venv/bin/fedpara"  # where the units expect the console script
HERE = str(Path(sys.executable).parent / "fedpara")  # this checkout's, so ExecStart= exists


def _analyze() -> str | None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        return None
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return exe if r.returncode == 0 else None


def _installed_copies(tmp_path: Path) -> list[Path]:
    out = []
    for unit in UNITS:
        dest = tmp_path / unit.name
        dest.write_text(unit.read_text().replace(INSTALLED, HERE))
        out.append(dest)
    return out


def test_three_units_with_restart_back_off_and_unprivileged_user():
    assert {u.name for u in UNITS} == {"fedpara-client.service", "fedpara-coordinator.service",
                                       "fedpara-broker.service"}
    for unit in UNITS:
        text = unit.read_text()
        for line in ("Restart=on-failure", "User=fedpara", "StartLimitIntervalSec=", "StartLimitBurst=",
                     "RestartSec=", "WantedBy=multi-user.target"):
            assert line in text, (unit.name, line)
        assert INSTALLED in text and "StandardOutput=" not in text  # the journal, systemd's default
        if unit.name != "fedpara-broker.service":
            assert "StateDirectory=fedpara" in text and "/etc/fedpara/" in text


@pytest.mark.skipif(_analyze() is None, reason="systemd-analyze is not installed or cannot run here "
                    "(apt-get install systemd)")
def test_units_verify_without_warnings(tmp_path):
    assert Path(HERE).is_file(), f"{HERE} missing: pip install -e . first"
    r = subprocess.run([_analyze(), "verify", "--man=no", *map(str, _installed_copies(tmp_path))],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


@pytest.mark.skipif(_analyze() is None, reason="systemd-analyze is not installed or cannot run here")
def test_verify_catches_a_broken_unit(tmp_path):
    """The check above means something: a typo in a key is reported."""
    unit = _installed_copies(tmp_path)[0]
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=on-failur"))
    r = subprocess.run([_analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert "on-failur" in r.stderr


def test_example_configs_load():
    from coordinator.config import CoordinatorConfig
    from edge_client.config import ClientConfig
    client = ClientConfig.load(DEPLOY / "etc/fedpara/client.toml")
    assert client.client_id == "pi-07" and client.exit_on_finish is False
    assert client.state_dir.startswith("/var/lib/fedpara/")
    run = CoordinatorConfig.load(DEPLOY / "etc/fedpara/coordinator.toml")
    assert run.run_id == client.run_id and run.model == "cnn28"


def _coordinator_command(tmp_path: Path, run_dir: Path) -> list[str]:
    """What the coordinator unit's ExecStart runs, with a stand-in for fedpara that echoes its args."""
    text = (DEPLOY / "systemd/fedpara-coordinator.service").read_text()
    line = next(s for s in text.splitlines() if s.startswith("ExecStart="))
    script = re.fullmatch(r"ExecStart=/bin/sh -c '(.*)'", line).group(1)
    fake = tmp_path / "fedpara"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    for var, value in {"FEDPARA_RUN_DIR": str(run_dir), "FEDPARA_BROKER": "mqtt://b:1883"}.items():
        script = script.replace("${%s}" % var, value)
    script = script.replace(INSTALLED, str(fake))
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=True).stdout.split()


def test_coordinator_unit_resumes_a_run_with_recorded_rounds(tmp_path):
    run_dir = tmp_path / "runs" / "current"
    args = _coordinator_command(tmp_path, run_dir)
    assert args[:3] == ["coordinator", "--broker", "mqtt://b:1883"]
    assert "--config" in args and args[args.index("--out") + 1] == str(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")  # started, no round recorded yet: a fresh start
    assert "--config" in _coordinator_command(tmp_path, run_dir)
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')
    args = _coordinator_command(tmp_path, run_dir)
    assert args[args.index("--resume") + 1] == str(run_dir) and "--config" not in args
