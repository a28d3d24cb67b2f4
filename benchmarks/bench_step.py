"""One training step (forward + backward + SGD) of FedPara vs the dense model, side by side.

    python benchmarks/bench_step.py [--threads 1] [--repeats 30] [--ratio 0.1]

For each model (cnn28 at batch 32, vgg16 at batch 64) both variants are timed in interleaved
rounds in the same process, and the median FedPara/dense ratio is printed and written to
docs/results/step_results.json and docs/results/step_results.md. The paper measured 1.43x on a GPU (Table 7:
2.34 s vs 1.64 s per round); the target here is <= 1.2x on CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fedpara  # noqa: E402
from fedpara import models  # noqa: E402

CASES = [("cnn28", 32), ("vgg16", 64)]


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def flop_model(model, fp_model, x) -> dict:
    """Analytic multiply-accumulates per training step (forward + backward = 3x forward):
    the layers' own work, and the extra work of composing FedPara weights (6 O I k r per layer:
    two halves, one forward and two backward matmuls each)."""
    layer_macs, compose_macs = 0, 0
    hooks = []

    def hook(m, inp, out):
        nonlocal layer_macs
        if isinstance(m, torch.nn.Conv2d):
            layer_macs += out.numel() * m.weight[0].numel()
        elif isinstance(m, torch.nn.Linear):
            layer_macs += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for m in fp_model.modules():
        if isinstance(m, fedpara.FactorisedLayer):
            compose_macs += 6 * m.weight.numel() * m.rank
    return {"layer_gmacs": 3 * layer_macs / 1e9, "compose_gmacs": compose_macs / 1e9,
            "compose_over_layers": compose_macs / (3 * layer_macs)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for name, batch in CASES:
        x = models.example_input(name, batch)
        y = torch.randint(0, 10, (batch,))
        dense = models.build(name)
        fp = fedpara.convert(models.build(name), ratio=args.ratio)
        steps = {"dense": step_fn(dense, x, y), "fedpara": step_fn(fp, x, y)}
        for fn in steps.values():  # warm-up
            for _ in range(2):
                fn()
        times = {k: [] for k in steps}
        for _ in range(args.repeats):  # interleaved so that drifts hit both alike
            for k, fn in steps.items():
                times[k].append(timed(fn))
        med = {k: statistics.median(v) for k, v in times.items()}
        flops = flop_model(dense, fp, x)
        row = {"model": name, "batch": batch, "ratio": args.ratio,
               "dense_ms": med["dense"] * 1e3, "fedpara_ms": med["fedpara"] * 1e3,
               "fedpara_over_dense": med["fedpara"] / med["dense"],
               "dense_params": fedpara.count_params(dense), "fedpara_params": fedpara.count_params(fp),
               **flops}
        results.append(row)
        print(f"{name:>6} batch {batch:>3}: dense {row['dense_ms']:8.1f} ms  fedpara {row['fedpara_ms']:8.1f} ms"
              f"  ratio {row['fedpara_over_dense']:.2f}x  (target <= 1.2x); composing adds "
              f"{row['compose_over_layers']:.0%} of the layers' MACs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
            "machine": platform.machine(), "processor": platform.processor() or platform.platform()}
    (out / "step_results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = ["# One training step: FedPara vs dense (CPU)", "",
             f"`python benchmarks/bench_step.py --threads {args.threads} --repeats {args.repeats}` "
             f"(torch {torch.__version__}, {meta['machine']}, median of interleaved runs)", "",
             "| model | batch | dense params | FedPara params (gamma) | dense ms/step | FedPara ms/step | FedPara/dense "
             "| composition MACs / layer MACs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['batch']} | {r['dense_params']:,} | {r['fedpara_params']:,} ({r['ratio']}) "
                     f"| {r['dense_ms']:.1f} | {r['fedpara_ms']:.1f} | {r['fedpara_over_dense']:.2f}x "
                     f"| {r['compose_over_layers']:.0%} |")
    lines += ["", "The paper measured 1.43x per round on a GPU (Table 7). Target here: <= 1.2x.", "",
              "Composing a FedPara weight costs 6 O I k r multiply-accumulates per step (two halves; one",
              "forward and two backward matmuls each), independent of the batch, while the layer itself",
              "costs 3 O I k H W B. Where the batch and the feature maps are large (VGG16) composing is a",
              "small addition; for a small model dominated by a fully connected layer at batch 32",
              "(cnn28: fc 1568->256 at rank 25, 2r/B = 1.6) it is comparable to the layer's own work,",
              "and the step ratio follows. Timings of the ~10 ms cnn28 step are noisy on a shared machine."]
    (out / "step_results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
