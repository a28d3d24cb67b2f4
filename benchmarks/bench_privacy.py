"""What user-level differential privacy costs: accuracy at epsilon 1, 3 and 8 (delta 1e-5) beside
no DP, on mlp2 (FedPara, Fashion-MNIST) with 100 logical clients, 3 seeds (docs/privacy.md).

    nice -n 10 .venv/bin/python benchmarks/bench_privacy.py [--clients 100] [--per-round 50]
        [--rounds 10] [--seeds 3] [--epsilons 1,3,8] [--runs runs/privacy] [--out docs] [--quick]

Everything runs through the real protocol, as benchmarks/bench_repro.py does (its Suite: one
Mosquitto, one ``fedpara client --pool N`` process, the coordinator in this process), with
central DP-FedAvg: each round samples ``--per-round`` of the clients without replacement from the
OS's randomness, clips every update's delta to C, adds N(0, (z C)^2) to the sum, divides by the
number sampled. z is calibrated with the run's own accountant so that ``--rounds`` rounds spend
exactly the target epsilon, and ``max_epsilon`` is set to it (the run would stop before passing it).

Fair comparison (the repository's rule): the lr, and for DP the clip norm C, are chosen on a
validation split (10% of the train split held out; seed 0; DP at the middle epsilon) and then
run with 3 seeds; test accuracy is the final round's checkpoint on the test split. Results:
``privacy_results.json`` and ``privacy_results.md`` in ``--out``.
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

DELTA = 1e-5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--lrs", default="0.2,0.4")
    p.add_argument("--clips", default="0.05,0.2")
    p.add_argument("--limit", type=int, default=300, help="training examples per client")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val", type=float, default=0.1)
    p.add_argument("--runs", default=str(ROOT / "runs" / "privacy"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not results")
    args = p.parse_args(argv)
    args.only_cached = False
    if args.quick:
        args.clients, args.per_round, args.rounds, args.seeds, args.limit = 10, 4, 2, 1, 40
    from coordinator.privacy import noise_for_epsilon

    epsilons = [float(e) for e in args.epsilons.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    clips = [float(x) for x in args.clips.split(",")]
    suite = Suite(args)
    data = f"fashion-mnist,val={args.val},partition=iid,clients={args.clients},limit={args.limit}"
    val = f"fashion-mnist,val={args.val},split=val,limit={3000 if not args.quick else 300}"
    test = "fashion-mnist" + (",limit=500" if args.quick else "")
    z_for = {e: noise_for_epsilon(e, args.rounds, DELTA, n=args.clients, k=args.per_round) for e in epsilons}
    print("noise multipliers:", {e: round(z, 3) for e, z in z_for.items()}, flush=True)
    common = dict(clients_per_round=args.per_round)

    def run(name, lr, seed, eval_data, eps=None, clip=None):
        extra = dict(common)
        if eps is not None:
            extra.update(dp_noise_multiplier=z_for[eps], dp_clip_norm=clip, dp_delta=DELTA, max_epsilon=eps)
        return suite.fl_run(name, "mlp2", "fedpara", lr, seed, data, eval_data, args.rounds, 10,
                            deadline=120.0, extra=extra)

    t0 = time.monotonic()
    results = {"setting": {"model": "mlp2", "scheme": "fedpara", "ratio": args.ratio, "clients": args.clients,
                           "per_round": args.per_round, "rounds": args.rounds, "seeds": args.seeds,
                           "limit": args.limit, "delta": DELTA, "noise_multipliers": z_for,
                           "sampling": "fixed (without replacement, OS randomness)", "quick": args.quick},
               "sweep": {}, "configs": {}}
    try:
        # 1. choose on the validation split: lr without DP; lr and clip with DP at the middle epsilon
        mid = epsilons[len(epsilons) // 2]
        cands = {}
        for lr in lrs:
            r = run(f"nodp-lr{lr:g}-s0", lr, 0, val)
            cands[("none", lr, None)] = r["eval_accuracy"][-1] if r["rounds"] else 0.0
            for clip in clips:
                r = run(f"eps{mid:g}-lr{lr:g}-c{clip:g}-s0", lr, 0, val, mid, clip)
                cands[("dp", lr, clip)] = r["eval_accuracy"][-1] if r["rounds"] else 0.0
        best_none = max((k for k in cands if k[0] == "none"), key=cands.get)
        best_dp = max((k for k in cands if k[0] == "dp"), key=cands.get)
        results["sweep"] = {f"{k[0]} lr {k[1]}" + (f" clip {k[2]}" if k[2] else ""): v for k, v in cands.items()}
        results["chosen"] = {"none": {"lr": best_none[1]}, "dp": {"lr": best_dp[1], "clip": best_dp[2]}}
        print("chosen:", results["chosen"], flush=True)
        # 2. seeds, test accuracy
        for label, eps in [("no DP", None)] + [(f"epsilon {e:g}", e) for e in epsilons]:
            lr = best_none[1] if eps is None else best_dp[1]
            clip = None if eps is None else best_dp[2]
            accs, spent = [], []
            for seed in range(args.seeds):
                name = f"nodp-lr{lr:g}-s{seed}-test" if eps is None else f"eps{eps:g}-lr{lr:g}-c{clip:g}-s{seed}-test"
                r = run(name, lr, seed, val, eps, clip)
                curve = suite.test_curve(r, test) if r["rounds"] else [0.0]
                accs.append(curve[-1])
                from fedpara.runtime.rundir import RunDir
                rows = RunDir(r["dir"]).read_metrics()
                spent.append(rows[-1].get("epsilon") if rows else None)
                print(f"    {label} seed {seed}: test {curve[-1]:.4f} epsilon {spent[-1]}", flush=True)
            results["configs"][label] = {"lr": lr, "clip": clip, "noise_multiplier": None if eps is None else z_for[eps],
                                         "test_accuracy": accs, "mean": statistics.mean(accs),
                                         "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                                         "epsilon_spent": spent}
    finally:
        suite.stop()
    results["wall_s"] = time.monotonic() - t0
    out = Path(args.out)
    (out / "privacy_results.json").write_text(json.dumps(results, indent=1))
    write_md(results, out / "privacy_results.md")
    print((out / "privacy_results.md").read_text())
    return 0


def write_md(res: dict, path: Path) -> None:
    st = res["setting"]
    lines = [f"# Privacy results ({time.strftime('%Y-%m-%d')}, `benchmarks/bench_privacy.py`)", "",
             f"mlp2 FedPara (ratio {st['ratio']}) on Fashion-MNIST, {st['clients']} logical clients (IID, "
             f"{st['limit']} examples each), {st['per_round']} sampled a round without replacement, "
             f"{st['rounds']} rounds, {st['seeds']} seeds; central DP-FedAvg, delta {st['delta']:g}. "
             f"lr (and clip norm) chosen on a validation split: {res.get('chosen')}.", "",
             "| setting | noise multiplier z | epsilon spent | test accuracy (mean +- sd) | seeds |",
             "|---|---|---|---|---|"]
    for label, c in res["configs"].items():
        z = "-" if c["noise_multiplier"] is None else f"{c['noise_multiplier']:.3f}"
        eps = [e for e in c["epsilon_spent"] if e is not None]
        e = "-" if not eps else f"{max(eps):.3f}"
        accs = ", ".join(f"{a:.4f}" for a in c["test_accuracy"])
        lines.append(f"| {label} | {z} | {e} | {100 * c['mean']:.2f} +- {100 * c['sd']:.2f}% | {accs} |")
    lines += ["", "Validation accuracy of the sweep (seed 0): " +
              ", ".join(f"{k}: {v:.4f}" for k, v in res["sweep"].items()), "",
              f"Wall time: {res['wall_s'] / 60:.1f} min."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
