"""``fedpara demo``: the whole system on one machine, for real.

Starts the embedded MQTT broker (a child process), N edge-client processes with their own
Fashion-MNIST partitions, and the coordinator (this process), trains for a few rounds with a
progress bar, then prints what was measured: test accuracy, MB that crossed the broker, what the
dense model would have cost (computed exactly from its size), and the ratio, and writes the run's
HTML report (``RUN_DIR/report.html``). ``--dashboard HOST:PORT`` serves the live dashboard.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedpara.data import parse_data_spec
from fedpara.runtime.flags import (
    add_broker_arguments,
    add_config_flags,
    broker_from_args,
    config_overrides,
)
from fedpara.runtime.parent import child_env
from fedpara.runtime.rundir import RunDir
from fedpara.runtime.signing import new_key

from .config import CoordinatorConfig
from .events import ClientStatusChanged, ReplyAccepted, RoundCompleted, TaskSent
from .observation.attach import observers
from .observation.timeline import Listeners

# Where the demo departs from CoordinatorConfig's defaults, and why (stated once; flags show them).
# batch size 32 is what the per-scheme default lrs were measured with (fedpara/lr.py; the lr is
# left to the coordinator's per-model, per-scheme default); fp16+zstd halves the bytes again at no measurable accuracy cost
# (docs/wire.md); the longer deadline covers the clients' start-up (imports, data loading) on slow
# machines, where round 1 starts as soon as they are online.
DEMO_DEFAULTS = {"batch_size": 32, "uplink": "fp16+zstd:3", "downlink": "fp16+zstd:3",
                 "round_deadline_s": 300.0}
# The coordinator fields the demo exposes as flags; the rest keep CoordinatorConfig's defaults.
DEMO_FIELDS = ("model", "scheme", "ratio", "rounds", "local_epochs", "lr", "batch_size", "uplink", "downlink", "wire",
               "seed", "aggregator", "insecure", "dashboard", "tensorboard",
               "dp_noise_multiplier", "dp_clip_norm", "max_epsilon", "mode", "buffer_size", "max_staleness",
               "clients_per_round", "round_deadline_s", "min_reply_fraction", "eval_every",
               "server_opt", "server_lr", "server_momentum", "server_beta1", "server_beta2", "server_tau", "prox_mu")


class DemoCommand:
    help = "train FedPara on Fashion-MNIST with a broker, a coordinator and N client processes"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_broker_arguments(p, default=None)
        add_config_flags(p, CoordinatorConfig, defaults=DEMO_DEFAULTS,
                         skip=[f.name for f in dataclasses.fields(CoordinatorConfig) if f.name not in DEMO_FIELDS])
        p.add_argument("--clients", type=int, default=None,
                       help="edge-client processes (default 3, or one per --device-profiles entry)")
        p.add_argument("--device-profiles", default="",
                       help="comma-separated device profiles (e.g. pi4-1gb,pi5-4gb,laptop): client i runs inside "
                            "profile i (cycling), its CPU share and memory enforced by cgroups (root; docs/lab.md)")
        p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
        p.add_argument("--limit", type=int, default=0, help="cap each client's training examples (0 = all)")
        p.add_argument("--data", default="fashion-mnist",
                       help="fashion-mnist | cifar10,path=DIR | shakespeare[,path=DIR] (see `fedpara fetch`)")
        p.add_argument("--out", help="run directory (default runs/demo-<time>)")
        p.add_argument("--web-clients", type=int, default=0,
                       help="run the last N clients as headless-chromium pages (the browser client, "
                            "edge_client/web; docs/mobile.md); the others stay Python")
        p.add_argument("--web-broker", default=None,
                       help="with --broker and --web-clients: the broker's MQTT-over-WebSockets URL (ws://HOST:PORT)")

    def run(self, args) -> int:
        import torch
        from tqdm import tqdm

        from .broker import spawn_broker
        from .server import Coordinator

        torch.set_num_threads(1)
        profiles = [p.strip() for p in args.device_profiles.split(",") if p.strip()]
        if args.clients is None:
            args.clients = len(profiles) or 3
        if profiles:  # a wrong name or a machine without cgroups: said before anything starts
            from edge_client.devprofile import get_profile, unavailable_reason

            for name in profiles:
                get_profile(name)
            reason = unavailable_reason()
            if reason:
                raise ValueError(f"--device-profiles: {reason}")
        if args.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {args.clients}")
        if not 0 <= args.web_clients <= args.clients:
            raise ValueError(f"--web-clients must be in 0..--clients ({args.clients}), got {args.web_clients}")
        if args.web_clients and args.broker and not args.web_broker:
            raise ValueError("--web-clients with --broker needs --web-broker ws://HOST:PORT (the broker's "
                             "websockets listener)")
        out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
        run_id = f"demo-{secrets.token_hex(3)}"
        data = parse_data_spec(args.data)
        given = {**DEMO_DEFAULTS, **config_overrides(args, CoordinatorConfig)}
        test_data, partition, limit = args.data, args.partition, args.limit
        if data.name == "shakespeare":  # the paper's char-LSTM setting: one client per group of roles
            if given.get("model", "char_lstm") != "char_lstm":
                print(f"shakespeare is character data: using --model char_lstm instead of {given['model']}")
            given["model"] = "char_lstm"
            partition, limit = "natural", limit or 2000
            test_data = f"{args.data},limit=2000"
        seed = given.get("seed", 0)
        client_data = f"{args.data},partition={partition},clients={args.clients},seed={seed}"
        if limit:
            client_data += f",limit={limit}"
        try:  # a bad spec is the operator's, not a client's: say so before starting anything
            parse_data_spec(f"{client_data},index=0")
        except ValueError as exc:
            raise ValueError(f"client data {client_data!r}: {exc}") from None
        run_dir = RunDir(out)
        client_ids = [f"client-{i}" for i in range(args.clients)]
        trust_args = ["--insecure"]
        if not given.get("insecure"):  # a careful operator's run: every message signed (docs/security.md)
            keys = run_dir.root / "keys"
            new_key("coordinator", keys)
            for cid in client_ids:
                new_key(cid, keys / "clients")
            given.update(coordinator_key=str(keys / "coordinator.key"), trusted_keys=str(keys / "clients"))
            trust_args = ["--key", str(keys / "clients"), "--coordinator-pub", str(keys / "coordinator.pub")]
        cfg = CoordinatorConfig(**{**given, "run_id": run_id, "num_classes": data.num_classes,
                                   "min_clients": args.clients, "test_data": test_data, "out": str(out)})
        t0 = time.monotonic()
        procs: list[subprocess.Popen] = []
        broker_proc = None
        run_dir.logs.mkdir(parents=True, exist_ok=True)
        n_py = args.clients - args.web_clients
        try:
            ws_url = args.web_broker
            if args.broker:
                url = args.broker
            elif args.web_clients:
                from .broker import free_port
                ws_port = free_port()
                broker_proc, url = spawn_broker(ws_port=ws_port)
                ws_url = f"ws://127.0.0.1:{ws_port}"
            else:
                broker_proc, url = spawn_broker()
            args.broker = url
            broker = broker_from_args(args)
            print(f"broker {broker}  run {run_id}  {args.clients} clients  {cfg.model}/{cfg.scheme}"
                  f" ratio {cfg.ratio}  {'UNSIGNED (--insecure)' if cfg.insecure else 'signed'}  -> {out}")
            # child_env: the clients end when the demo does, even when it is killed (fedpara/runtime/parent.py)
            env = child_env({**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
            for i, cid in enumerate(client_ids[:n_py]):
                cmd = [sys.executable, "-m", "fedpara.runtime.cli", "client", "--broker", url, "--client-id", cid,
                       "--run", run_id, "--data", f"{client_data},index={i}", "--threads", "1",
                       "--state-dir", str(run_dir.client_state(cid)), "--device", "cpu", *trust_args]
                # inside a device profile the client estimates energy with that device's figures
                cmd += ["--profile", profiles[i % len(profiles)]] if profiles else ["--energy", "estimate"]
                with open(run_dir.logs / f"{cid}.log", "wb") as log_file:
                    procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env))
            for i in range(n_py, args.clients):  # the last N: browser clients (edge_client/web/demo.py)
                cmd = [sys.executable, "-m", "edge_client.web.demo", "--client-id", client_ids[i], "--run", run_id,
                       "--broker", ws_url, "--data", f"{client_data},index={i}", "--out", str(run_dir.root)]
                cmd += [] if cfg.insecure else ["--keys", str(run_dir.root / "keys")]
                with open(run_dir.logs / f"{client_ids[i]}.log", "wb") as log_file:
                    procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env))
            if args.web_clients:
                print(f"{args.web_clients} browser client(s) in headless chromium"
                      + ("" if limit else "; a browser trains 5-40x slower than torch (docs/mobile.md): "
                         "--limit keeps its rounds within the deadline"))
            listeners = Listeners()
            coordinator = Coordinator(cfg, broker, on_event=listeners)
            with observers(cfg, coordinator, listeners, echo=lambda s: print(s, flush=True)) as obs:
                bar = tqdm(total=cfg.rounds, desc="rounds", unit="round", file=sys.stdout)
                listeners.add(DemoProgress(bar))
                watch = ClientWatch(procs, run_dir, coordinator)
                watch.start()
                summary = coordinator.run()
                obs.finish(summary)
                watch.stop()
                bar.close()
            deadline = time.monotonic() + 15
            for p in procs:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for p in procs + ([broker_proc] if broker_proc else []):
                if p.poll() is None:
                    p.terminate()
            for p in procs + ([broker_proc] if broker_proc else []):
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        summary["demo_wall_s"] = time.monotonic() - t0
        run_dir.write_summary(summary)
        print_table(summary)
        print_report(run_dir)
        # a privacy budget reached is the operator's limit doing its job, not a failure
        return 0 if summary["status"] == "completed" or summary["status"].startswith("stopped: privacy budget") else 1


class ClientWatch(threading.Thread):
    """Ends the run, quoting the client's own last log line, as soon as a client process dies:
    the coordinator would otherwise wait for it until its deadlines pass."""

    def __init__(self, procs: list[subprocess.Popen], run_dir: RunDir, coordinator) -> None:
        super().__init__(name="client-watch", daemon=True)
        self.procs, self.run_dir, self.coordinator = procs, run_dir, coordinator
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.5):
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    self.coordinator.abort(f"client-{i} exited with code {p.returncode}: {self.last_line(i)}")
                    return

    def last_line(self, i: int) -> str:
        try:
            lines = (self.run_dir.logs / f"client-{i}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1][:300] if lines else "(empty log)"

    def stop(self) -> None:
        self.halt.set()


class DemoProgress:
    """The progress bar's text, from the coordinator's events (live progress inside a round)."""

    def __init__(self, bar) -> None:
        self.bar, self.acc, self.sampled, self.started = bar, "-", 0, False
        self.mb = 0.0  # MQTT MB both directions since the start (the figure the summary ends with)

    def __call__(self, event) -> None:
        bar = self.bar
        if isinstance(event, ClientStatusChanged):
            if not self.started:  # heartbeats during a round are not news; a client going away is
                bar.set_postfix_str(f"waiting for clients: {event.client_id} {'online' if event.online else 'offline'}")
            elif not event.online:
                bar.set_postfix_str(f"acc {self.acc} | {event.client_id} offline")
        elif isinstance(event, TaskSent):
            self.started = True
            self.sampled = len(event.sampled)
            bar.set_postfix_str(f"acc {self.acc} | round {event.round}: training on {self.sampled} clients")
        elif isinstance(event, ReplyAccepted):
            bar.set_postfix_str(f"acc {self.acc} | replies {event.replies}/{event.expected}")
        elif isinstance(event, RoundCompleted):
            row = event.row
            if isinstance(row.get("accuracy"), float):  # None in a round that was not evaluated
                self.acc = f"{row['accuracy']:.3f}"
            self.mb += (row["mqtt_bytes_down"] + row["mqtt_bytes_up"]) / 1e6
            bar.set_postfix_str(f"acc {self.acc} | {self.mb:.2f} MB sent")
            bar.update(1)


def print_table(s: dict) -> None:
    down, up = s["mqtt_bytes_down"] / 1e6, s["mqtt_bytes_up"] / 1e6
    ddown, dup = s["dense_bytes_down"] / 1e6, s["dense_bytes_up"] / 1e6
    acc = s["final_accuracy"]
    rows = [
        ("status", s["status"]),
        ("rounds", str(s["rounds"])),
        ("test accuracy", f"{acc:.2%}" if acc is not None else "-"),
        ("measured MB down / up (MQTT)", f"{down:.2f} / {up:.2f}"),
        ("dense fp32 MB down / up (exact)", f"{ddown:.2f} / {dup:.2f}"),
        ("dense / measured", f"{s['dense_ratio']:.1f}x" if s.get("dense_ratio") else "-"),
        ("energy, all clients", f"{s.get('energy_j', 0):.0f} J ({'measured' if s.get('energy_measured') else 'estimated'})"),
        ("wall time", f"{s.get('demo_wall_s', s['wall_s']):.1f} s"),
    ]
    if s.get("privacy"):
        p = s["privacy"]
        rows.insert(3, ("privacy spent (user-level DP)", f"epsilon {p['epsilon']:.3f} at delta {p['delta']:g} "
                                                          f"({p['mode']}, noise multiplier {p['noise_multiplier']:g})"))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"\nrun directory: {Path(s['checkpoint']).parent.parent if s.get('checkpoint') else '-'}")


def print_report(run_dir: RunDir) -> None:
    """Write the run's HTML report and say where it is (a failure to write it fails nothing)."""
    from .observation.htmlreport import write_report

    try:
        print(f"report: {write_report(run_dir)}")
    except (ImportError, OSError, ValueError) as exc:
        print(f"report: not written ({exc}); try `fedpara report {run_dir.root}`")


DEMO_COMMAND = DemoCommand()
