"""The browser client beside the Python client: seconds per local epoch, in headless chromium as a
phone (390x844 viewport, CPU slowed 4x by CDP) and unthrottled, against torch on one thread; the
export page's size and per-image latency; what this chromium offers (feature detection).

    python benchmarks/bench_web.py [--examples 640] [--repeats 3] [--throttle 4]

Reduced on purpose: an epoch of the demo's shard (20,000 examples) takes many minutes in a
throttled browser, so each configuration trains ``--examples`` Fashion-MNIST examples (batch 32)
and the time is scaled to 1,000 examples and to the 20,000-example shard (training time is linear
in the examples: same steps, same sizes). Repeats are interleaved; medians with min-max.
Writes docs/results/web_results.json and docs/results/web_results.md.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402
from web_support import StaticServer, phone_browser  # noqa: E402

import fedpara  # noqa: E402
from edge_client.web.site import stage_client  # noqa: E402
from fedpara.models import ModelSpec  # noqa: E402
from fedpara.training import train_epochs  # noqa: E402
from fedpara.wire import Message, encode  # noqa: E402

SHARD = 20_000  # the demo's per-client partition (60,000 / 3)

TRAIN_JS = """
const done = arguments[arguments.length - 1];
const [task, xs, ys, backend] = arguments;
Promise.all(['wire', 'hash', 'model', 'train', 'backend'].map(n => import(`./client/${n}.js`))).then(async ([w, h, m, t, b]) => {
  const got = await b.useBackend(backend);
  const msg = w.decode(h.b64decode(task));
  const model = new m.Model(msg.meta.spec, msg.tensors);
  const x = new Float32Array(h.b64decode(xs).buffer), y = Int32Array.from(ys);
  const res = await t.trainEpochs(model, {x, y}, msg.meta.train);
  model.dispose();
  return {backend: got, seconds: res.seconds, steps: res.steps};
}).then(r => done(r), e => done({error: String(e && e.stack || e)}));
"""

FEATURES_JS = """
const done = arguments[arguments.length - 1];
(async () => {
  const simd = WebAssembly.validate(new Uint8Array([0,97,115,109,1,0,0,0,1,5,1,96,0,1,123,3,2,1,0,10,10,1,8,0,65,0,253,15,253,98,11]));
  let ed = false;
  try { await crypto.subtle.importKey('raw', new Uint8Array(32).fill(1), {name: 'Ed25519'}, false, ['verify']); ed = true; } catch (e) {}
  return {wasm_simd: simd, shared_array_buffer: typeof SharedArrayBuffer !== 'undefined', cross_origin_isolated: self.crossOriginIsolated,
          webgpu: !!navigator.gpu, webcrypto_ed25519: ed, wake_lock: 'wakeLock' in navigator, battery_status: 'getBattery' in navigator,
          service_worker: 'serviceWorker' in navigator, user_agent: navigator.userAgent};
})().then(done, e => done({error: String(e)}));
"""


def data(n: int):
    from fedpara.data import load_client_data, parse_data_spec
    train, _ = load_client_data(parse_data_spec("fashion-mnist,partition=iid,clients=3,index=0"))
    x, y = train.tensors
    return x[:n].contiguous(), y[:n].contiguous()


def task_bytes(model: str) -> bytes:
    spec = ModelSpec(model=model, scheme="fedpara", ratio=0.1)
    train = {"epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 0}
    return bytes(encode(Message("task", "bench", 1, "coordinator", fedpara.global_state(spec.build()),
                                {"task_id": "b", "spec": spec.to_dict(), "train": train}), "fp32").data)


def python_seconds(model: str, x, y) -> float:
    torch.set_num_threads(1)
    net = ModelSpec(model=model, scheme="fedpara", ratio=0.1).build()
    return train_epochs(net, TensorDataset(x, y), epochs=1, batch_size=32, lr=0.05)["seconds"]


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def page_figures(tmp: Path, throttle: float) -> dict:
    """Export a (seeded, untrained) cnn28 page with 100 samples; its files and ?selftest latency."""
    from export.onnx_export import export_onnx
    from export.web import write_web
    from fedpara.data import load_test_data, parse_data_spec
    spec = ModelSpec(model="cnn28", scheme="fedpara", ratio=0.1)
    onnx_path = export_onnx(spec.build().eval(), spec, tmp / "m.onnx")
    x, y = load_test_data(parse_data_spec("fashion-mnist,limit=100")).tensors
    rep = write_web(onnx_path, spec, tmp / "site", samples=(x.numpy(), y.numpy()))
    files = {k: {"bytes": v, "gzip_bytes": len(gzip.compress((tmp / "site" / k).read_bytes(), 6))}
             for k, v in rep.files.items()}
    server = StaticServer(tmp / "site")
    d = phone_browser(tmp / "page", throttle=throttle)
    try:
        d.get(server.url + "index.html?selftest&nosw")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not d.execute_script("return window.fedparaSelftest || null"):
            time.sleep(0.2)
        res = d.execute_script("return window.fedparaSelftest")
    finally:
        d.quit()
        server.stop()
    return {"files": files, "total_bytes": rep.total_bytes,
            "total_gzip_bytes": sum(f["gzip_bytes"] for f in files.values()), "selftest": res}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    p.add_argument("--examples", type=int, default=640)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--throttle", type=float, default=4.0)
    args = p.parse_args()
    if args.render:
        out = ROOT / "docs" / "results"
        (out / "web_results.md").write_text(markdown(json.loads((out / "web_results.json").read_text())))
        return 0
    x, y = data(args.examples)
    xs, ys = base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(), y.tolist()
    results: dict = {"examples": args.examples, "throttle": args.throttle, "batch_size": 32, "shard": SHARD,
                     "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
                     "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        site = stage_client(tmp / "site")
        server = StaticServer(site)
        browsers = {"phone (4x slower CPU)": phone_browser(tmp / "a", throttle=args.throttle),
                    "unthrottled": phone_browser(tmp / "b", throttle=1)}
        try:
            for d in browsers.values():
                d.get(server.url + "harness.html")
                d.set_script_timeout(1800)
            results["features"] = next(iter(browsers.values())).execute_async_script(FEATURES_JS)
            for model in ("mlp", "cnn28"):
                task = base64.b64encode(task_bytes(model)).decode()
                times: dict[str, list[float]] = {}
                for _ in range(args.repeats):  # interleaved: the machine's load hits every configuration alike
                    times.setdefault("python (torch, 1 thread)", []).append(python_seconds(model, x, y))
                    for where, d in browsers.items():
                        for backend in ("wasm", "cpu"):
                            out = d.execute_async_script(TRAIN_JS, task, xs, ys, backend)
                            if "error" in out:
                                raise RuntimeError(out["error"])
                            times.setdefault(f"browser {backend}, {where}", []).append(out["seconds"])
                    print(model, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
                for name, t in times.items():
                    s = spread(t)
                    results["rows"].append({"model": model, "where": name, "seconds": s,
                                            "s_per_1000": s["median"] * 1000 / args.examples,
                                            "s_per_shard_epoch": s["median"] * SHARD / args.examples})
        finally:
            for d in browsers.values():
                d.quit()
            server.stop()
        results["page"] = page_figures(tmp, args.throttle)
    (ROOT / "docs" / "results" / "web_results.json").write_text(json.dumps(results, indent=1))
    (ROOT / "docs" / "results" / "web_results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    py = {row["model"]: row for row in r["rows"] if row["where"].startswith("python")}
    lines = [f"Measured by `benchmarks/bench_web.py` on {r['machine']}, headless chromium "
             f"({r['features'].get('user_agent', '?').split('Chrome/')[-1].split(' ')[0]}), a shared 2-core machine. "
             f"{r['examples']} Fashion-MNIST examples per run (batch 32, FedPara ratio 0.1), "
             f"scaled to 1,000 and to the demo's {r['shard']:,}-example shard; medians of interleaved runs "
             "(min-max).", "",
             "| model | where | s per 1,000 examples | s per epoch of a 20,000 shard | x Python (medians) "
             "| x Python (fastest runs) | runs (s) |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        s = row["seconds"]
        base = py[row["model"]]
        lines.append(f"| {row['model']} | {row['where']} | {row['s_per_1000']:.2f} | {row['s_per_shard_epoch']:.0f} | "
                     f"{row['s_per_1000'] / base['s_per_1000']:.1f}x | {s['min'] / base['seconds']['min']:.1f}x | "
                     f"{s['min']:.2f}-{s['max']:.2f} |")
    pg = r["page"]
    lines += ["", f"Export page (`fedpara export --web`, cnn28, 100 samples): {pg['total_bytes'] / 1e6:.2f} MB in "
              f"{len(pg['files'])} files, {pg['total_gzip_bytes'] / 1e6:.2f} MB gzipped; the largest: "
              + ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB ({v['gzip_bytes'] / 1e6:.2f} gz)"
                          for k, v in sorted(pg["files"].items(), key=lambda kv: -kv[1]["bytes"])[:3]) + ".",
              f"Selftest in the phone-throttled browser: {pg['selftest']['correct']}/{pg['selftest']['total']} "
              f"(an untrained model), p50 {pg['selftest']['p50_ms']:.2f} ms, p95 {pg['selftest']['p95_ms']:.2f} ms per image.",
              "", "Features this headless chromium reports: " + ", ".join(
                  f"{k} {v}" for k, v in r["features"].items() if k != "user_agent") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
