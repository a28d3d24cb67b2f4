"""A site broker bridged to a central one: what each hop carried in a real run.

    python benchmarks/bench_bridge.py [--clients 3] [--rounds 3] [--model cnn28]

Two Mosquitto instances (tests/support.py ``start_bridged_brokers``): the clients on the site
broker, the coordinator (signed) on the central one, ``fedpara/v1/#`` bridged both ways. Every
PUBLISH is read from the brokers' ``log_type all`` logs, per peer and topic, and compared with
the coordinator's own counts. Writes docs/results/bridge_results.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support import TRAIN, publish_bytes_by_peer, start_bridged_brokers  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="cnn28")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from coordinator.config import CoordinatorConfig
    from coordinator.server import Coordinator
    from edge_client.client import EdgeClient
    from edge_client.config import ClientConfig
    from fedpara.runtime.mqtt import parse_broker_url
    from fedpara.runtime.signing import new_key

    tmp = Path(tempfile.mkdtemp(prefix="bench-bridge-"))
    (central, cport), (site, sport) = start_bridged_brokers(tmp)
    run_id = f"bridge-{secrets.token_hex(3)}"
    keys = tmp / "keys"
    ids = [f"c{i}" for i in range(args.clients)]
    for name in ["coordinator", *ids]:
        new_key(name, keys)
    clients = []
    try:
        for i, cid in enumerate(ids):
            c = EdgeClient(ClientConfig(client_id=cid, run_id=run_id, data=TRAIN.format(n=args.clients, i=i),
                                        state_dir=str(tmp / cid), key=str(keys / f"{cid}.key"),
                                        coordinator_pub=str(keys / "coordinator.pub"), energy="off"),
                           parse_broker_url(f"mqtt://127.0.0.1:{sport}"))
            c.start()
            clients.append(c)
        cfg = CoordinatorConfig(run_id=run_id, model=args.model, rounds=args.rounds, min_clients=args.clients,
                                coordinator_key=str(keys / "coordinator.key"), trusted_keys=str(keys),
                                test_data="fashion-mnist,limit=2000", out=str(tmp / "run"))
        summary = Coordinator(cfg, parse_broker_url(f"mqtt://127.0.0.1:{cport}")).run()
    finally:
        for c in clients:
            c.stop()
        time.sleep(0.5)
        for proc in (site, central):
            proc.terminate()
            proc.wait(10)
    wan = publish_bytes_by_peer((tmp / "central" / "mosquitto.log").read_text())
    lan = publish_bytes_by_peer((tmp / "site" / "mosquitto.log").read_text())
    base = f"fedpara/v1/{run_id}/"

    def total(side, direction, peers, prefix):
        return sum(n for peer, per in side[direction].items() if peers(peer)
                   for topic, n in per.items() if topic.startswith(base + prefix))

    bridge = lambda peer: peer == "site-bridge"  # noqa: E731
    coordinator = lambda peer: peer.startswith("coordinator-")  # noqa: E731
    device = lambda peer: not bridge(peer) and not coordinator(peer)  # noqa: E731
    hops = {
        "coordinator -> central (tasks, control, status)": total(wan, "rx", coordinator, ""),
        "central -> site over the bridge (tasks)": total(wan, "tx", bridge, "task"),
        "site -> devices (tasks)": total(lan, "tx", device, "task"),
        "devices -> site (updates + reports)": total(lan, "rx", device, "update"),
        "site -> central over the bridge (updates + reports)": total(wan, "rx", bridge, "update"),
        "central -> coordinator (updates + reports)": total(wan, "tx", coordinator, "update"),
        "devices -> site (statuses)": total(lan, "rx", device, "status"),
        "site -> central over the bridge (statuses)": total(wan, "rx", bridge, "status"),
    }
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    own = {"coordinator bytes_down (payload, all copies)": sum(r["bytes_down"] for r in rows),
           "coordinator bytes_up (accepted updates)": sum(r["bytes_up"] for r in rows)}
    result = {"setting": vars(args), "status": summary["status"], "accuracy": summary["final_accuracy"],
              "hops_publish_payload_bytes": hops, "coordinator_counts": own}
    out = Path(args.out)
    (out / "bridge_results.json").write_text(json.dumps(result, indent=2))
    lines = [f"`python benchmarks/bench_bridge.py --clients {args.clients} --rounds {args.rounds} --model "
             f"{args.model}`: status {summary['status']}, accuracy {summary['final_accuracy']:.4f}.", "",
             "| hop | PUBLISH payload MB |", "|---|---|"]
    lines += [f"| {k} | {v / 1e6:.3f} |" for k, v in hops.items()]
    lines += ["", "| the coordinator's own count | MB |", "|---|---|"]
    lines += [f"| {k} | {v / 1e6:.3f} |" for k, v in own.items()]
    (out / "bridge_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
