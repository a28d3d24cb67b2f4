"""1,000 logical clients on one Mosquitto: does the coordinator scale with the fleet?

    python benchmarks/bench_fleet.py [--clients 1000] [--procs 4] [--per-round 50] [--rounds 50]

``--procs`` ``fedpara client --pool`` processes hold the clients (each its own MQTT connection,
Ed25519 key, heartbeat and synthetic 1x28x28 shard); the coordinator runs here, signed, samples
``--per-round`` per round and trains a tiny FedPara mlp. Reported, in docs/results/fleet_results.{json,md}:
time until all clients are online, status messages handled at start, per round the wall time,
replies, the coordinator's CPU seconds per sampled client (process CPU time: every thread of the
coordinator, paho's included), and the coordinator's and the broker's RSS (growth after warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support import rss_mb, start_mosquitto  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--procs", type=int, default=4, help="pool processes holding the clients")
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--heartbeat", type=float, default=10.0, help="clients' heartbeat_s")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from coordinator.config import CoordinatorConfig
    from coordinator.events import ClientStatusChanged, RoundCompleted, TaskSent
    from coordinator.server import Coordinator
    from fedpara.runtime.mqtt import parse_broker_url
    from fedpara.runtime.signing import new_key

    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    broker, url = start_mosquitto(tmp, "max_connections -1\nmax_queued_messages 10000\n")
    run_id = f"fleet-{secrets.token_hex(3)}"
    keys = tmp / "keys"
    t_keys = time.monotonic()
    for name in ["coordinator", *(f"sim-{i:03d}" for i in range(args.clients))]:
        new_key(name, keys)
    print(f"{args.clients + 1} keys in {time.monotonic() - t_keys:.1f} s", flush=True)
    per = -(-args.clients // args.procs)
    data = f"synthetic,n={10 * args.clients},shape=1x28x28,classes=10,clients={args.clients}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pools = []
    t0 = time.monotonic()
    for k in range(args.procs):
        size = min(per, args.clients - k * per)
        pools.append(subprocess.Popen(
            [sys.executable, "-m", "fedpara.runtime.cli", "client", "--broker", url, "--run", run_id,
             "--client-id", "sim", "--pool", str(size), "--pool-offset", str(k * per), "--threads", "1",
             "--device", "cpu", "--energy", "off", "--no-eval-local", "--heartbeat-s", str(args.heartbeat),
             "--key", str(keys), "--coordinator-pub", str(keys / "coordinator.pub"),
             "--state-dir", str(tmp / "clients"), "--data", data],
            env=env, stdout=open(tmp / f"pool-{k}.log", "w"), stderr=subprocess.STDOUT))
    online: dict[str, float] = {}
    statuses = {"n": 0}
    rows: list[dict] = []
    marks: dict[int, dict] = {}
    box: dict = {}

    def on_event(e):
        if isinstance(e, ClientStatusChanged):
            statuses["n"] += 1
            if e.online and e.client_id not in online:
                online[e.client_id] = time.monotonic() - t0
        elif isinstance(e, TaskSent) and e.attempt == 1:
            marks[e.round] = {"t": time.monotonic(), "cpu": time.process_time()}
        elif isinstance(e, RoundCompleted):
            e.row["coordinator_rss_mb"] = rss_mb()
            e.row["senders_seen"] = len(box["coord"]._reassemblers)  # distinct clients that ever replied
            e.row["broker_rss_mb"] = rss_mb(broker.pid)
            e.row["pool_rss_mb"] = [rss_mb(proc.pid) for proc in pools]
            rows.append(e.row)
            if e.row["round"] % 10 == 0:
                print(f"round {e.row['round']}: {e.row['replied']}/{e.row['sampled']} replied, "
                      f"coordinator {e.row['coordinator_rss_mb']:.0f} MB, broker {e.row['broker_rss_mb']:.1f} MB, "
                      f"pools {[round(m or 0) for m in e.row['pool_rss_mb']]} MB", flush=True)

    try:
        cfg = CoordinatorConfig(run_id=run_id, model="mlp", scheme="fedpara", ratio=0.1, rounds=args.rounds,
                                clients_per_round=args.per_round, min_clients=args.clients, wait_clients_s=900.0,
                                round_deadline_s=120.0, lr=0.05, batch_size=10, coordinator_key=str(keys / "coordinator.key"),
                                trusted_keys=str(keys), test_data="synthetic,n=400,shape=1x28x28,classes=10",
                                out=str(tmp / "run"))
        coord = box["coord"] = Coordinator(cfg, parse_broker_url(url), on_event=on_event)
        summary = coord.run()
    finally:
        for proc in pools + [broker]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    marks_sorted = sorted(marks)
    per_round = []
    for r in rows:
        rnd = r["round"]
        nxt = marks.get(rnd + 1)
        if nxt is None:
            continue
        per_round.append({"round": rnd, "wall_s": nxt["t"] - marks[rnd]["t"], "replied": r["replied"],
                          "cpu_s": nxt["cpu"] - marks[rnd]["cpu"],
                          "cpu_ms_per_sampled_client": 1000 * (nxt["cpu"] - marks[rnd]["cpu"]) / r["sampled"],
                          "coordinator_rss_mb": r["coordinator_rss_mb"], "broker_rss_mb": r["broker_rss_mb"],
                          "senders_seen": r["senders_seen"], "pool_rss_mb": r["pool_rss_mb"]})
    warm = [r for r in per_round if r["round"] >= 5]
    result = {
        "setting": vars(args), "status": summary["status"], "rounds_completed": len(rows),
        "all_online_s": max(online.values()) if len(online) >= args.clients else None, "online": len(online),
        "status_messages_handled": statuses["n"], "ignored": summary.get("ignored"),
        "median_wall_s": statistics.median(r["wall_s"] for r in warm) if warm else None,
        "median_cpu_ms_per_sampled_client": statistics.median(r["cpu_ms_per_sampled_client"] for r in warm)
        if warm else None,
        "coordinator_rss_mb": {"round_5": warm[0]["coordinator_rss_mb"] if warm else None,
                               "last": per_round[-1]["coordinator_rss_mb"] if per_round else None},
        "broker_rss_mb": {"round_5": warm[0]["broker_rss_mb"] if warm else None,
                          "last": per_round[-1]["broker_rss_mb"] if per_round else None},
        "rounds": per_round, "marks": marks_sorted[:3],
    }
    out = Path(args.out)
    (out / "fleet_results.json").write_text(json.dumps(result, indent=2))
    lines = [f"status {summary['status']}, {len(rows)} rounds, {len(online)}/{args.clients} clients online "
             f"(all after {result['all_online_s'] or float('nan'):.1f} s), {statuses['n']} status messages handled",
             f"median round {result['median_wall_s'] or float('nan'):.2f} s, coordinator CPU "
             f"{result['median_cpu_ms_per_sampled_client'] or float('nan'):.1f} ms per sampled client per round",
             f"coordinator RSS {result['coordinator_rss_mb']}, broker RSS {result['broker_rss_mb']}"]
    print("\n".join(lines))
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
