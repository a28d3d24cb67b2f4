"""Children started by ``fedpara demo`` end with it, even when it is SIGKILLed
(fedpara/runtime/parent.py)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedpara.runtime.parent import ENV, child_env

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (its parent, the killed process, is gone; init reaps it soon)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("use_prctl", [None, False])  # False: the polling fallback of other systems
def test_child_ends_when_its_parent_is_killed(tmp_path, use_prctl):
    child = textwrap.dedent(f"""
        import time
        from fedpara.runtime.parent import exit_with_parent
        assert exit_with_parent(use_prctl={use_prctl!r})
        print("armed", flush=True)
        time.sleep(120)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        from fedpara.runtime.parent import child_env
        p = subprocess.Popen([sys.executable, "-c", {child!r}], env=child_env(), stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "armed"
        print(p.pid, flush=True)
        time.sleep(120)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(ENV, None)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(proc.stdout.readline())
        assert _alive(pid)
        proc.send_signal(signal.SIGKILL)  # no cleanup code of the parent runs
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the child outlived its SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_without_the_variable_nothing_is_armed(monkeypatch):
    from fedpara.runtime.parent import exit_with_parent

    monkeypatch.delenv(ENV, raising=False)
    assert exit_with_parent() is False
    assert child_env({"A": "1"}) == {"A": "1", ENV: str(os.getpid())}
