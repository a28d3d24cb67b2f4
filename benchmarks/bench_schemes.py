"""Dense vs low-rank vs FedPara, trained for real over MQTT: accuracy and bytes to a target accuracy.

    python benchmarks/bench_schemes.py [--rounds 8] [--limit 6000] [--partitions iid,dirichlet:0.5]
                                       [--ratio 0.1] [--fp16 [--fp16-partitions iid]] [--out docs]

docs/results/schemes.md was made with (10.7 min on 2 cores):

    .venv/bin/python benchmarks/bench_schemes.py --rounds 8 --limit 6000 \
        --partitions iid,dirichlet:0.5 --fp16 --fp16-partitions iid --runs runs/schemes-final

Checks the shape of the paper's headline comparison (FedPara, ICLR 2022):
at the same parameter budget FedPara beats the conventional low-rank baseline, gets close to the
dense model, and needs far fewer bytes to reach a target accuracy.

For every partition and codec, each scheme (dense, lowrank, fedpara at the same gamma) runs the
*same* federated experiment through ``fedpara demo`` as a subprocess (embedded MQTT broker,
coordinator, N client processes; same seed, partition, clients, rounds, local epochs, lr, batch,
per-client example cap). The runs are sequential so they do not compete for the CPU. Each run's
``metrics.jsonl`` gives the test accuracy and the MQTT bytes (down + up) per round, as counted by
the coordinator at the MQTT layer. Written: ``schemes_results.json``, ``schemes.md`` and
``schemes.png`` in ``--out``; the run directories stay under ``--runs``.

``--fp16`` adds the fp16+zstd:3 codec (both directions) as a second table; ``--runs DIR
--report-only`` rebuilds the outputs from an earlier invocation's run directories without training
(with the setting recorded there; a hand-written "### Reading the numbers" section in schemes.md
is kept).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpara.runtime.rundir import RunDir  # noqa: E402

SCHEMES = ["dense", "lowrank", "fedpara"]
CODECS = {"fp32": "fp32", "fp16": "fp16+zstd:3"}
COLORS = {"dense": "#444444", "lowrank": "#d62728", "fedpara": "#1f77b4"}


def fedpara_exe() -> list[str]:
    exe = Path(sys.executable).with_name("fedpara")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "fedpara.runtime.cli"]


def slug(s: str) -> str:
    return s.replace(":", "").replace(".", "").replace("+", "-").replace(",", "-")


def run_one(args, scheme: str, partition: str, codec: str, run_dir: Path) -> dict:
    cmd = fedpara_exe() + [
        "demo", "--scheme", scheme, "--ratio", str(args.ratio), "--model", args.model,
        "--clients", str(args.clients), "--rounds", str(args.rounds), "--partition", partition,
        "--local-epochs", str(args.local_epochs), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--out", str(run_dir),
        "--uplink", CODECS[codec], "--downlink", CODECS[codec]]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {partition:>14} {codec} {scheme:>8}: "
          + " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    with open(run_dir / "demo.log", "wb") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.run_timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        tail = (run_dir / "demo.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{scheme}/{partition}/{codec}: fedpara demo exited {proc.returncode}\n{tail}")
    return {"cmd": " ".join(["fedpara"] + cmd[len(fedpara_exe()):]), "wall_s": wall}


def load_run(run_dir: Path) -> dict:
    rows, summary = RunDir(run_dir).read_metrics(), RunDir(run_dir).read_summary()
    if summary.get("status") != "completed":
        raise RuntimeError(f"{run_dir}: status {summary.get('status')}")
    acc = [r["accuracy"] for r in rows]
    per_round = [r["mqtt_bytes_down"] + r["mqtt_bytes_up"] for r in rows]
    cum, tot = [], 0
    for b in per_round:
        tot += b
        cum.append(tot)
    return {
        "params": summary["params"], "rounds": len(rows), "accuracy": acc,
        "loss": [r["loss"] for r in rows], "train_loss": [r.get("train_loss") for r in rows],
        "mqtt_bytes_round": per_round, "mqtt_bytes_cum": cum,
        "mqtt_bytes_down": summary["mqtt_bytes_down"], "mqtt_bytes_up": summary["mqtt_bytes_up"],
        "payload_bytes_down": summary["bytes_down"], "payload_bytes_up": summary["bytes_up"],
        "final_accuracy": acc[-1], "best_accuracy": max(acc),
        "mb_per_round": sum(per_round) / len(per_round) / 1e6,
        "coordinator_wall_s": summary["wall_s"], "demo_wall_s": summary.get("demo_wall_s"),
        "round_duration_s": [r["duration_s"] for r in rows],
    }


def bytes_to(run: dict, target: float):
    """(round, cumulative MQTT bytes) at the first round whose test accuracy >= target, else None."""
    for i, a in enumerate(run["accuracy"]):
        if a >= target - 1e-12:
            return {"round": i + 1, "bytes": run["mqtt_bytes_cum"][i]}
    return None


def analyse(group: dict, targets: list[float]) -> dict:
    """Per (partition, codec): bytes to each target, ratios dense/FedPara and lowrank/FedPara."""
    runs = group["runs"]
    common = min(r["best_accuracy"] for r in runs.values())
    tlist = [{"target": t, "kind": "fixed"} for t in targets]
    tlist.append({"target": math.floor(common * 1000) / 1000, "kind": "best reached by all schemes"})
    out = []
    for t in tlist:
        reach = {s: bytes_to(r, t["target"]) for s, r in runs.items()}
        row = {**t, "reach": reach}
        fp = reach.get("fedpara")
        for other in ("dense", "lowrank"):
            o = reach.get(other)
            row[f"{other}_over_fedpara"] = (o["bytes"] / fp["bytes"]) if (o and fp) else None
        out.append(row)
    return {"common_target": tlist[-1]["target"], "targets": out}


def fmt_mb(b) -> str:
    return "not reached" if b is None else f"{b['bytes'] / 1e6:.2f} MB (r{b['round']})"


def fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.1f}x"


def table_md(group: dict) -> str:
    runs, ana = group["runs"], group["analysis"]
    lines = ["| | " + " | ".join(SCHEMES) + " |", "|---|" + "---|" * len(SCHEMES)]

    def row(label, f):
        lines.append(f"| {label} | " + " | ".join(f(runs[s]) if s in runs else "-" for s in SCHEMES) + " |")

    row("parameters (transferred)", lambda r: f"{r['params']:,}")
    row("final test accuracy", lambda r: f"{100 * r['final_accuracy']:.2f}%")
    row("best test accuracy", lambda r: f"{100 * r['best_accuracy']:.2f}%")
    row("MQTT MB per round (down + up)", lambda r: f"{r['mb_per_round']:.2f}")
    row(f"MQTT MB, all {next(iter(runs.values()))['rounds']} rounds", lambda r: f"{r['mqtt_bytes_cum'][-1] / 1e6:.1f}")
    for t in ana["targets"]:
        label = f"MB to reach {100 * t['target']:.1f}%" + (" (best reached by all)" if t["kind"] != "fixed" else "")
        lines.append(f"| {label} | " + " | ".join(fmt_mb(t["reach"].get(s)) for s in SCHEMES) + " |")
    lines.append("")
    lines.append("Bytes to reach the target, relative to FedPara (> 1: FedPara needed fewer bytes):")
    lines.append("")
    lines.append("| target accuracy | dense / FedPara bytes | low-rank / FedPara bytes |")
    lines.append("|---|---|---|")
    for t in ana["targets"]:
        lines.append(f"| {100 * t['target']:.1f}% | {fmt_ratio(t['dense_over_fedpara'])} | "
                     f"{fmt_ratio(t['lowrank_over_fedpara'])} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    partitions = results["setting"]["partitions"]
    codecs = results["setting"]["codecs"]
    styles = {"fp32": "-", "fp16": "--"}
    fig, axes = plt.subplots(len(partitions), 2, figsize=(11, 4.2 * len(partitions)), squeeze=False)
    for i, part in enumerate(partitions):
        ax_r, ax_b = axes[i]
        for codec in codecs:
            group = results["groups"].get(f"{part}/{codec}")
            if not group:
                continue
            for s in SCHEMES:
                r = group["runs"].get(s)
                if not r:
                    continue
                label = f"{s} ({r['params'] / 1e3:.0f}k params)" + (f", {codec}" if len(codecs) > 1 else "")
                acc = [100 * a for a in r["accuracy"]]
                kw = dict(color=COLORS[s], ls=styles.get(codec, ":"), marker="o", ms=3.5, lw=1.8, label=label)
                ax_r.plot(range(1, len(acc) + 1), acc, **kw)
                ax_b.plot([b / 1e6 for b in r["mqtt_bytes_cum"]], acc, **kw)
        for t in results["setting"]["targets"]:
            for ax in (ax_r, ax_b):
                ax.axhline(100 * t, color="#999999", lw=0.8, ls=":")
        ax_r.set_xlabel("round")
        ax_b.set_xlabel("cumulative MQTT MB (down + up, all clients; log scale)")
        ax_b.set_xscale("log")
        ax_b.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_b.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax_r.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        for ax in (ax_r, ax_b):
            ax.set_ylabel("test accuracy (%)")
            ax.grid(True, alpha=0.3, which="both")
        ax_r.set_title(f"{part}: test accuracy vs round")
        ax_b.set_title(f"{part}: test accuracy vs communication")
        ax_r.legend(fontsize=8, loc="lower right")
    st = results["setting"]
    fig.suptitle(f"Fashion-MNIST, {st['model']}, {st['clients']} clients x {st['limit'] or 'all'} examples, "
                 f"gamma {st['ratio']}, {st['rounds']} rounds x {st['local_epochs']} epoch, real MQTT",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HAND_MARK = "### Reading the numbers"


def findings(results: dict) -> str:
    """Facts computed from the runs: who won, by how much, bytes-to-target ratios."""
    lines = []
    for key, g in results["groups"].items():
        r = g["runs"]
        if not all(s in r for s in SCHEMES):
            continue
        fp, lr, de = (r[s] for s in ("fedpara", "lowrank", "dense"))
        beat = "beat" if fp["final_accuracy"] > lr["final_accuracy"] else "did NOT beat"
        best = "beat" if fp["best_accuracy"] > lr["best_accuracy"] else "did NOT beat"
        lines.append(
            f"- **{key}**: FedPara {beat} low-rank in final accuracy "
            f"({100 * fp['final_accuracy']:.2f}% vs {100 * lr['final_accuracy']:.2f}%, "
            f"{100 * (fp['final_accuracy'] - lr['final_accuracy']):+.2f} pp) and {best} it in best accuracy "
            f"({100 * fp['best_accuracy']:.2f}% vs {100 * lr['best_accuracy']:.2f}%), at "
            f"{fp['params']:,} vs {lr['params']:,} parameters; dense reached {100 * de['final_accuracy']:.2f}% "
            f"({100 * (fp['final_accuracy'] - de['final_accuracy']):+.2f} pp for FedPara) with "
            f"{de['params'] / fp['params']:.1f}x the parameters and {de['mb_per_round'] / fp['mb_per_round']:.1f}x "
            f"the bytes per round.")
        for t in g["analysis"]["targets"]:
            d, l = t["dense_over_fedpara"], t["lowrank_over_fedpara"]
            reach = t["reach"]
            lines.append(
                f"  - to {100 * t['target']:.1f}%: dense {fmt_mb(reach.get('dense'))}, low-rank "
                f"{fmt_mb(reach.get('lowrank'))}, FedPara {fmt_mb(reach.get('fedpara'))}"
                + (f"; dense/FedPara {d:.1f}x" if d else "") + (f", low-rank/FedPara {l:.1f}x" if l else ""))
    return "\n".join(lines)


def write_md(results: dict, path: Path) -> None:
    st = results["setting"]
    out = [
        "# Dense vs low-rank vs FedPara over real MQTT (Fashion-MNIST)",
        "",
        "Produced, side by side in one invocation, by",
        "",
        f"    {results['command']}",
        "",
        f"in {results['total_wall_s'] / 60:.1f} min on this machine ({results['machine']}). "
        "Raw numbers: [schemes_results.json](schemes_results.json); plot: [schemes.png](schemes.png).",
        "",
        "## Setting",
        "",
        f"Each scheme ran the same `fedpara demo` experiment (embedded MQTT broker, coordinator, "
        f"{st['clients']} client processes on this machine): `{st['model']}`, "
        f"{st['clients']} clients, {st['limit'] or 'all'} training examples per client, "
        f"{st['rounds']} rounds x {st['local_epochs']} local epoch, batch {st['batch_size']}, "
        f"lr {st['lr']} (decay 0.992 per round), seed {st['seed']}, every client every round, "
        f"test accuracy on the 10,000 held-out images after each round. "
        f"FedPara and low-rank at gamma {st['ratio']} (the low-rank baseline takes the largest ranks "
        "that fit FedPara's budget). Bytes are the coordinator's MQTT-layer counts, down + up, all "
        "clients (payload + chunk header + MQTT framing). 'MB to reach X%' is the cumulative count "
        "through the first round whose test accuracy is >= X%.",
        "",
    ]
    for key, group in results["groups"].items():
        part, codec = key.split("/")
        out += [f"## {part}, {CODECS[codec]} both ways", "", table_md(group), ""]
    out += ["## Findings (computed from the runs above)", "", "DISCUSSION_PLACEHOLDER", ""]
    out += ["![accuracy vs round and vs cumulative MB](schemes.png)", ""]
    text = "\n".join(out).replace("DISCUSSION_PLACEHOLDER", findings(results))
    if path.exists():
        # keep a hand-written discussion (anything after the marker) across re-runs of the report
        old = path.read_text()
        if HAND_MARK in old:
            text = text.replace("![accuracy vs round", old[old.index(HAND_MARK):].split("![accuracy vs round")[0]
                                + "![accuracy vs round", 1)
    path.write_text(text)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn28")
    p.add_argument("--ratio", type=float, default=0.1, help="gamma for lowrank and fedpara")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--limit", type=int, default=6000, help="training examples per client (0 = all)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--partitions", default="iid", help="comma list, e.g. iid,dirichlet:0.5")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--fp16", action="store_true", help="also run every scheme with fp16+zstd:3 both ways")
    p.add_argument("--fp16-partitions", help="partitions for the fp16 runs (default: all of --partitions)")
    p.add_argument("--targets", default="0.80,0.85", help="target test accuracies (fractions)")
    p.add_argument("--runs", help="directory for the run directories (default runs/schemes-<time>)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds per demo run")
    p.add_argument("--report-only", action="store_true", help="rebuild outputs from --runs without training")
    args = p.parse_args(argv)
    if args.report_only and args.runs and (Path(args.runs) / "invocation.json").exists():
        # the setting is the one the runs were made with, not this command line's
        recorded = json.loads((Path(args.runs) / "invocation.json").read_text())["argv"][1:]
        args = p.parse_args(recorded + ["--runs", args.runs, "--out", args.out, "--report-only"])

    partitions = [s.strip() for s in args.partitions.split(",") if s.strip()]
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    targets = [float(t) for t in args.targets.split(",") if t.strip()]
    codecs = ["fp32"] + (["fp16"] if args.fp16 else [])
    fp16_parts = partitions if not args.fp16_partitions else \
        [s.strip() for s in args.fp16_partitions.split(",") if s.strip()]
    runs_root = Path(args.runs or ROOT / "runs" / f"schemes-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.report_only and not args.runs:
        p.error("--report-only needs --runs DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    plan = [(part, codec, s) for codec in codecs for part in partitions
            if codec == "fp32" or part in fp16_parts for s in schemes]
    t0 = time.monotonic()
    groups: dict[str, dict] = {}
    prev = {}
    if args.report_only and (runs_root / "invocation.json").exists():
        prev = json.loads((runs_root / "invocation.json").read_text())
    for part, codec, s in plan:
        run_dir = runs_root / f"{slug(part)}-{codec}-{s}"
        key = f"{part}/{codec}"
        if args.report_only:
            info = prev.get("runs", {}).get(f"{key}/{s}", {"cmd": None, "wall_s": None})
        else:
            info = run_one(args, s, part, codec, run_dir)
        run = {**load_run(run_dir), **info, "dir": str(run_dir)}
        print(f"    -> acc {run['final_accuracy']:.4f}  {run['mb_per_round']:.2f} MB/round  "
              f"params {run['params']:,}  {info['wall_s'] or 0:.0f} s", flush=True)
        groups.setdefault(key, {"partition": part, "codec": codec, "codec_policy": CODECS[codec], "runs": {}})
        groups[key]["runs"][s] = run
        prev.setdefault("runs", {})[f"{key}/{s}"] = info
    total = prev.get("total_wall_s") if args.report_only else time.monotonic() - t0
    if not args.report_only:
        (runs_root / "invocation.json").write_text(json.dumps({"argv": sys.argv, "runs": prev["runs"],
                                                               "total_wall_s": total}, indent=2))
    for g in groups.values():
        g["analysis"] = analyse(g, targets)

    import torch
    used = prev.get("argv", [])[1:] if args.report_only else (argv if argv is not None else sys.argv[1:])
    command = ".venv/bin/python benchmarks/bench_schemes.py " + " ".join(used)
    results = {
        "command": command.strip(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, Python {platform.python_version()}",
        "total_wall_s": total,
        "setting": {"dataset": "fashion-mnist", "model": args.model, "ratio": args.ratio, "clients": args.clients,
                    "rounds": args.rounds, "limit": args.limit, "local_epochs": args.local_epochs, "lr": args.lr,
                    "batch_size": args.batch_size, "seed": args.seed, "partitions": partitions,
                    "codecs": codecs, "fp16_partitions": fp16_parts if args.fp16 else [],
                    "schemes": schemes, "targets": targets,
                    "bytes": "coordinator MQTT-layer counts, down + up, all clients"},
        "groups": groups,
    }
    (out / "schemes_results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "schemes.png")
    write_md(results, out / "schemes.md")

    print(f"\ntotal {total / 60:.1f} min")
    for key, g in groups.items():
        print(f"\n== {key} ==")
        print(table_md(g))
    return 0


if __name__ == "__main__":
    sys.exit(main())
