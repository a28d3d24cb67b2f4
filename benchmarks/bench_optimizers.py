"""Does FedPara compose with other FL optimisers? Server optimisers over the aggregated factor
delta (FedAvgM, FedAdam, FedYogi, FedAdagrad: Reddi et al., ICLR 2021) and FedProx's proximal
term on the clients, beside plain FedAvg, on mlp2 (FedPara, gamma 0.1) on Fashion-MNIST, 10
clients, the setting of docs/fidelity.md (benchmarks/bench_repro.py's Suite: one Mosquitto, one
``fedpara client --pool N`` process, the coordinator in this process; everything over MQTT).

    nice -n 10 .venv/bin/python benchmarks/bench_optimizers.py [--rounds 10] [--seeds 3]
        [--partition iid] [--runs runs/optimizers] [--out docs/results] [--quick]

Fair comparison (the repository's rule): the local lr is the same for every configuration, 0.2
(batch 32): the runner-up of docs/fidelity.md's FedPara mlp2 sweep (0.2: 81.87%, 0.4: 82.53%
validation). Its winner, 0.4, now makes one of the 10 clients' round-1 updates non-finite in each
of seeds 0, 1 and 2 (each shard trained alone from the seed's initialisation; the round then waits
out its deadline without it), so it would measure the deadline, not the optimiser. Each server
optimiser gets its
own server lr chosen among 3 candidates on a validation split (10% of the train split held out,
seed 0, best final-round validation accuracy); FedProx runs with two mu values (plain FedAvg on
the server). The chosen configurations then run with 3 seeds (the seed-0 run is the sweep's);
test accuracy is each round's checkpoint on the full test split. Results:
``optimizers_results.json`` and ``optimizers_results.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_repro import Suite  # noqa: E402

# server lr candidates per optimiser (server momentum 0.9; beta1 0.9, beta2 0.99, tau 1e-3: Reddi's)
SERVER_LRS = {"fedavgm": [0.1, 0.3, 1.0], "fedadam": [0.01, 0.03, 0.1], "fedyogi": [0.01, 0.03, 0.1],
              "fedadagrad": [0.03, 0.1, 0.3]}
PROX_MUS = [0.01, 0.1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=500, help="training examples per client")
    p.add_argument("--local-lr", type=float, default=0.2)
    p.add_argument("--partition", default="iid")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val", type=float, default=0.1)
    p.add_argument("--deadline", type=float, default=120.0,
                   help="round deadline (s): only a round that lost an update (non-finite) waits for it")
    p.add_argument("--optimisers", default=",".join(SERVER_LRS))
    p.add_argument("--chosen-from", default="",
                   help="take each optimiser's server lr from this results json (no sweep; e.g. the IID choice "
                        "for --partition dirichlet:0.5, as docs/fidelity.md does for the local lr)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "optimizers"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not results")
    args = p.parse_args(argv)
    args.only_cached = False
    if args.quick:
        args.rounds, args.seeds, args.limit = 2, 1, 60
    optimisers = [o for o in args.optimisers.split(",") if o]
    suite = Suite(args)
    data = f"fashion-mnist,val={args.val},partition={args.partition},clients={args.clients},limit={args.limit}"
    val = f"fashion-mnist,val={args.val},split=val,limit={3000 if not args.quick else 300}"
    test = "fashion-mnist" + (",limit=500" if args.quick else "")
    tag = "" if args.partition == "iid" else f"-{args.partition.replace(':', '')}"

    def run(name, seed, **extra):
        return suite.fl_run(f"{name}{tag}-s{seed}", "mlp2", "fedpara", args.local_lr, seed, data, val,
                            args.rounds, 10, deadline=args.deadline, extra=extra)

    def final(r) -> float:
        ok = r["status"] == "completed" and r["rounds"] == r["planned_rounds"]
        return r["eval_accuracy"][-1] if ok else 0.0

    t0 = time.monotonic()
    results = {"setting": {"model": "mlp2", "scheme": "fedpara", "ratio": args.ratio, "clients": args.clients,
                           "rounds": args.rounds, "seeds": args.seeds, "limit": args.limit,
                           "partition": args.partition, "local_lr": args.local_lr, "batch_size": args.batch_size,
                           "server_momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "quick": args.quick},
               "sweep": {}, "configs": {}}
    try:
        # 1. server lr per optimiser on the validation split, seed 0
        configs = {"FedAvg": ("fedavg", {})}
        chosen = json.loads(Path(args.chosen_from).read_text())["sweep"] if args.chosen_from else {}
        for opt in optimisers:
            if opt in chosen:
                best = chosen[opt]["chosen_lr"]
                results["sweep"][opt] = {**chosen[opt], "from": args.chosen_from}
                configs[f"{opt} (server lr {best:g})"] = (f"{opt}-lr{best:g}", {"server_opt": opt, "server_lr": best})
                continue
            cands = {}
            for lr in SERVER_LRS[opt]:
                r = run(f"{opt}-lr{lr:g}", 0, server_opt=opt, server_lr=lr)
                cands[lr] = final(r)
                print(f"    {opt} server lr {lr:g}: val {cands[lr]:.4f}", flush=True)
            best = max(cands, key=cands.get)
            results["sweep"][opt] = {"val_final": {str(k): v for k, v in cands.items()}, "chosen_lr": best}
            configs[f"{opt} (server lr {best:g})"] = (f"{opt}-lr{best:g}", {"server_opt": opt, "server_lr": best})
        for mu in PROX_MUS:
            configs[f"FedProx mu {mu:g}"] = (f"prox{mu:g}", {"prox_mu": mu})
        # 2. seeds, test accuracy of every round's checkpoint
        for label, (name, extra) in configs.items():
            accs, curves, val_final = [], [], []
            for seed in range(args.seeds):
                r = run(name, seed, **extra)
                curve = suite.test_curve(r, test) if r["rounds"] else [0.0]
                accs.append(curve[-1] if r["rounds"] == r["planned_rounds"] else 0.0)
                curves.append(curve)
                val_final.append(final(r))
                print(f"    {label} seed {seed}: test {accs[-1]:.4f}", flush=True)
            results["configs"][label] = {"extra": extra, "test_accuracy": accs, "mean": statistics.mean(accs),
                                         "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                         "test_curves": curves, "val_final": val_final}
    finally:
        suite.stop()
    results["wall_s"] = time.monotonic() - t0
    out = Path(args.out)
    stem = "optimizers_results" + tag
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    write_md(results, out / f"{stem}.md")
    print((out / f"{stem}.md").read_text())
    return 0


def write_md(res: dict, path: Path) -> None:
    st = res["setting"]
    base = res["configs"].get("FedAvg")
    lines = [f"# Server optimisers and FedProx with FedPara ({time.strftime('%Y-%m-%d')}, "
             "`benchmarks/bench_optimizers.py`)", "",
             f"mlp2 FedPara (gamma {st['ratio']}) on Fashion-MNIST, {st['clients']} clients ({st['partition']}, "
             f"{st['limit']} examples each, all every round), {st['rounds']} rounds x 1 local epoch, local lr "
             f"{st['local_lr']} (batch {st['batch_size']}, decay 0.992), {st['seeds']} seeds. Server optimisers: "
             f"momentum {st['server_momentum']}, beta1 {st['beta1']}, beta2 {st['beta2']}, tau {st['tau']:g}; "
             + ("server lr per optimiser taken from " + ", ".join(sorted({Path(s["from"]).name for s in
                                                                       res["sweep"].values() if s.get("from")}))
                + " (chosen there, on its validation split)" if any(s.get("from") for s in res["sweep"].values())
                else "server lr chosen per optimiser on a validation split (seed 0)")
             + ". Test accuracy: the final round's checkpoint on the test split.", "",
             "| configuration | test accuracy, final round (mean +- sd) | vs FedAvg | per seed |", "|---|---|---|---|"]
    for label, c in res["configs"].items():
        d = "-" if base is None or label == "FedAvg" else f"{100 * (c['mean'] - base['mean']):+.2f} pp"
        accs = ", ".join(f"{a:.4f}" for a in c["test_accuracy"])
        lines.append(f"| {label} | {100 * c['mean']:.2f} +- {100 * c['sd']:.2f}% | {d} | {accs} |")
    lines += ["", "Validation accuracy of the server-lr sweep (seed 0, final round; 0 = diverged or failed):", ""]
    for opt, s in res["sweep"].items():
        lines.append(f"- {opt}" + (f" (chosen in {Path(s['from']).name}, not here)" if s.get("from") else "") + ": " + ", ".join(f"lr {k}: {v:.4f}" for k, v in s["val_final"].items())
                     + f" -> {s['chosen_lr']:g}")
    lines += ["", f"Wall time: {res['wall_s'] / 60:.1f} min (runs already on disk are read, not re-run)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
