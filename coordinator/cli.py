"""``fedpara broker`` and ``fedpara coordinator``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedpara.transport import add_broker_arguments, broker_from_args

from .config import CoordinatorConfig


class BrokerCommand:
    help = "run the embedded MQTT broker (amqtt) on loopback"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
        p.add_argument("--port", type=int, default=1883)

    def run(self, args) -> int:
        from .broker import main
        print(f"embedded MQTT broker on mqtt://{args.host}:{args.port} (Ctrl-C to stop)")
        return main(["--host", args.host, "--port", str(args.port)])


# flags that override fields of the run file
OVERRIDES = [("run_id", "--run", str), ("model", "--model", str), ("scheme", "--scheme", str),
             ("ratio", "--ratio", float), ("rounds", "--rounds", int), ("clients_per_round", "--clients-per-round", int),
             ("min_clients", "--min-clients", int), ("local_epochs", "--local-epochs", int),
             ("round_deadline_s", "--deadline", float), ("lr", "--lr", float), ("batch_size", "--batch-size", int),
             ("downlink", "--downlink", str), ("uplink", "--uplink", str), ("test_data", "--test-data", str),
             ("out", "--out", str), ("seed", "--seed", int), ("max_packet", "--max-packet", int)]


class CoordinatorCommand:
    help = "run the coordinator: sample clients, send factors, FedAvg, evaluate, checkpoint"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_broker_arguments(p)
        p.add_argument("--config", help="run TOML file (see coordinator/config.py for every field)")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR after a crash")
        for field, flag, typ in OVERRIDES:
            p.add_argument(flag, dest=field, type=typ, help=f"overrides '{field}'")

    def run(self, args) -> int:
        import torch

        from .server import Coordinator

        torch.set_num_threads(1)
        overrides = {f: getattr(args, f) for f, _, _ in OVERRIDES}
        if args.resume:
            base = json.loads((Path(args.resume) / "config.json").read_text())
            base.update({k: v for k, v in overrides.items() if v is not None}, out=args.resume)
            cfg = CoordinatorConfig.from_mapping(base, f"{args.resume}/config.json")
        else:
            cfg = CoordinatorConfig.load(args.config, **overrides)
        coord = Coordinator(cfg, broker_from_args(args), resume=bool(args.resume),
                            on_round=lambda r: print(f"round {r['round']:>4}  acc {r['accuracy']:.4f}  "
                                                     f"replied {r['replied']}/{r['sampled']}  "
                                                     f"down {r['mqtt_bytes_down'] / 1e6:.2f} MB  "
                                                     f"up {r['mqtt_bytes_up'] / 1e6:.2f} MB  "
                                                     f"{r['duration_s']:.1f}s", flush=True))
        summary = coord.run()
        print(json.dumps({k: summary[k] for k in ("status", "rounds", "final_accuracy", "dense_ratio")}))
        return 0 if summary["status"] == "completed" else 1


BROKER_COMMAND = BrokerCommand()
COORDINATOR_COMMAND = CoordinatorCommand()
