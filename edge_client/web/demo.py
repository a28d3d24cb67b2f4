"""``fedpara demo --web-clients N``: N of the demo's clients run as headless-chromium pages.

Each gets what an enrolled phone gets (its config with its key, the demo's data shard as a
bundle), served from ``RUN_DIR/web`` on loopback, and joins the run over the broker's WebSockets
listener; its console goes to ``RUN_DIR/logs/<client>.log`` like a Python client's log.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .data import write_bundle
from .serve import WebServer
from .site import stage_client


def chromium_binary() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        raise ValueError("--web-clients runs headless chromium, which is not installed "
                         "(apt-get install chromium; bash .ci/setup does it as root)")
    return path


class WebClients:
    """Stage, serve and launch the browser clients; ``procs`` in client order, ``stop()`` ends them."""

    def __init__(self, run_dir, run_id: str, client_ids: list[str], ws_url: str, data_specs: list[str], *,
                 keys: Path | None, backend: str = "auto", env: dict | None = None) -> None:
        self.run_dir, self.run_id, self.ids, self.ws_url = run_dir, run_id, client_ids, ws_url
        self.specs, self.keys, self.backend, self.env = data_specs, keys, backend, env
        self.procs: list[subprocess.Popen] = []
        self.server: WebServer | None = None

    def start(self) -> list[subprocess.Popen]:
        from .enrol import EnrolStore
        chromium = chromium_binary()
        site = stage_client(self.run_dir.root / "web")
        for cid, spec in zip(self.ids, self.specs):
            write_bundle(spec, site / "data" / f"{cid}.bin")
            cfg = {"broker": self.ws_url, "run": self.run_id, "client_id": cid, "backend": self.backend,
                   "data_url": f"data/{cid}.bin", "insecure": self.keys is None}
            if self.keys is not None:
                cfg.update(key_pem=(self.keys / "clients" / f"{cid}.key").read_text(),
                           coordinator_pub_pem=(self.keys / "coordinator.pub").read_text())
            path = site / f"{cid}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the client's key
            with os.fdopen(fd, "w") as f:
                json.dump(cfg, f)
        self.server = WebServer(site, EnrolStore(self.run_dir.root / "web-enrol")).start()
        for cid in self.ids:
            cmd = [chromium, "--headless=new", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                   "--enable-logging=stderr", "--v=0", f"--user-data-dir={self.run_dir.root / 'web-profiles' / cid}",
                   f"{self.server.url}app.html?config={cid}.json&autostart"]
            if os.geteuid() == 0:
                cmd.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
            with open(self.run_dir.logs / f"{cid}.log", "wb") as log_file:
                self.procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.env))
        return self.procs

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.server is not None:
            self.server.stop()
