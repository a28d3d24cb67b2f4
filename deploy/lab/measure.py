#!/usr/bin/env python3
"""Measure each device profile (deploy/lab/profiles.toml) training each model, in the lab: one
client inside the profile's cgroup (``fedpara client --profile``) and a coordinator on this host
over a real Mosquitto, one round each (docs/lab.md, "Measured").

Per (profile, model): the round's wall time (task out -> update in), the client's training time,
its peak RSS against the profile's memory limit, the estimated energy of the round with that
device class's figures, and the outcome: trained, refused by the fit check (with its reason), or
killed by the kernel. Root (cgroups), Mosquitto and the data (Fashion-MNIST; Shakespeare through
``fedpara fetch shakespeare``) are needed.

    deploy/lab/measure.py [--profiles a,b] [--models cnn28,mlp,char_lstm] [--out docs/results/lab_results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from edge_client.devprofile import load_profiles, unavailable_reason  # noqa: E402
from fedpara.data import parse_data_spec  # noqa: E402

DATA = {  # one client's share, as in docs/results/footprint.md (char_lstm: fewer lines, for the slow profiles)
    "cnn28": ("fashion-mnist,partition=iid,clients=10,index=0", "fashion-mnist,limit=1000"),
    "mlp": ("fashion-mnist,partition=iid,clients=10,index=0", "fashion-mnist,limit=1000"),
    "char_lstm": ("shakespeare,clients=10,index=0,limit=500", "shakespeare,limit=500"),
}
MB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(fedpara: str, broker: str, profile: str, model: str, work: Path, timeout: float,
        fit_check: bool = True) -> dict:
    run_id = f"lab-{profile}-{model}".replace("_", "-")
    out = work / run_id
    train, test = DATA[model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if fit_check else {"FEDPARA_FIT_CHECK": "0"})}
    coord = subprocess.Popen([fedpara, "coordinator", "--broker", broker, "--run", run_id, "--model", model,
                              "--num-classes", str(parse_data_spec(test).num_classes), "--rounds", "1",
                              "--min-clients", "1", "--batch-size", "32", "--test-data", test, "--insecure",
                              "--deadline", str(timeout), "--wait-clients-s", "600", "--max-attempts", "1",
                              "--out", str(out)],
                             stdout=open(work / f"{run_id}-coordinator.log", "wb"), stderr=subprocess.STDOUT, env=env)
    report = work / f"{run_id}-profile.json"
    client = subprocess.Popen([fedpara, "-v", "client", "--profile", profile, "--profile-report", str(report),
                               "--broker", broker, "--run", run_id, "--client-id", "c0", "--data", train,
                               "--threads", "1", "--insecure", "--state-dir", str(work / f"{run_id}-state")],
                              stdout=subprocess.DEVNULL, stderr=open(work / f"{run_id}-client.log", "wb"), env=env)
    t0 = time.monotonic()
    try:
        coord.wait(timeout + 660)
    except subprocess.TimeoutExpired:
        coord.kill()
    try:
        client.wait(60)
    except subprocess.TimeoutExpired:
        client.terminate()
        client.wait(30)
    result: dict = {"profile": profile, "model": model, "data": train, "wall_s": round(time.monotonic() - t0, 1),
                    "fit_check": fit_check}
    prof = json.loads(report.read_text()) if report.exists() else {}
    result.update(peak_rss_mb=round(prof["peak_rss_bytes"] / MB) if prof.get("peak_rss_bytes") else None,
                  limit_mb=round(prof.get("memory_limit_bytes", 0) / MB), cpu_quota=prof.get("cpu_quota"),
                  oom_kills=prof.get("oom_kills"), exit_code=prof.get("exit_code"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (out / "metrics.jsonl").exists() else []
    client_log = (work / f"{run_id}-client.log").read_text(errors="replace")
    if rows and "c0" in rows[0].get("client_metrics", {}):
        m = rows[0]["client_metrics"]["c0"]
        energy = m.get("energy", {})
        over = result["peak_rss_mb"] is not None and result["peak_rss_mb"] > result["limit_mb"]
        result.update(outcome="trained, but peak RSS over the device's memory" if over else "trained", round_s=round(rows[0]["duration_s"], 1), train_s=round(m["train_s"], 1),
                      steps=m.get("steps"), energy_j=round(energy.get("total_j", 0.0), 2),
                      energy_source=energy.get("source"))
    elif prof.get("oom_kills"):
        result.update(outcome="killed by the kernel (OOM)")
    else:
        reason = re.search(r"TaskDoesNotFit: (.*)", client_log + (work / f"{run_id}-coordinator.log").read_text())
        result.update(outcome="refused (fit check)" if reason else "failed",
                      reason=reason.group(1).strip().rstrip(")") if reason else client_log.strip().splitlines()[-1:])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profiles", default=",".join(load_profiles()))
    ap.add_argument("--models", default="cnn28,mlp,char_lstm")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lab_results.json")
    ap.add_argument("--timeout", type=float, default=1200.0, help="round deadline, seconds")
    ap.add_argument("--fedpara", default=str(Path(sys.executable).parent / "fedpara"))
    ap.add_argument("--no-fit-check", action="store_true",
                    help="clients without the fit check (FEDPARA_FIT_CHECK=0): what the kernel does instead")
    args = ap.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    work = Path(tempfile.mkdtemp(prefix="fedpara-lab-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                         + ("user root\n" if os.geteuid() == 0 else ""))
    broker_proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    results = []
    try:
        for profile in args.profiles.split(","):
            for model in args.models.split(","):
                r = one(args.fedpara, f"mqtt://127.0.0.1:{port}", profile, model, work, args.timeout,
                        fit_check=not args.no_fit_check)
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        broker_proc.terminate()
        broker_proc.wait(10)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "host": os.uname().machine,
                                    "cpus": os.cpu_count(), "work": str(work), "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
