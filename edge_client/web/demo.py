"""One browser client of ``fedpara demo --web-clients N``, as a process of its own:

    python -m edge_client.web.demo --client-id client-2 --run RUN --broker ws://HOST:PORT
        --data SPEC --out RUN_DIR [--keys RUN_DIR/keys] [--backend auto]

It gets what an enrolled phone gets (its config with its key, its data shard as a bundle), staged
and served from ``RUN_DIR/web/<client>`` on loopback, and runs headless chromium on the page until
it is stopped (SIGTERM) or the demo ends; chromium's console goes to this process's output (the
demo's ``logs/<client>.log``). The demo starts it like a Python client, as a command, so the
coordinator app never imports this one (docs/architecture.md, rule 4).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .data import write_bundle
from .enrol import EnrolStore
from .serve import WebServer
from .site import stage_client


def chromium_binary() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        raise ValueError("--web-clients runs headless chromium, which is not installed "
                         "(apt-get install chromium; bash .ci/setup does it as root)")
    return path


def prepare(out: Path, client_id: str, run: str, broker: str, data: str, keys: Path | None,
            backend: str = "auto") -> Path:
    """Stage the page for one client into ``out/web/<client_id>``: its data bundle and config."""
    site = stage_client(out / "web" / client_id)
    write_bundle(data, site / "data" / f"{client_id}.bin")
    cfg = {"broker": broker, "run": run, "client_id": client_id, "backend": backend,
           "data_url": f"data/{client_id}.bin", "insecure": keys is None}
    if keys is not None:
        cfg.update(key_pem=(keys / "clients" / f"{client_id}.key").read_text(),
                   coordinator_pub_pem=(keys / "coordinator.pub").read_text())
    fd = os.open(site / "config.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the key
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    return site


def chromium_command(url: str, profile: Path) -> list[str]:
    cmd = [chromium_binary(), "--headless=new", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", url]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_client.web.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--client-id", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--broker", required=True, help="the broker's MQTT-over-WebSockets URL")
    p.add_argument("--data", required=True, help="this client's data spec")
    p.add_argument("--out", required=True, type=Path, help="the run directory")
    p.add_argument("--keys", type=Path, help="the demo's keys directory (coordinator.pub, clients/); none: insecure")
    p.add_argument("--backend", default="auto", help="TensorFlow.js backend: auto|wasm|cpu|webgl")
    args = p.parse_args(argv)
    from fedpara.runtime.parent import exit_with_parent
    exit_with_parent()  # started by fedpara demo: do not outlive it
    try:
        site = prepare(args.out, args.client_id, args.run, args.broker, args.data, args.keys, args.backend)
        cmd = chromium_command("", args.out / "web-profiles" / args.client_id)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    browser = None

    def stop(*_):
        if browser is not None and browser.poll() is None:
            browser.terminate()
    # the page POSTs /exit once it has obeyed the run's finish: then this process ends, like a Python client's
    server = WebServer(site, EnrolStore(args.out / "web" / f"{args.client_id}-enrol"), on_exit=stop).start()
    cmd[-1] = f"{server.url}app.html?config=config.json&autostart&exit"
    print(f"{args.client_id}: headless chromium on {cmd[-1]}", flush=True)
    browser = subprocess.Popen(cmd, stdout=sys.stdout, stderr=subprocess.STDOUT)
    signal.signal(signal.SIGTERM, stop)
    try:
        browser.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        try:
            browser.wait(5)
        except subprocess.TimeoutExpired:
            browser.kill()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
