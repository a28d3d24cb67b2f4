"""Round time under a shaped link: dense vs FedPara (ratio 0.1) vs FedPara + fp16+zstd vs ``lean``.

Each client runs in its own network namespace behind a veth pair shaped with ``tc tbf`` (default
2 Mbit/s each way); the broker (Mosquitto, or the embedded amqtt) and the coordinator run in a hub
namespace (benchmarks/netns.py: nothing is created in the root namespace). Local training is kept
tiny (``limit=`` examples, 1 epoch) so that communication dominates; the per-round wall time is
the coordinator's ``duration_s`` in metrics.jsonl. Needs root, iproute2 and tc.

    sudo .venv/bin/python -m benchmarks.bench_link --model cnn28 --rate 2mbit
    sudo .venv/bin/python -m benchmarks.bench_link --model vgg16 --rate 20mbit

Writes/merges docs/results/bandwidth_results.json (one entry per model/rate/clients setting) and rewrites
the results table in docs/bandwidth.md between the bench_link markers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.netns import LinkLab, parse_rate, ss_bytes  # noqa: E402
from fedpara.runtime.rundir import RunDir  # noqa: E402
from fedpara.wire.lean import LEAN_DOWNLINK, LEAN_UPLINK  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import MOSQUITTO, mosquitto_conf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_link")

CASES = {
    "dense": {"scheme": "dense", "ratio": None, "downlink": "fp32", "uplink": "fp32"},
    "fedpara": {"scheme": "fedpara", "ratio": 0.1, "downlink": "fp32", "uplink": "fp32"},
    "fedpara-fp16zstd": {"scheme": "fedpara", "ratio": 0.1, "downlink": "fp16+zstd:3",
                         "uplink": "fp16+zstd:3"},
    # wire = "lean": 2-bit deltas both ways with error feedback (docs/compression.md)
    "fedpara-lean": {"scheme": "fedpara", "ratio": 0.1, "downlink": LEAN_DOWNLINK, "uplink": LEAN_UPLINK,
                     "wire": "lean"},
}
BEGIN, END = "<!-- bench_link:begin -->", "<!-- bench_link:end -->"


def fedpara_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "fedpara"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedpara.runtime.cli"]


def data_specs(model: str, n_clients: int, limit: int) -> tuple[list[str], str]:
    if model == "vgg16":  # 3x32x32; CIFAR is not available offline: synthetic images of that shape
        n = max(limit * n_clients, 64)
        train = [f"synthetic,n={n},shape=3x32x32,classes=10,partition=iid,clients={n_clients},index={i},limit={limit}"
                 for i in range(n_clients)]
        return train, "synthetic,n=40,shape=3x32x32,classes=10"  # 10 test images
    train = [f"fashion-mnist,partition=iid,clients={n_clients},index={i},limit={limit}" for i in range(n_clients)]
    return train, "fashion-mnist,limit=200"


class SsPoller(threading.Thread):
    """Polls ``ss -ti`` in each client namespace; keeps the last TCP_INFO byte counters."""

    def __init__(self, lab: LinkLab, port: int, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.lab, self.port, self.period = lab, port, period
        self.last: dict[int, dict] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for link in self.lab.links:
                conns = ss_bytes(self.lab, link.ns, self.port)
                if conns:
                    self.last[link.index] = conns[0]
            self.halt.wait(self.period)


def start_broker(lab: LinkLab, impl: str, port: int, work: Path) -> subprocess.Popen:
    if impl == "mosquitto":
        # listens on every address of the hub namespace only (its lo and the veth ends)
        conf = mosquitto_conf(work, port, host=None)
        proc = lab.popen(lab.hub, [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        proc = lab.popen(lab.hub, [sys.executable, "-m", "coordinator.broker", "--host", "0.0.0.0", "--port", str(port)],
                         cwd=ROOT, stdout=open(work / "broker.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while f":{port}" not in lab.exec(lab.hub, ["ss", "-ltnH"]):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{impl} broker did not start (see {work})")
        time.sleep(0.1)
    return proc


def run_case(lab: LinkLab, name: str, case: dict, args, port: int, work: Path) -> dict:
    run_id = f"bw-{name}-{uuid.uuid4().hex[:6]}"
    cdir = work / name
    cdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    train, test = data_specs(args.model, args.clients, args.limit)
    tc0 = lab.tc_stats()
    poller = SsPoller(lab, port)
    poller.start()
    clients = []
    for link in lab.links:
        clients.append(lab.popen(link.ns, fedpara_cmd() + [
            "client", "--broker", f"mqtt://{link.hub_addr}:{port}", "--run", run_id,
            "--client-id", f"c{link.index}", "--data", train[link.index], "--energy", "off",
            "--threads", "1", "--device", "cpu", "--state-dir", str(cdir / f"state{link.index}"),
            "--insecure"],
            env=env, cwd=cdir, stdout=open(cdir / f"client{link.index}.log", "w"), stderr=subprocess.STDOUT))
    # let the clients connect (and import torch) before the coordinator's round clock starts
    deadline = time.monotonic() + 60
    while len(poller.last) < len(lab.links) and time.monotonic() < deadline:
        time.sleep(0.2)
    coord_argv = fedpara_cmd() + [
        "coordinator", "--broker", f"mqtt://127.0.0.1:{port}", "--run", run_id, "--rounds", str(args.rounds),
        "--model", args.model, "--scheme", case["scheme"], "--downlink", case["downlink"],
        "--uplink", case["uplink"], "--test-data", test, "--min-clients", str(args.clients),
        "--deadline", str(args.deadline), "--batch-size", str(args.batch_size), "--lr", "0.05",
        "--out", str(cdir / "run"), "--insecure", "--wire", case.get("wire", "plain")]
    if case["ratio"] is not None:
        coord_argv += ["--ratio", str(case["ratio"])]
    t0 = time.monotonic()
    coord = lab.popen(lab.hub, coord_argv, env=env, cwd=cdir, stdout=open(cdir / "coordinator.log", "w"),
                      stderr=subprocess.STDOUT)
    try:
        coord.wait(timeout=args.case_timeout)
        for c in clients:
            c.wait(timeout=30)
    except subprocess.TimeoutExpired:
        log.error("%s: timed out after %ss; see %s", name, args.case_timeout, cdir)
    wall = time.monotonic() - t0
    poller.halt.set()
    poller.join()
    for p in [coord, *clients]:
        lab.stop(p)
    tc1 = lab.tc_stats()
    rows = RunDir(cdir / "run").read_metrics()
    if coord.returncode != 0 or len(rows) < args.rounds:
        raise RuntimeError(f"case {name} failed (rc {coord.returncode}, {len(rows)} rounds); logs in {cdir}:\n"
                           + (cdir / "coordinator.log").read_text()[-3000:])
    durations = [r["duration_s"] for r in rows]
    steady = durations[1:] if len(durations) > 1 else durations
    bps = parse_rate(args.rate)
    up_bps = parse_rate(args.uplink_rate or args.rate)
    # per round figures are the last round's (round 1 can differ slightly: codec output, metrics)
    per_copy_down = rows[-1]["mqtt_bytes_down"] / max(1, len(lab.links))
    per_client_up = rows[-1]["mqtt_bytes_up"] / max(1, rows[-1]["replied"])
    link_bytes = {dev: tc1[dev]["bytes"] - tc0.get(dev, {}).get("bytes", 0) for dev in tc1}
    return {
        "case": name, **case, "run_id": run_id, "rounds": len(rows),
        "duration_s": durations, "mean_round_s": statistics.mean(durations),
        "steady_round_s": statistics.mean(steady),
        "accuracy": [r["accuracy"] for r in rows],
        "payload_bytes_down_per_client": rows[-1]["bytes_down"] / max(1, len(lab.links)),
        "payload_bytes_up_per_client": rows[-1]["bytes_up"] / max(1, rows[-1]["replied"]),
        "mqtt_bytes_down_per_client": per_copy_down, "mqtt_bytes_up_per_client": per_client_up,
        # whole run, to compare with the clients' TCP counters
        "mqtt_bytes_down_total_per_client": sum(r["mqtt_bytes_down"] for r in rows) / max(1, len(lab.links)),
        "mqtt_bytes_up_total": sum(r["mqtt_bytes_up"] for r in rows),
        # the lower bound a perfect link would give: down and up each at the shaped rate
        "link_floor_s": per_copy_down * 8 / bps + per_client_up * 8 / up_bps,
        "tcp_bytes_per_client": {f"c{i}": {k: v for k, v in s.items() if k != "conn"} for i, s in poller.last.items()},
        "tc_bytes": link_bytes,
        "tc_dropped": {dev: tc1[dev]["dropped"] - tc0.get(dev, {}).get("dropped", 0) for dev in tc1},
        "wall_s": wall,
    }


def render_table(results: dict) -> str:
    lines = ["| model | link (each client, each way) | clients | case | wire (down/up per client, MQTT) "
             "| round time (s, per round) | steady round (s) | link floor (s) | dense / case |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in results.get("runs", []):
        dense = entry["cases"].get("dense", {}).get("steady_round_s")
        for name, c in entry["cases"].items():
            ratio = f"{dense / c['steady_round_s']:.1f}x" if dense and name != "dense" else "1.0x" if name == "dense" else "-"
            lines.append(
                f"| {entry['model']} | {entry['rate']} | {entry['clients']} | {name}"
                f"{'' if c['downlink'] == 'fp32' else ' (' + c['downlink'] + ')'} "
                f"| {c['mqtt_bytes_down_per_client'] / 1e6:.2f} / {c['mqtt_bytes_up_per_client'] / 1e6:.2f} MB "
                f"| {', '.join(f'{d:.1f}' for d in c['duration_s'])} | {c['steady_round_s']:.1f} "
                f"| {c['link_floor_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def write_outputs(entry: dict, json_path: Path, md_path: Path | None) -> dict:
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    runs = [r for r in results.get("runs", []) if r.get("key") != entry["key"]]
    runs.append(entry)
    results = {"description": "benchmarks/bench_link.py: per-round wall time under tc tbf shaped links",
               "runs": sorted(runs, key=lambda r: r["key"])}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    if md_path is not None and md_path.exists():
        text = md_path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            md_path.write_text(f"{head}{BEGIN}\n{render_table(results)}\n{END}{tail}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_link", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rate", default="2mbit", help="tc tbf rate of every client link, both directions")
    p.add_argument("--uplink-rate", help="client -> broker rate if different (default --rate)")
    p.add_argument("--model", default="cnn28", choices=["cnn28", "vgg16", "mlp"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cases", default="dense,fedpara,fedpara-fp16zstd,fedpara-lean",
                   help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--limit", type=int, default=32, help="training examples per client (tiny on purpose)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--deadline", type=float, default=900.0, help="coordinator round deadline (s)")
    p.add_argument("--case-timeout", type=float, default=1200.0)
    p.add_argument("--broker", choices=["mosquitto", "amqtt"], default="mosquitto")
    p.add_argument("--port", type=int, default=1883, help="broker port inside the hub namespace")
    p.add_argument("--prefix", default="fpbw", help="namespace/interface name prefix")
    p.add_argument("--subnet", default="10.213.0.0/24")
    p.add_argument("--force-cleanup", action="store_true", help="delete leftover namespaces of this prefix first")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bandwidth_results.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "bandwidth.md")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, metrics)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if bad:
        p.error(f"unknown case(s) {bad}; choose from {list(CASES)}")

    work = Path(tempfile.mkdtemp(prefix="bench_link-"))
    t_start = time.monotonic()
    cases = {}
    try:
        with LinkLab(n_clients=args.clients, rate=args.rate, uplink_rate=args.uplink_rate, prefix=args.prefix,
                     subnet=args.subnet, force_cleanup=args.force_cleanup) as lab:
            start_broker(lab, args.broker, args.port, work)
            for name in names:
                log.info("case %s: %s", name, CASES[name])
                res = run_case(lab, name, CASES[name], args, args.port, work)
                cases[name] = res
                log.info("case %s: rounds %s s (steady %.1f s, link floor %.1f s), down %.2f MB up %.2f MB per client",
                         name, [round(d, 1) for d in res["duration_s"]], res["steady_round_s"], res["link_floor_s"],
                         res["mqtt_bytes_down_per_client"] / 1e6, res["mqtt_bytes_up_per_client"] / 1e6)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log.info("work directory kept: %s", work)
    dense = cases.get("dense", {}).get("steady_round_s")
    for name, c in cases.items():
        if dense and name != "dense":
            c["speedup_vs_dense"] = dense / c["steady_round_s"]
    entry = {"key": f"{args.model}@{args.rate}/{args.uplink_rate or args.rate}x{args.clients}",
             "model": args.model, "rate": args.rate if not args.uplink_rate else f"{args.rate} down / {args.uplink_rate} up",
             "clients": args.clients, "rounds": args.rounds, "limit": args.limit, "batch_size": args.batch_size,
             "broker": args.broker, "total_wall_s": time.monotonic() - t_start,
             "machine": f"{os.cpu_count()} CPUs, {os.uname().release}", "cases": cases,
             "date": time.strftime("%Y-%m-%d")}
    write_outputs(entry, args.json, args.md)
    print(render_table({"runs": [entry]}))
    print(f"total {entry['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
