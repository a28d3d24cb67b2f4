"""Round overhead beside the physical floor: ours vs raw paho + Mosquitto moving the same bytes.

    python benchmarks/bench_round.py [--clients 3,16] [--payloads mlp-dense,vgg16-fedpara,vgg16-dense]
                                     [--rounds 4] [--demo]

For each payload (about 1, 6 and 61 MB: the mlp dense, VGG16 FedPara gamma 0.1 and VGG16 dense
factor states) and each client count, in one run and on one fresh Mosquitto each:

* **raw floor**: paho only. One publisher sends the payload once on a fan-out topic in
  ``max_packet`` (1 MB) QoS 1 chunks; each of N subscribers (one process, one connection each,
  as our pool) returns the same number of bytes on its own topic in the same chunks; a round
  ends when every byte is back. No encoding, no signatures, no training.
* **ours**: the coordinator (signed, the default) and a ``fedpara client --pool N`` process with
  training stubbed to one local SGD step per client. Time per round = the interval between two
  consecutive rounds' tasks; non-training time = that minus the clients' training (the pool's
  clients train one at a time, so their train_s add up).

It prints and writes ``docs/results/round_results.{json,md}``: non-training time per round (median of
the rounds after the first), the floor, the ratio, and whether ours <= 1.2 x floor + 50 ms.
``--demo`` also runs ``fedpara demo`` with its defaults and reports, per round after the first,
wall time over the slowest client's training (goal <= 1.10).
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support import start_mosquitto  # noqa: E402

PAYLOADS = {  # name -> (model, scheme, ratio, data shape)
    "mlp-dense": ("mlp", "dense", 0.1, "1x28x28"),
    "vgg16-fedpara": ("vgg16", "fedpara", 0.1, "3x32x32"),
    "vgg16-dense": ("vgg16", "dense", 0.1, "3x32x32"),
}
MAX_PACKET = 1_000_000
BROKER_CONF = "max_queued_messages 100000\nmax_inflight_messages 64\n"


# --- the raw floor ---------------------------------------------------------------------------
def raw_floor(url: str, clients: int, size: int, rounds: int) -> list[float]:
    """Seconds per round for paho alone moving ``size`` bytes down once (fan-out) and ``size``
    bytes up from each of ``clients`` subscribers, in MAX_PACKET QoS 1 chunks."""
    import paho.mqtt.client as mqtt

    host, port = url.rsplit("//", 1)[1].split(":")
    chunks = [os.urandom(min(MAX_PACKET, size - off)) for off in range(0, size, MAX_PACKET)]
    base = f"floor/{secrets.token_hex(3)}"
    back: dict[int, int] = {}
    all_back = threading.Event()
    lock = threading.Lock()

    def connect(cid, on_message, topics):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True)
        c.max_inflight_messages_set(64)  # as fedpara.runtime.mqtt
        ready = threading.Event()

        def on_connect(client, userdata, flags, rc, props):
            for t in topics:
                client.subscribe(t, 1)

        def on_subscribe(client, userdata, mid, reason_codes, props):
            ready.set()  # SUBACK: from now on the broker delivers to us
        c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
        c.connect(host, int(port))
        c.loop_start()
        if not ready.wait(30):
            raise RuntimeError(f"raw floor: {cid} not subscribed after 30 s")
        return c

    def publish_all(c, topic, frames):
        infos = [c.publish(topic, f, qos=1) for f in frames]
        for i in infos:
            i.wait_for_publish(60)

    def on_reply(client, userdata, msg):
        i = int(msg.topic.rsplit("/", 1)[1])
        with lock:
            back[i] = back.get(i, 0) + len(msg.payload)
            if len(back) == clients and all(v >= size for v in back.values()):
                all_back.set()

    hub = connect(f"{base}-hub", on_reply, [f"{base}/up/+"])
    subs, got, workers = [], [0] * clients, []
    todo = [threading.Event() for _ in range(clients)]

    def make(i):
        def on_task(client, userdata, msg):
            got[i] += len(msg.payload)
            if got[i] >= size:
                got[i] = 0
                todo[i].set()
        return on_task

    stop = threading.Event()
    for i in range(clients):
        c = connect(f"{base}-{i}", make(i), [f"{base}/down"])
        subs.append(c)

        def work(i=i, c=c):
            while not stop.is_set():
                if todo[i].wait(0.5):
                    todo[i].clear()
                    publish_all(c, f"{base}/up/{i}", chunks)
        t = threading.Thread(target=work, daemon=True)
        t.start()
        workers.append(t)
    times = []
    try:
        for _ in range(rounds):
            back.clear()
            all_back.clear()
            t0 = time.perf_counter()
            publish_all(hub, f"{base}/down", chunks)
            if not all_back.wait(300):
                raise RuntimeError("raw floor: replies did not come back")
            times.append(time.perf_counter() - t0)
    finally:
        stop.set()
        for c in subs + [hub]:
            c.loop_stop()
            c.disconnect()
    return times


# --- ours --------------------------------------------------------------------------------------
def ours(url: str, clients: int, payload: str, rounds: int, tmp: Path, *, signed: bool = True) -> dict:
    from coordinator.config import CoordinatorConfig
    from coordinator.events import TaskSent
    from coordinator.server import Coordinator
    from fedpara.runtime.mqtt import parse_broker_url
    from fedpara.runtime.signing import new_key

    model, scheme, ratio, shape = PAYLOADS[payload]
    run_id = f"round-{secrets.token_hex(3)}"
    keys = tmp / f"keys-{run_id}"
    ids = [f"sim-{i:03d}" for i in range(clients)]
    for name in ["coordinator", *ids]:
        new_key(name, keys)
    n = 4 * clients  # 4 examples per client, batch 4: one SGD step each
    data = f"synthetic,n={n},shape={shape},classes=10,clients={clients}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pool = subprocess.Popen(
        [sys.executable, "-m", "fedpara.runtime.cli", "client", "--broker", url, "--run", run_id, "--client-id", "sim",
         "--pool", str(clients), "--threads", "1", "--device", "cpu", "--energy", "off", "--no-eval-local",
         *(["--key", str(keys), "--coordinator-pub", str(keys / "coordinator.pub")] if signed else ["--insecure"]),
         "--state-dir", str(tmp / f"clients-{run_id}"), "--data", data],
        env=env, stdout=open(tmp / f"pool-{run_id}.log", "w"), stderr=subprocess.STDOUT)
    sent: dict[int, float] = {}

    def on_event(e):
        if isinstance(e, TaskSent) and e.attempt == 1:
            sent[e.round] = time.perf_counter()

    try:
        cfg = CoordinatorConfig(run_id=run_id, model=model, scheme=scheme, ratio=ratio, rounds=rounds + 1,
                                min_clients=clients, wait_clients_s=300.0, round_deadline_s=300.0, lr=0.01,
                                batch_size=4, insecure=not signed,
                                coordinator_key=str(keys / "coordinator.key") if signed else "",
                                trusted_keys=str(keys) if signed else "",
                                test_data=f"synthetic,n={n},shape={shape},classes=10", max_packet=MAX_PACKET,
                                out=str(tmp / f"run-{run_id}"))
        coord = Coordinator(cfg, parse_broker_url(url), on_event=on_event)
        summary = coord.run()
        sent[rounds + 2] = sent[rounds + 1] + coord.rows[-1]["duration_s"]  # the last round has no successor
        rows = coord.rows
    finally:
        pool.terminate()
        try:
            pool.wait(30)
        except subprocess.TimeoutExpired:
            pool.kill()
    if summary["status"] != "completed":
        raise RuntimeError(f"ours: {summary['status']}")
    per_round = []
    for r in rows[1:]:  # round 1 includes connecting and the model build
        wall = sent[r["round"] + 1] - sent[r["round"]]
        train = sum(m.get("train_s", 0.0) for m in r["client_metrics"].values())
        per_round.append({"round": r["round"], "wall_s": wall, "train_s": train, "non_training_s": wall - train,
                          "timing": r.get("timing", {})})
    first = rows[0]
    return {"payload_bytes": first["bytes_down"] // first["receivers"] if first.get("receivers") else
            first["bytes_down"] // clients, "rounds": per_round}


def demo_ratio(tmp: Path) -> dict:
    """``fedpara demo`` with its defaults: wall per round / slowest client's training."""
    out = tmp / "demo"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "demo", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    wall = time.monotonic() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per = []
    for r in rows[1:]:
        slowest = max(m["train_s"] for m in r["client_metrics"].values())
        per.append({"round": r["round"], "wall_s": r["duration_s"], "slowest_train_s": slowest,
                    "ratio": r["duration_s"] / slowest, "timing": r.get("timing", {})})
    return {"wall_s": wall, "final_accuracy": rows[-1]["accuracy"], "rounds": per,
            "median_ratio": statistics.median(p["ratio"] for p in per)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="3,16", help="comma-separated client counts")
    p.add_argument("--payloads", default=",".join(PAYLOADS), help=f"comma-separated, of {', '.join(PAYLOADS)}")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds (one more runs first, unmeasured)")
    p.add_argument("--demo", action="store_true", help="also run fedpara demo and report wall / training")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    import torch

    from fedpara.runtime.memory import tune_malloc
    torch.set_num_threads(1)
    tune_malloc()  # this process runs the coordinator (and the floor), as `fedpara coordinator` would
    tmp = Path(tempfile.mkdtemp(prefix="bench-round-"))
    results = []
    for payload in args.payloads.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            broker, url = start_mosquitto(tmp, BROKER_CONF)
            try:
                mine = ours(url, clients, payload, args.rounds, tmp)
                plain = ours(url, clients, payload, args.rounds, tmp, signed=False)
                floor = raw_floor(url, clients, mine["payload_bytes"], args.rounds + 1)[1:]
            finally:
                broker.terminate()
                broker.wait(10)
            ours_s = statistics.median(r["non_training_s"] for r in mine["rounds"])
            plain_s = statistics.median(r["non_training_s"] for r in plain["rounds"])
            floor_s = statistics.median(floor)
            res = {"payload": payload, "clients": clients, "payload_mb": mine["payload_bytes"] / 1e6,
                   "ours_non_training_s": ours_s, "unsigned_non_training_s": plain_s, "floor_s": floor_s,
                   "ratio": ours_s / floor_s, "goal_met": ours_s <= 1.2 * floor_s + 0.05,
                   "ours_rounds": mine["rounds"], "unsigned_rounds": plain["rounds"], "floor_rounds": floor}
            results.append(res)
            print(f"{payload:14s} {clients:3d} clients {res['payload_mb']:7.2f} MB: ours {ours_s:.3f} s "
                  f"non-training (unsigned {plain_s:.3f}), floor {floor_s:.3f} s, ratio {res['ratio']:.2f}, "
                  f"goal {'met' if res['goal_met'] else 'MISSED'}", flush=True)
    demo = demo_ratio(tmp) if args.demo else None
    if demo:
        print(f"demo: wall / slowest training per round (after round 1): median {demo['median_ratio']:.3f} "
              f"({', '.join(format(r['ratio'], '.3f') for r in demo['rounds'])}); {demo['wall_s']:.0f} s, "
              f"accuracy {demo['final_accuracy']:.4f}")
    out = Path(args.out)
    (out / "round_results.json").write_text(json.dumps({"setting": vars(args), "results": results, "demo": demo},
                                                       indent=2))
    lines = ["| payload | MB | clients | ours non-training s (signed) | unsigned | raw floor s | ratio (signed) "
             "| <= 1.2 x floor + 50 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['payload']} | {r['payload_mb']:.2f} | {r['clients']} | {r['ours_non_training_s']:.3f} "
                     f"| {r['unsigned_non_training_s']:.3f} | {r['floor_s']:.3f} | {r['ratio']:.2f} "
                     f"| {'yes' if r['goal_met'] else 'no'} |")
    (out / "round_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
