"""``fedpara demo``: the whole system on one machine, for real.

Starts the embedded MQTT broker (a child process), N edge-client processes with their own
Fashion-MNIST partitions, and the coordinator (this process), trains for a few rounds with a
progress bar, then prints what was measured: test accuracy, MB that crossed the broker, what the
dense model would have cost (computed exactly from its size), and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from fedpara.transport import add_broker_arguments, broker_from_args

from .config import CoordinatorConfig

NUM_CLASSES = {"fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "shakespeare": 96}  # 95 printable + unknown


class DemoCommand:
    help = "train FedPara on Fashion-MNIST with a broker, a coordinator and N client processes"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_broker_arguments(p, default=None)
        p.set_defaults(broker=None)
        p.add_argument("--model", default="cnn28", help="reference model (default cnn28)")
        p.add_argument("--scheme", default="fedpara", choices=["dense", "lowrank", "fedpara", "pfedpara"])
        p.add_argument("--ratio", type=float, default=0.1, help="the paper's gamma (default 0.1)")
        p.add_argument("--clients", type=int, default=3, help="edge-client processes (default 3)")
        p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
        p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default 1)")
        p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:K")
        p.add_argument("--limit", type=int, default=0, help="cap each client's training examples (0 = all)")
        p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate")
        p.add_argument("--batch-size", type=int, default=32, help="local batch size")
        p.add_argument("--uplink", default="fp16+zstd:3", help="uplink codec policy")
        p.add_argument("--downlink", default="fp16+zstd:3", help="downlink codec policy")
        p.add_argument("--data", default="fashion-mnist",
                       help="fashion-mnist | cifar10,path=DIR | shakespeare[,path=DIR] (see `fedpara fetch`)")
        p.add_argument("--out", help="run directory (default runs/demo-<time>)")
        p.add_argument("--seed", type=int, default=0)

    def run(self, args) -> int:
        import torch
        from tqdm import tqdm

        from .broker import spawn_broker
        from .server import Coordinator

        torch.set_num_threads(1)
        if args.clients < 1:
            raise ValueError(f"--clients must be >= 1, got {args.clients}")
        out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
        run_id = f"demo-{secrets.token_hex(3)}"
        dataset = args.data.split(",", 1)[0]
        num_classes = NUM_CLASSES.get(dataset, 10)
        test_data, partition, limit = args.data, args.partition, args.limit
        if dataset == "shakespeare":  # the paper's char-LSTM setting: one client per group of roles
            if args.model != "char_lstm":
                print(f"shakespeare is character data: using --model char_lstm instead of {args.model}")
                args.model = "char_lstm"
            partition, limit = "natural", limit or 2000
            test_data = f"{args.data},limit=2000"
        client_data = f"{args.data},partition={partition},clients={args.clients},seed={args.seed}"
        if limit:
            client_data += f",limit={limit}"
        cfg = CoordinatorConfig(run_id=run_id, model=args.model, num_classes=num_classes, scheme=args.scheme,
                                ratio=args.ratio,
                                rounds=args.rounds, min_clients=args.clients, local_epochs=args.local_epochs,
                                lr=args.lr, batch_size=args.batch_size, uplink=args.uplink,
                                downlink=args.downlink, test_data=test_data, out=str(out), seed=args.seed,
                                round_deadline_s=300.0)
        t0 = time.monotonic()
        procs: list[subprocess.Popen] = []
        broker_proc = None
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            if args.broker:
                url = args.broker
            else:
                broker_proc, url = spawn_broker()
            args.broker = url
            broker = broker_from_args(args)
            print(f"broker {broker}  run {run_id}  {args.clients} clients  {args.model}/{args.scheme}"
                  f" ratio {args.ratio}  -> {out}")
            env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
            for i in range(args.clients):
                cid = f"client-{i}"
                cmd = [sys.executable, "-m", "fedpara.cli", "client", "--broker", url, "--client-id", cid,
                       "--run", run_id, "--data", f"{client_data},index={i}", "--threads", "1",
                       "--state-dir", str(out / "clients" / cid), "--energy", "estimate", "--device", "cpu"]
                with open(logs / f"{cid}.log", "wb") as log_file:
                    procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env))
            bar = tqdm(total=args.rounds, desc="rounds", unit="round", file=sys.stdout)

            last = {"acc": "-", "sampled": 0}

            def on_round(row: dict) -> None:
                last["acc"] = f"{row['accuracy']:.3f}"
                bar.set_postfix(acc=last["acc"], MB=f"{(row['mqtt_bytes_down'] + row['mqtt_bytes_up']) / 1e6:.2f}")
                bar.update(1)

            def on_event(kind: str, *a) -> None:  # live progress inside a round
                if kind == "status" and bar.n == 0:
                    bar.set_postfix_str(f"waiting for clients: {a[0]} {'online' if a[1] else 'offline'}")
                elif kind == "task":
                    last["sampled"] = len(a[1])
                    bar.set_postfix_str(f"acc {last['acc']} | round {a[0]}: training on {len(a[1])} clients")
                elif kind == "reply":
                    bar.set_postfix_str(f"acc {last['acc']} | replies {a[1]}/{last['sampled']}")

            summary = Coordinator(cfg, broker, on_round=on_round, on_event=on_event).run()
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
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print_table(summary)
        return 0 if summary["status"] == "completed" else 1


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
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"\nrun directory: {Path(s['checkpoint']).parent.parent if s.get('checkpoint') else '-'}")


DEMO_COMMAND = DemoCommand()
