"""Inference cost of the export path, side by side in one run.

For each model: batch-1 and batch-64 latency of
  * the factorised torch model (composes every weight on every call -- what training runs),
  * the composed torch model (plain layers),
  * onnxruntime fp32 and onnxruntime int8 (static QDQ, per-channel weights),
and the file sizes of the factor checkpoint (safetensors), the ONNX fp32 and the ONNX int8 files.
cnn28 is first trained briefly on Fashion-MNIST (when installed) so that the int8 accuracy drop
means something; vgg16 has no CIFAR here, so it is timed with random weights and inputs.

    .venv/bin/python benchmarks/bench_export.py [--models cnn28,vgg16] [--threads 1]
        [--json out.json] [--md out.md]

Prints a Markdown table (the one in docs/export.md). Everything runs with ``--threads`` intra-op
threads in both torch and onnxruntime.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from torch.utils.data import TensorDataset

import fedpara
from export import OnnxModel, export_onnx, measure, quantize_int8
from export.pipeline import torch_logits
from fedpara import models
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import save_checkpoint
from fedpara.training import train_epochs

log = logging.getLogger("bench_export")


def _fmnist():
    from fedpara.data import find_fashion_mnist, load_client_data, load_test_data
    try:
        find_fashion_mnist()
    except (FileNotFoundError, ValueError):
        return None
    train, _ = load_client_data("fashion-mnist,limit=12000,seed=0")
    return train.tensors, load_test_data("fashion-mnist").tensors


def bench_model(name: str, args, tmp: Path) -> dict:
    spec = ModelSpec(model=name, num_classes=10, scheme=args.scheme, ratio=args.ratio)
    torch.manual_seed(0)
    model = spec.build().eval()
    res: dict = {"model": name, "spec": spec.to_dict()}
    data = _fmnist() if name == "cnn28" else None
    if data is not None:
        (xtr, ytr), (xte, yte) = data
        t0 = time.perf_counter()
        n = min(len(xtr), args.train_steps * 64)  # one epoch of train_steps batches of 64
        train_epochs(model, TensorDataset(xtr[:n], ytr[:n]), epochs=1, batch_size=64, lr=0.05, momentum=0.9)
        model.eval()
        res["train"] = {"steps": args.train_steps, "seconds": round(time.perf_counter() - t0, 1),
                        "data": "fashion-mnist (12k train subset; full 10k test)"}
        calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))[:256]]
    else:
        calib, xte, yte = models.example_input(name, 256), None, None
    composed = fedpara.compose(model).eval()
    ckpt = save_checkpoint(tmp / f"{name}.safetensors", fedpara.global_state(model), spec)
    dense_ckpt = save_checkpoint(tmp / f"{name}-dense.safetensors", composed.state_dict(),
                                 ModelSpec(model=name, scheme="dense"))
    t0 = time.perf_counter()
    fp32_path = export_onnx(model, spec, tmp / f"{name}.onnx")
    res["export_seconds"] = round(time.perf_counter() - t0, 1)
    int8_path = quantize_int8(fp32_path, tmp / f"{name}.int8.onnx", calib)
    fp32, int8 = OnnxModel(fp32_path, threads=args.threads), OnnxModel(int8_path, threads=args.threads)
    res["sizes_bytes"] = {"factor_checkpoint": ckpt.stat().st_size,
                          "dense_checkpoint": dense_ckpt.stat().st_size,
                          "onnx_fp32": fp32_path.stat().st_size, "onnx_int8": int8_path.stat().st_size}

    def torch_fn(m):
        def run(x):
            with torch.no_grad():
                return m(x)
        return run

    runners = {"torch factorised": (torch_fn(model), False), "torch composed": (torch_fn(composed), False),
               "onnxruntime fp32": (fp32.predict, True), "onnxruntime int8": (int8.predict, True)}
    # Interleaved repetitions, best p50 of each runner kept: a burst of load from other processes
    # on a shared machine then hits one repetition, not one runner.
    res["latency"] = {}
    for batch in (1, 64):
        x = models.example_input(name, batch)
        best: dict = {}
        for _ in range(args.reps):
            for label, (fn, numpy_in) in runners.items():
                lat = measure(fn, x.numpy() if numpy_in else x,
                              runs=args.runs if batch == 1 else max(args.runs // 4, 5),
                              warmup=3, max_seconds=args.max_seconds)
                if label not in best or lat.p50_ms < best[label].p50_ms:
                    best[label] = lat
        for label, lat in best.items():
            res["latency"].setdefault(label, {})[f"batch{batch}"] = lat.to_dict()
            log.info("%s %s batch %d: p50 %.3f ms", name, label, batch, lat.p50_ms)
    if xte is not None:
        acc = {"torch factorised": float((torch_logits(model, xte).argmax(1) == yte.numpy()).mean()),
               "onnxruntime fp32": float((fp32.predict_all(xte.numpy()).argmax(1) == yte.numpy()).mean()),
               "onnxruntime int8": float((int8.predict_all(xte.numpy()).argmax(1) == yte.numpy()).mean())}
        res["accuracy"] = acc
        res["int8_drop_pp"] = round(100 * (acc["onnxruntime fp32"] - acc["onnxruntime int8"]), 3)
    lat = res["latency"]
    res["ratios"] = {
        "factorised_over_ort_fp32_batch1": lat["torch factorised"]["batch1"]["p50_ms"]
        / lat["onnxruntime fp32"]["batch1"]["p50_ms"],
        "fp32_over_int8_size": res["sizes_bytes"]["onnx_fp32"] / res["sizes_bytes"]["onnx_int8"],
    }
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(results: list[dict], env: dict) -> str:
    lines = [f"Machine: {env['cpu']}, {env['threads']} thread(s) for torch {env['torch']} and "
             f"onnxruntime {env['onnxruntime']}; latency in ms (batch 64: ms per batch), best p50 "
             f"of {env['reps']} interleaved repetitions.", ""]
    lines += ["| model | runner | batch 1 p50 | batch 1 p95 | batch 64 p50 | batch 64 samples/s |",
              "|---|---|---:|---:|---:|---:|"]
    for r in results:
        for label, v in r["latency"].items():
            b1, b64 = v["batch1"], v["batch64"]
            lines.append(f"| {r['model']} | {label} | {b1['p50_ms']:.3f} | {b1['p95_ms']:.3f} | "
                         f"{b64['p50_ms']:.2f} | {b64['throughput_per_s']:,.0f} |")
    lines += ["", "| model | factor checkpoint | dense checkpoint | ONNX fp32 | ONNX int8 | fp32/int8 | "
              "factorised / ORT fp32 (batch 1) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["sizes_bytes"]
        lines.append(f"| {r['model']} ({r['spec']['scheme']}, ratio {r['spec']['ratio']}) | "
                     f"{s['factor_checkpoint'] / 1e6:.3f} MB | {s['dense_checkpoint'] / 1e6:.3f} MB | "
                     f"{s['onnx_fp32'] / 1e6:.3f} MB | {s['onnx_int8'] / 1e6:.3f} MB | "
                     f"{r['ratios']['fp32_over_int8_size']:.2f}x | "
                     f"{r['ratios']['factorised_over_ort_fp32_batch1']:.1f}x |")
    for r in results:
        if "accuracy" in r:
            a = r["accuracy"]
            lines += ["", f"{r['model']} after {r['train']['steps']} SGD steps on {r['train']['data']}: "
                      f"accuracy torch {100 * a['torch factorised']:.2f}%, onnxruntime fp32 "
                      f"{100 * a['onnxruntime fp32']:.2f}%, int8 {100 * a['onnxruntime int8']:.2f}% "
                      f"(drop {r['int8_drop_pp']:+.2f} pp)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn28,vgg16", help="comma-separated reference models (10 classes)")
    p.add_argument("--scheme", default="fedpara", choices=["fedpara", "lowrank", "pfedpara"])
    p.add_argument("--ratio", type=float, default=0.1, help="the paper's gamma")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and onnxruntime)")
    p.add_argument("--runs", type=int, default=200, help="timed runs at batch 1 (batch 64: a quarter)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (best p50 kept)")
    p.add_argument("--max-seconds", type=float, default=3.0, help="time cap per measurement")
    p.add_argument("--train-steps", type=int, default=400, help="cnn28 SGD steps before timing")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--md", type=Path, default=None, help="write the Markdown table here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    env = {"cpu": f"{_cpu_name()} ({os.cpu_count()} cores)", "threads": args.threads,
           "torch": torch.__version__, "onnxruntime": ort.__version__, "python": sys.version.split()[0],
           "reps": args.reps}
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(n.strip(), args, Path(tmp)) for n in args.models.split(",") if n.strip()]
    md = markdown(results, env)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
