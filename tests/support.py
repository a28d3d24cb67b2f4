"""Helpers shared by the tests and the benchmarks: a Mosquitto launcher and port helpers.

Benchmarks import this file by path (``sys.path`` gets ``tests/``); it imports nothing from pytest.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from coordinator.broker import free_port, wait_for_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)

__all__ = ["MOSQUITTO", "free_port", "mosquitto_conf", "start_mosquitto", "wait_for_port"]


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
