"""Mixed fleets: sync rounds vs asynchronous buffered versions (docs/async.md), time / bytes /
joules to a target accuracy, with the slow devices held back by the kernel (cgroup CPU quotas of
the lab's device profiles, deploy/lab/profiles.toml), not by sleeps.

    nice -n 10 .venv/bin/python benchmarks/bench_async.py [--seeds 3] [--out docs/results]

Each run is a real ``fedpara demo --device-profiles ...``: a broker, a signed coordinator and one
client process per profile inside its cgroup (edge_client/devprofile.py). Per fleet mix and seed:

- ``sync``: rounds wait for every client (the deadline never bites);
- ``sync-partial``: the deadline set to what the fast half needs, ``min_reply_fraction 0.5``:
  a round aggregates what arrived and the slow devices' work is dropped (the deadline: 1.5x the
  fast half's training time in the sync run of the same seed, + 0.5 s; a longer one waits for
  the slow devices, a shorter one loses fast ones too);
- ``async``: ``buffer_size`` = half the fleet, ``max_staleness`` 8, every idle device retrained.

Every mode gets the same budget of client updates (sync R rounds x N clients = async R x N / B
versions). The client lr is the per-model, per-scheme default chosen on a validation split
(fedpara/lr.py) for every mode. Time to a target is the ``wall_s`` of the first metrics line at
or above it; bytes and joules are summed up to that line (MQTT-framed, both directions; joules
from the profiles' estimates, labelled as such). Writes ``async_results.json`` and
``async_results.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIXES = {  # each: the device profiles of one fleet (one client each)
    "pi4-pi4-pi5-laptop": ["pi4-1gb", "pi4-1gb", "pi5-4gb", "laptop"],
    "nano-pi5-laptop-laptop": ["jetson-nano-4gb", "pi5-4gb", "laptop", "laptop"],
}
TARGETS = (0.75, 0.78, 0.80)


def run(out: Path, profiles: list[str], mode: str, seed: int, rounds: int, limit: int, extra: list[str],
        epochs: int = 2) -> dict:
    if (out / "summary.json").exists():  # resumable benchmark: a finished run is kept
        return load(out)
    cmd = [sys.executable, "-m", "fedpara.runtime.cli", "demo", "--model", "mlp", "--device-profiles",
           ",".join(profiles), "--rounds", str(rounds), "--seed", str(seed), "--limit", str(limit),
           "--partition", "iid", "--out", str(out), "--local-epochs", str(epochs), "--mode", "async" if mode == "async" else "sync", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    r = load(out)
    r["process_s"] = time.monotonic() - t0
    return r


def load(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = []
    mb = joules = 0.0
    for row in rows:
        mb += (row["mqtt_bytes_down"] + row["mqtt_bytes_up"]) / 1e6
        joules += row.get("energy_j") or 0.0
        # the training clock: from the first task (the devices' start-up, the same in every mode, is left out)
        curve.append({"wall_s": row["wall_s"] - (row.get("first_task_s") or 0.0), "accuracy": row["accuracy"], "mb": mb, "joules": joules,
                      "staleness": list((row.get("staleness") or {}).values()), "clients": row["clients"]})
    train_s: dict[str, list[float]] = {}  # client -> its local training times (the profiles' real speed)
    for row in rows:
        for client, m in (row.get("client_metrics") or {}).items():
            if isinstance(m.get("train_s"), (int, float)):
                train_s.setdefault(client, []).append(m["train_s"])
    return {"curve": curve, "final_accuracy": rows[-1]["accuracy"], "wall_s": rows[-1]["wall_s"],
            "train_s": {c: statistics.median(v) for c, v in sorted(train_s.items())}}


def to_target(r: dict, target: float) -> dict | None:
    for point in r["curve"]:
        if point["accuracy"] is not None and point["accuracy"] >= target:
            return {k: point[k] for k in ("wall_s", "mb", "joules")}
    return None


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def partial_deadline(sync_run: dict) -> float:
    """What the fast half of the fleet needs: 1.5 x the slowest of the faster half's median training
    times in the sync run, plus 0.5 s for the transfers."""
    times = sorted(sync_run["train_s"].values())
    fast = times[: max(1, len(times) // 2)]
    return round(1.5 * fast[-1] + 0.5, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8, help="sync rounds (async: the same number of updates)")
    p.add_argument("--limit", type=int, default=3000, help="training examples per client")
    p.add_argument("--epochs", type=int, default=2, help="local epochs per task")
    p.add_argument("--mixes", default=",".join(MIXES))
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-async"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    results: dict = {"setting": vars(args), "mixes": {}}
    for mix in args.mixes.split(","):
        profiles = MIXES[mix]
        n = len(profiles)
        buffer = max(1, n // 2)
        res = results["mixes"][mix] = {"profiles": profiles, "buffer_size": buffer, "runs": {}}
        for seed in range(args.seeds):
            sync = run(runs / mix / f"sync-{seed}", profiles, "sync", seed, args.rounds, args.limit, [], args.epochs)
            deadline = partial_deadline(sync)
            partial = run(runs / mix / f"sync-partial-{seed}", profiles, "sync", seed, args.rounds, args.limit,
                          ["--deadline", str(deadline), "--min-reply-fraction", "0.5"], args.epochs)
            partial["deadline_s"] = deadline
            asyn = run(runs / mix / f"async-{seed}", profiles, "async", seed, args.rounds * n // buffer, args.limit,
                       ["--buffer-size", str(buffer), "--max-staleness", "8"], args.epochs)
            for mode, r in (("sync", sync), ("sync-partial", partial), ("async", asyn)):
                res["runs"].setdefault(mode, []).append(r)
            print(f"{mix} seed {seed}: final sync {sync['final_accuracy']:.4f} in {sync['wall_s']:.0f} s, "
                  f"partial {partial['final_accuracy']:.4f} in {partial['wall_s']:.0f} s (deadline {deadline} s), "
                  f"async {asyn['final_accuracy']:.4f} in {asyn['wall_s']:.0f} s", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "async_results.json").write_text(json.dumps(results, indent=1))
    write_md(results, out / "async_results.md")
    print((out / "async_results.md").read_text())
    return 0


def write_md(results: dict, path: Path) -> None:
    s = results["setting"]
    lines = ["# Mixed fleets: sync vs async (benchmarks/bench_async.py)", "",
             f"mlp (FedPara, ratio 0.1) on Fashion-MNIST, IID, {s['limit']} training examples per client, "
             f"{s['epochs']} local epochs, "
             f"{s['rounds']} sync rounds or the same number of client updates, {s['seeds']} seeds; each client a "
             "`fedpara client` process in the cgroup of its device profile (CPU quota and memory). "
             "Seconds count from the first task (the devices' start-up is left out). "
             "Mean ± sd over the seeds that reached the target (n = how many did).", ""]
    for mix, res in results["mixes"].items():
        lines += [f"## {mix} ({', '.join(res['profiles'])}; async buffer {res['buffer_size']})", "",
                  "| mode | final accuracy | s to the last round | " + " | ".join(
                      f"to {t:.0%}: s / MB / J (n)" for t in TARGETS) + " |",
                  "|---|---|---|" + "---|" * len(TARGETS)]
        base: dict = {}
        for mode, rs in res["runs"].items():
            acc = mean_sd([r["final_accuracy"] for r in rs])
            wall = mean_sd([r["curve"][-1]["wall_s"] for r in rs])  # from the first task
            cells = []
            for t in TARGETS:
                hits = [h for r in rs if (h := to_target(r, t)) is not None]
                if not hits:
                    cells.append("not reached")
                    continue
                ws, mbs, js = (mean_sd([h[k] for h in hits]) for k in ("wall_s", "mb", "joules"))
                if mode == "sync":
                    base[t] = ws[0]
                ratio = f" ({ws[0] / base[t]:.2f}x sync)" if mode != "sync" and base.get(t) else ""
                cells.append(f"{ws[0]:.1f} ± {ws[1]:.1f}{ratio} / {mbs[0]:.1f} / {js[0]:.0f} ({len(hits)})")
            lines.append(f"| {mode} | {acc[0]:.2%} ± {acc[1]:.2%} | {wall[0]:.1f} ± {wall[1]:.1f} | "
                         + " | ".join(cells) + " |")
        speeds = []
        for i, prof in enumerate(res["profiles"]):
            ts = [r["train_s"].get(f"client-{i}") for r in res["runs"].get("sync", [])]
            ts = [t for t in ts if t is not None]
            if ts:
                speeds.append(f"client-{i} ({prof}) {statistics.median(ts):.1f} s")
        if speeds:
            lines += ["", "Median local training time per task in the sync runs (what the kernel let each device do "
                      "on the shared host): " + ", ".join(speeds) + "."]
        stale = [s for r in res["runs"].get("async", []) for p in r["curve"] for s in p["staleness"]]
        if stale:
            lines += ["", f"async staleness over all updates: mean {statistics.fmean(stale):.2f}, max {max(stale)}."]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
