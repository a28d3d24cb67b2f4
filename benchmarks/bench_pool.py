"""The paper's cross-device shape on one host: 100 clients, K sampled per round, real broker.

    python benchmarks/bench_pool.py [--clients 100] [--per-round 16] [--rounds 5] [--broker amqtt|mosquitto]

One `fedpara client --pool N` process holds all N logical clients (each its own MQTT connection,
id and Dirichlet(0.5) Fashion-MNIST shard; they train one at a time), the coordinator runs here.
Writes docs/results/pool_results.json and docs/results/pool_results.md: time to connect N clients, per-round wall
time, replies, bytes (only the K sampled clients download the factors), the pool's memory, and
test accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support import rss_mb, start_mosquitto  # noqa: E402

from coordinator.broker import spawn_broker  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.events import ClientStatusChanged, RoundCompleted  # noqa: E402
from coordinator.server import Coordinator  # noqa: E402
from fedpara.runtime.mqtt import parse_broker_url  # noqa: E402


def start_broker(kind: str, tmp: Path):
    if kind == "mosquitto":
        return start_mosquitto(tmp, "max_queued_messages 10000\n")
    return spawn_broker()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--limit", type=int, default=600, help="examples per client (Dirichlet shards are ~600)")
    p.add_argument("--model", default="cnn28")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--broker", choices=["amqtt", "mosquitto"], default="mosquitto")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    broker_proc, url = start_broker(args.broker, tmp)
    run_id = f"pool-{secrets.token_hex(3)}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pool = None
    try:
        t0 = time.monotonic()
        pool = subprocess.Popen(
            [sys.executable, "-m", "fedpara.runtime.cli", "client", "--insecure", "--broker", url, "--run", run_id, "--client-id", "sim",
             "--pool", str(args.clients), "--threads", "1", "--device", "cpu", "--energy", "estimate",
             "--state-dir", str(tmp / "clients"),
             "--data", f"fashion-mnist,partition=dirichlet:0.5,clients={args.clients},limit={args.limit}"],
            env=env, stdout=open(tmp / "pool.log", "w"), stderr=subprocess.STDOUT)
        cfg = CoordinatorConfig(insecure=True, run_id=run_id, model=args.model, scheme="fedpara", ratio=args.ratio,
                                rounds=args.rounds, clients_per_round=args.per_round, min_clients=args.clients,
                                wait_clients_s=600.0, round_deadline_s=300.0, lr=0.05, batch_size=32,
                                uplink="fp16+zstd:3", downlink="fp16+zstd:3", out=str(tmp / "run"))
        connected = {}

        def on_event(event):
            if isinstance(event, ClientStatusChanged) and event.online and event.client_id not in connected:
                connected[event.client_id] = time.monotonic() - t0
            if not isinstance(event, RoundCompleted):
                return
            row = event.row
            print(f"round {row['round']}: {row['replied']}/{row['sampled']} replied, acc {row['accuracy']:.3f}, "
                  f"{row['duration_s']:.1f} s, {(row['mqtt_bytes_down'] + row['mqtt_bytes_up']) / 1e6:.2f} MB, "
                  f"pool RSS {rss_mb(pool.pid) or 0:.0f} MB", flush=True)
            row["pool_rss_mb"] = rss_mb(pool.pid)

        coord = Coordinator(cfg, parse_broker_url(url), on_event=on_event)
        summary = coord.run()
        rows = coord.rows
    finally:
        for proc in (pool, broker_proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    result = {
        "setting": vars(args), "status": summary["status"], "all_connected_s": max(connected.values(), default=None),
        "final_accuracy": summary["final_accuracy"],
        "rounds": [{k: r.get(k) for k in ("round", "sampled", "replied", "accuracy", "duration_s", "mqtt_bytes_down",
                                          "mqtt_bytes_up", "broadcast", "pool_rss_mb")} for r in rows],
    }
    out = Path(args.out)
    (out / "pool_results.json").write_text(json.dumps(result, indent=2))
    lines = ["# 100 clients on one host, through the real protocol", "",
             f"`python benchmarks/bench_pool.py --clients {args.clients} --per-round {args.per_round} --rounds "
             f"{args.rounds} --broker {args.broker}`: one `fedpara client --pool {args.clients}` process "
             f"(each logical client has its own MQTT connection and Dirichlet(0.5) shard of Fashion-MNIST, "
             f"<= {args.limit} examples), the coordinator samples {args.per_round} per round and sends the "
             f"factors on per-client topics (fp16+zstd), {args.model} FedPara gamma {args.ratio}.", "",
             f"All {args.clients} clients online after {result['all_connected_s']:.1f} s. Status: {summary['status']}.", "",
             "| round | sampled | replied | test accuracy | wall s | MQTT MB down | MQTT MB up | pool RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        lines.append(f"| {r['round']} | {r['sampled']} | {r['replied']} | {r['accuracy']:.2%} | {r['duration_s']:.1f} "
                     f"| {r['mqtt_bytes_down'] / 1e6:.2f} | {r['mqtt_bytes_up'] / 1e6:.2f} | {r['pool_rss_mb'] or 0:.0f} |")
    lines += ["", "Only the sampled clients download the task (per-client topics), so MB down is "
              f"{args.per_round} copies, not {args.clients}. Clients in a pool train one at a time, so "
              "round time is K x local training time on this 2-core host; on real devices they train in parallel."]
    (out / "pool_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
