"""Footprint on a device: peak RSS and import time of a client round and of ``fedpara-infer``,
and the installed size of each install profile.

    .venv/bin/python benchmarks/bench_footprint.py [--out docs/footprint]   # ~3 min on 2 cores

* Client (cnn28, mlp, char_lstm; FedPara gamma 0.1): a child process does what ``fedpara client``
  does in one round, without MQTT: imports the client stack (torch, fedpara, edge_client.client,
  paho-mqtt), loads client 0 of 10 (Fashion-MNIST: 6,000 images; Shakespeare: 3,000 sequences of
  its roles, capped because a full shard takes many minutes per epoch on one thread), and runs
  the client's own ``edge_client.trainer.Trainer``: ``fit`` of one task (one local epoch, batch
  64, 1 thread; builds the model, trains, saves its state), then ``evaluate_local`` on its local
  test split, and takes the global state that would be sent. Peak RSS is the kernel's high-water mark (VmHWM) of that process;
  ``phase_peak_mb`` is that mark read after each phase (imports, data, train, local eval).
* Infer: ``fedpara-infer`` (``export.infer.main``) on cnn28's ONNX export over the 10,000 test
  images, run with the ``[infer]`` venv's Python when one exists (``--infer-venv``, built by
  tests/test_infer_profile.py or ``python -m venv V && V/bin/pip install -c constraints.txt
  -e '.[infer]'``), else with this interpreter; the child asserts torch was never imported.
* Install size: the bytes on disk of every installed file of each profile's dependency closure
  (this project excluded), read from this venv's package metadata; and ``du`` of the infer venv.

Goals: cnn28 client <= 350 MB peak RSS; infer on cnn28 <= 120 MB without torch.

``--baseline OLD.json`` (a previous run of this script, e.g. on the code before a change) adds a
before/after table of peak RSS and infer latency to the markdown and the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"client_cnn28_mb": 350.0, "infer_cnn28_mb": 120.0}
CLIENT_CASES = {"cnn28": "fashion-mnist,clients=10,index=0", "mlp": "fashion-mnist,clients=10,index=0",
                "char_lstm": "shakespeare,clients=10,index=0,limit=3000"}
PROFILES = ("client", "coordinator", "broker", "infer", "export")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# --- children -------------------------------------------------------------------------------------

def child_client(model: str, data: str) -> dict:
    t0 = time.perf_counter()
    import torch

    import edge_client.client  # noqa: F401  (what `fedpara client` imports)
    import fedpara
    from edge_client.trainer import Trainer
    from fedpara.models import ModelSpec
    from fedpara.runtime.messages import Task, TrainParams
    from fedpara.wire import CodecPolicy, encode  # noqa: F401
    torch.set_num_threads(1)
    t_import = time.perf_counter() - t0
    phases = {"import": _hwm_mb()}
    trainer = Trainer("bench", data, device="cpu", threads=1, state_dir=tempfile.mkdtemp(), eval_local=False)
    info = trainer.data_info
    phases["data"] = _hwm_mb()
    spec = ModelSpec(model=model, scheme="fedpara", ratio=0.1, num_classes=info["num_classes"])
    task = Task("bench-1-1", ("bench",), spec, TrainParams(epochs=1, batch_size=64, lr=0.1))
    t1 = time.perf_counter()
    out = trainer.fit(task, 1, fedpara.global_state(spec.build(0)))  # the client's own code path
    trainer.save_state()
    stats = {"seconds": out.metrics["train_s"]}
    phases["train"] = _hwm_mb()
    acc = trainer.evaluate_local()  # as the client does it after training
    phases["local_eval"] = _hwm_mb()
    payload = sum(t.numel() * t.element_size() for t in out.tensors.values())
    return {"import_s": t_import, "round_s": time.perf_counter() - t1, "samples": info["num_samples"],
            "train_s": stats["seconds"], "update_bytes": payload, "local_eval": acc,
            "phase_peak_mb": phases}


def child_infer(onnx_path: str, data: str) -> dict:
    t0 = time.perf_counter()
    from export.infer import INFER_COMMAND, main  # noqa: F401
    from export.onnx_model import OnnxModel  # noqa: F401  (imports onnxruntime)
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([onnx_path, "--data", data, "--runs", "200", "--json"])
    result = json.loads(out.getvalue())
    assert rc == 0 and "torch" not in sys.modules, "infer imported torch"
    return {"import_s": t_import, "run_s": time.perf_counter() - t1, "samples": result["samples"],
            "p50_ms": result["batch1"]["p50_ms"], "throughput_64": result["batch64"]["throughput_per_s"],
            "torch_imported": "torch" in sys.modules}


# --- measuring --------------------------------------------------------------------------------------

def _hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _hwm_mb() -> float:
    return round((_hwm_kb(os.getpid()) or 0) / 1024, 1)


def measure(python: str, args: list[str], timeout: float = 900) -> dict:
    """Run this file as a child; its JSON result plus peak RSS (VmHWM, polled until exit)."""
    proc = subprocess.Popen([python, __file__, "--child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    peak, deadline = 0, time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        peak = max(peak, _hwm_kb(proc.pid) or 0)
        time.sleep(0.02)
    out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed ({proc.returncode}):\n{err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(max(peak, result.pop("hwm_kb", 0)) / 1024, 1)
    return result


def _dist_size(dist: metadata.Distribution) -> int:
    total = 0
    for f in dist.files or ():
        try:
            total += Path(dist.locate_file(f)).stat().st_size
        except OSError:
            pass
    return total


def profile_sizes() -> dict:
    """Installed bytes of each profile's dependency closure (this project's own files excluded)."""
    from packaging.requirements import Requirement
    own = metadata.distribution("fedpara-edge")

    def closure(reqs: list[str], extras: tuple = ("",)) -> set[str]:
        seen: set[str] = set()
        todo = list(reqs)
        while todo:
            r = Requirement(todo.pop())
            if r.marker and not any(r.marker.evaluate({"extra": e}) for e in extras):
                continue
            name = r.name.lower().replace("_", "-")
            if name in seen or name == "fedpara-edge":
                continue
            seen.add(name)
            for sub in metadata.distribution(name).requires or ():
                sr = Requirement(sub)
                if sr.marker is None or sr.marker.evaluate({"extra": ""}):
                    todo.append(sub)
        return seen

    base = [r for r in own.requires or () if "extra ==" not in r]
    out = {}
    for profile in PROFILES:
        wanted = [r for r in own.requires or () if f'extra == "{profile}"' in r.replace("'", '"')]
        names = closure(base + wanted, extras=(profile,))
        # self-references (fedpara-edge[x]) are not in this project's profiles but would be here
        sizes = {n: _dist_size(metadata.distribution(n)) for n in names}
        out[profile] = {"mb": round(sum(sizes.values()) / 1e6, 1), "packages": len(sizes),
                        "largest": sorted(((n, round(s / 1e6, 1)) for n, s in sizes.items()),
                                          key=lambda t: -t[1])[:4]}
    return out


def _du_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6, 1)


def export_cnn28(work: Path) -> Path:
    code = ("import fedpara; from fedpara.models import ModelSpec; "
            "from fedpara.runtime.checkpoint import save_checkpoint; "
            "s = ModelSpec(model='cnn28', scheme='fedpara', ratio=0.1); "
            f"save_checkpoint({str(work / 'c.safetensors')!r}, fedpara.global_state(s.build()), s, round=1)")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=ROOT)
    out = work / "cnn28.onnx"
    subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "export", str(work / "c.safetensors"),
                    "--out", str(out)], check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def _ok(flag: bool) -> str:
    return "**met**" if flag else "**missed**"


def render(r: dict) -> str:
    m, g = r["machine"], r["goals"]
    lines = ["# Footprint on the device", "",
             f"Measured by `benchmarks/bench_footprint.py` on {m['cores']} cores ({m['cpu']}), Python "
             f"{m['python']}, 1 thread; raw numbers in `footprint.json`. How each figure is taken is in "
             "the script's docstring: a client *round* is a child process doing what `fedpara client` does "
             "in one round without MQTT; peak RSS is the kernel's VmHWM of that process.", "",
             "## Client round (FedPara, gamma 0.1, client 0 of 10, 1 local epoch)", "",
             "| model | data | samples | import s | round s | peak RSS MB | peak after import / data / "
             "train / local eval MB |", "|---|---|---|---|---|---|---|"]
    for name, c in r["client"].items():
        if "error" in c:
            lines.append(f"| {name} | {c['data']} | - | - | - | not measured: {c['error']} | - |")
        else:
            ph = " / ".join(f"{v:.0f}" for v in c.get("phase_peak_mb", {}).values()) or "-"
            lines.append(f"| {name} | {c['data']} | {c['samples']} | {c['import_s']:.2f} | "
                         f"{c['round_s']:.1f} | {c['peak_rss_mb']:.0f} | {ph} |")
    i = r["infer"]
    lines += ["", "## Inference without torch (`fedpara-infer`, cnn28)", "",
              f"{i['model']} on {i['data']}, run with {i['python']}: import {i['import_s']:.2f} s, "
              f"whole command {i['run_s']:.1f} s, batch-1 p50 {i['p50_ms']:.3f} ms, batch-64 "
              f"{i['throughput_64']:,.0f} samples/s, **peak RSS {i['peak_rss_mb']:.0f} MB**, torch imported: "
              f"{i['torch_imported']}.", "",
              *_render_baseline(r),
              "## Goals", "",
              f"- cnn28 client <= {g['client_cnn28_mb']:.0f} MB peak RSS: "
              f"{r['client'].get('cnn28', {}).get('peak_rss_mb', 'n/a')} MB, {_ok(r['goals_met']['client_cnn28'])}",
              f"- infer of cnn28 <= {g['infer_cnn28_mb']:.0f} MB without torch: {i['peak_rss_mb']} MB, "
              f"{_ok(r['goals_met']['infer_cnn28'])}", "",
              "## Installed size per profile", "",
              "Bytes on disk of the installed files of each profile's dependency closure (x86_64 CPU "
              "wheels from this venv; this project's own files not counted). aarch64 wheels differ; "
              "Jetson's torch is NVIDIA's build.", "",
              "| profile | MB | packages | largest (MB) |", "|---|---|---|---|"]
    for name, p in r["install_mb"].items():
        big = ", ".join(f"{n} {mb}" for n, mb in p["largest"])
        lines.append(f"| {name} | {p['mb']:.0f} | {p['packages']} | {big} |")
    if "infer_venv_du_mb" in r:
        lines += ["", f"A real venv with only `[infer]` (pip included) takes {r['infer_venv_du_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def _render_baseline(r: dict) -> list[str]:
    b = r.get("baseline")
    if not b:
        return []
    lines = [f"## Before / after ({b['label']})", "",
             "Both measured by this script on the same machine, one after the other.", "",
             "| figure | before | after |", "|---|---|---|"]
    for name, c in r["client"].items():
        old = b["client"].get(name, {})
        if "peak_rss_mb" in c and "peak_rss_mb" in old:
            lines.append(f"| client {name} peak RSS MB | {old['peak_rss_mb']:.0f} | {c['peak_rss_mb']:.0f} |")
            lines.append(f"| client {name} round s | {old['round_s']:.1f} | {c['round_s']:.1f} |")
    i, oi = r["infer"], b["infer"]
    lines += [f"| infer cnn28 peak RSS MB | {oi['peak_rss_mb']:.0f} | {i['peak_rss_mb']:.0f} |",
              f"| infer whole command s | {oi['run_s']:.2f} | {i['run_s']:.2f} |",
              f"| infer batch-1 p50 ms | {oi['p50_ms']:.3f} | {i['p50_ms']:.3f} |",
              f"| infer batch-64 samples/s | {oi['throughput_64']:,.0f} | {i['throughput_64']:,.0f} |", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "footprint"), help="writes OUT.json and OUT.md")
    ap.add_argument("--infer-venv", type=Path, default=None, help="venv with only the [infer] profile")
    ap.add_argument("--models", default=",".join(CLIENT_CASES))
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier OUT.json to compare with")
    ap.add_argument("--baseline-label", default="before -> after", help="what the baseline is")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        res = child_client(*rest) if kind == "client" else child_infer(*rest)
        res["hwm_kb"] = _hwm_kb(os.getpid()) or 0
        print(json.dumps(res))
        return 0
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version()}, "goals": GOALS, "client": {}}
    for model in args.models.split(","):
        try:
            results["client"][model] = {"data": CLIENT_CASES[model], **measure(sys.executable, ["client", model, CLIENT_CASES[model]])}
        except RuntimeError as exc:
            results["client"][model] = {"data": CLIENT_CASES[model], "error": str(exc).splitlines()[-1]}
        print(model, results["client"][model], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_cnn28(Path(tmp))
        venv_py = args.infer_venv / "bin" / "python" if args.infer_venv else None
        python = str(venv_py) if venv_py and venv_py.is_file() else sys.executable
        results["infer"] = {"model": "cnn28 fedpara 0.1, fp32 ONNX", "data": "fashion-mnist (10,000)",
                            "python": "infer-only venv" if python != sys.executable else "this venv",
                            **measure(python, ["infer", str(onnx_path), "fashion-mnist"])}
        print("infer", results["infer"], flush=True)
    results["install_mb"] = profile_sizes()
    if args.infer_venv and args.infer_venv.is_dir():
        results["infer_venv_du_mb"] = _du_mb(args.infer_venv)
    c = results["client"].get("cnn28", {})
    results["goals_met"] = {"client_cnn28": c.get("peak_rss_mb", 1e9) <= GOALS["client_cnn28_mb"],
                            "infer_cnn28": results["infer"]["peak_rss_mb"] <= GOALS["infer_cnn28_mb"]
                            and not results["infer"]["torch_imported"]}
    if args.baseline:
        old = json.loads(args.baseline.read_text())
        results["baseline"] = {"label": args.baseline_label, "client": old["client"], "infer": old["infer"]}
    Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out + ".md").write_text(render(results))
    print(json.dumps(results["goals_met"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
