"""``fedpara broker`` and ``fedpara coordinator``."""
from __future__ import annotations

import argparse
import json

from fedpara.runtime.flags import (
    add_broker_arguments,
    add_config_flags,
    broker_from_args,
    config_overrides,
)
from fedpara.runtime.rundir import RunDir

from .config import CoordinatorConfig
from .observation.attach import observers
from .observation.timeline import Listeners


class BrokerCommand:
    help = "run the embedded MQTT broker (amqtt) on loopback"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
        p.add_argument("--port", type=int, default=1883)
        p.add_argument("--ws-port", type=int, default=None,
                       help="also serve MQTT over WebSockets here, for browser clients (docs/mobile.md)")

    def run(self, args) -> int:
        from .broker import main
        ws = f" and ws://{args.host}:{args.ws_port}" if args.ws_port else ""
        print(f"embedded MQTT broker on mqtt://{args.host}:{args.port}{ws} (Ctrl-C to stop)")
        return main(["--host", args.host, "--port", str(args.port)]
                    + (["--ws-port", str(args.ws_port)] if args.ws_port else []))


class CoordinatorCommand:
    help = "run the coordinator: sample clients, send factors, FedAvg, evaluate, checkpoint"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_broker_arguments(p)
        p.add_argument("--config", help="run TOML file (see coordinator/config.py for every field)")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR after a crash")
        add_config_flags(p, CoordinatorConfig)

    def run(self, args) -> int:
        import torch

        from .events import RoundCompleted
        from .server import Coordinator

        torch.set_num_threads(1)
        broker = broker_from_args(args)  # the broker URL first: the cheapest mistake to report
        overrides = config_overrides(args, CoordinatorConfig)
        if args.resume:
            run_dir = RunDir(args.resume)
            base = {**run_dir.read_config(), **overrides, "out": args.resume}
            cfg = CoordinatorConfig.from_mapping(base, str(run_dir.config_path))
        else:
            cfg = CoordinatorConfig.load(args.config, **overrides)

        def on_event(event) -> None:
            if isinstance(event, RoundCompleted):
                r = event.row
                acc = f"{r['accuracy']:.4f}" if isinstance(r.get("accuracy"), float) else "  -   "
                print(f"round {r['round']:>4}  acc {acc}  replied {r['replied']}/{r['sampled']}  "
                      f"down {r['mqtt_bytes_down'] / 1e6:.2f} MB  up {r['mqtt_bytes_up'] / 1e6:.2f} MB  "
                      f"{r['duration_s']:.1f}s", flush=True)

        listeners = Listeners(on_event)
        coord = Coordinator(cfg, broker, resume=bool(args.resume), on_event=listeners)
        with observers(cfg, coord, listeners, resume=bool(args.resume), echo=lambda s: print(s, flush=True)) as obs:
            summary = coord.run()
            obs.finish(summary)
        print(json.dumps({k: summary[k] for k in ("status", "rounds", "final_accuracy", "dense_ratio")}))
        return 0 if summary["status"] == "completed" or summary["status"].startswith("stopped: privacy budget") else 1


class ReportCommand:
    help = "write a self-contained HTML report of a run (finished or in progress): plots, bytes, energy, timing"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (metrics.jsonl, summary.json, ...)")
        p.add_argument("--out", metavar="FILE", help="where to write it (default RUN_DIR/report.html)")

    def run(self, args) -> int:
        from .observation.htmlreport import write_report

        print(write_report(args.run_dir, args.out))
        return 0


BROKER_COMMAND = BrokerCommand()
COORDINATOR_COMMAND = CoordinatorCommand()
REPORT_COMMAND = ReportCommand()


class BrokerAclCommand:
    help = "write a Mosquitto password file and ACL for a fleet (each device publishes only its own topics)"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("clients", nargs="+", metavar="CLIENT_ID", help="the devices' client ids")
        p.add_argument("--out", required=True, help="directory for passwd, acl, mosquitto.conf, credentials/")
        p.add_argument("--run", default="+", help="restrict to one run id (default: every run)")
        p.add_argument("--coordinator-user", default="coordinator", help="the coordinator's MQTT username")

    def run(self, args) -> int:
        from .broker_acl import write_fleet

        users = write_fleet(args.out, args.clients, run=args.run, coordinator=args.coordinator_user)
        print(f"wrote {args.out}/passwd, acl and mosquitto.conf (include it in Mosquitto's config) for "
              f"{len(users)} users; give each machine its {args.out}/credentials/<user>.env (mode 0600), "
              "e.g. as the systemd unit's EnvironmentFile")
        return 0


BROKER_ACL_COMMAND = BrokerAclCommand()
