"""Wire-format benchmark: codec throughput next to raw numpy, and bytes per
round for vgg16 / cnn28, dense fp32 vs FedPara at ratios 0.1 / 0.3 / 0.5 under each codec.

    .venv/bin/python benchmarks/bench_wire.py            # writes docs/results/wire_results.{md,json}
                                                        # and the table block in docs/wire.md

"Per round" is the paper's convention (Table 12: FedAvg 122 MB/round for VGG16 = 61 MB down +
61 MB up): one client's task (downlink) plus its update (uplink), counted as MQTT-framed bytes
(envelope + chunk headers + PUBLISH headers). Weights are the seeded initial models; zstd
ratios on trained weights may differ somewhat.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpara.wire import Message, WireConfig, decode, encode  # noqa: E402

CODECS = ["fp32", "fp16", "bf16", "int8", "int8+sr", "fp32+zstd:3", "fp16+zstd:3", "bf16+zstd:3",
          "int8+zstd:3", "int8+sr+zstd:3"]
RATIOS = [0.1, 0.3, 0.5]
TOPIC_DOWN = "fedpara/bench-run/task/client-0001"
TOPIC_UP = "fedpara/bench-run/update/client-0001"


def model_state(name: str, ratio: float | None) -> dict[str, torch.Tensor]:
    import fedpara
    from fedpara import models

    torch.manual_seed(0)
    model = models.build(name, num_classes=10)
    if ratio is not None:
        model = fedpara.convert(model, ratio=ratio)
    return {k: v.detach().clone() for k, v in fedpara.global_state(model).items()}


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput(state: dict[str, torch.Tensor], reps: int) -> list[dict]:
    """Median encode / decode seconds per codec, and raw numpy tobytes / frombuffer."""
    arrays = {k: v.numpy() for k, v in state.items()}
    raw_bytes = sum(a.nbytes for a in arrays.values())
    blobs = {k: a.tobytes() for k, a in arrays.items()}
    t_enc_raw = _best(lambda: [a.tobytes() for a in arrays.values()], reps)
    t_dec_raw = _best(lambda: [np.frombuffer(blobs[k], dtype=a.dtype).reshape(a.shape)
                               for k, a in arrays.items()], reps)
    t_dec_raw_copy = _best(lambda: [np.frombuffer(blobs[k], dtype=a.dtype).reshape(a.shape).copy()
                                    for k, a in arrays.items()], reps)
    rows = [{"codec": "numpy tobytes/frombuffer", "encode_s": t_enc_raw, "decode_s": t_dec_raw,
             "decode_copy_s": t_dec_raw_copy, "bytes": raw_bytes}]
    g = torch.Generator().manual_seed(0)
    for codec in CODECS:
        msg = Message("update", "bench", 1, "c1", state, {"num_examples": 600})
        data = encode(msg, codec, generator=g).data
        rows.append({
            "codec": codec,
            "encode_s": _best(lambda: encode(msg, codec, generator=g), reps),
            "decode_s": _best(lambda: decode(data), reps),
            "bytes": len(data),
        })
    for r in rows:
        r["encode_MBps"] = raw_bytes / r["encode_s"] / 1e6
        r["decode_MBps"] = raw_bytes / r["decode_s"] / 1e6
        r["encode_x_raw"] = r["encode_s"] / t_enc_raw
        r["decode_x_raw"] = r["decode_s"] / t_dec_raw
        r["decode_x_raw_copy"] = r["decode_s"] / t_dec_raw_copy
    return rows


def _message_bytes(kind, state, policy, topic, max_packet, meta) -> dict:
    enc = encode(Message(kind, "bench-run", 7, "client-0001", state, meta), policy,
                 generator=torch.Generator().manual_seed(0))
    frames, stats = enc.split(max_packet, topic, qos=1, protocol=4)
    assert decode(b"".join(f[70:] for f in frames)).round == 7  # really decodes
    return stats.as_dict()


def bytes_per_round(models: list[str], max_packet: int) -> list[dict]:
    rows = []
    task_meta = {"config": {"epochs": 5, "batch_size": 64, "lr": 0.1, "deadline_s": 600}}
    update_meta = {"num_examples": 500, "metrics": {"loss": 1.2345, "accuracy": 0.5678,
                                                    "train_s": 12.5, "joules": 345.6}}
    for name in models:
        for ratio in [None] + RATIOS:
            state = model_state(name, ratio)
            params = sum(v.numel() for v in state.values())
            configs = [(c, WireConfig(downlink=c, uplink=c)) for c in CODECS]
            configs.append(("fedpaq (fp32 down, fp16 up)", WireConfig.preset("fedpaq")))
            for label, cfg in configs:
                down = _message_bytes("task", state, cfg.downlink, TOPIC_DOWN, max_packet, task_meta)
                up = _message_bytes("update", state, cfg.uplink, TOPIC_UP, max_packet, update_meta)
                rows.append({
                    "model": name, "ratio": ratio, "params": params, "codec": label,
                    "tensors": len(state), "down": down, "up": up,
                    "round_payload_bytes": down["payload_bytes"] + up["payload_bytes"],
                    "round_framed_bytes": down["framed_bytes"] + up["framed_bytes"],
                    "round_tensor_bytes": down["tensor_bytes"] + up["tensor_bytes"],
                })
    for r in rows:  # reduction vs the same model, dense, fp32
        base = next(b for b in rows if b["model"] == r["model"] and b["ratio"] is None
                    and b["codec"] == "fp32")
        r["x_smaller_than_dense_fp32"] = base["round_framed_bytes"] / r["round_framed_bytes"]
        payload = r["round_payload_bytes"]
        r["envelope_overhead"] = (payload - r["round_tensor_bytes"]) / r["round_tensor_bytes"]
        r["mqtt_chunk_overhead"] = (r["round_framed_bytes"] - payload) / payload
        r["total_overhead"] = (r["round_framed_bytes"] - r["round_tensor_bytes"]) / r["round_tensor_bytes"]
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


def markdown(tp: list[dict], tp_model: str, rounds: list[dict], max_packet: int, env: str) -> str:
    out = [f"Measured by `benchmarks/bench_wire.py` on {env}.", "",
           f"### Codec throughput ({tp_model}, {tp[0]['bytes'] / 1e6:.1f} MB of float32 tensors, "
           "median of runs, one thread)", "",
           "| codec | encoded MB | encode MB/s | decode MB/s | encode time / numpy tobytes | "
           "decode time / numpy frombuffer | decode time / frombuffer+copy |",
           "|---|---|---|---|---|---|---|"]
    for r in tp:
        out.append(f"| {r['codec']} | {r['bytes'] / 1e6:.2f} | {r['encode_MBps']:.0f} | "
                   f"{r['decode_MBps']:.0f} | {r['encode_x_raw']:.1f}x | {r['decode_x_raw']:.1f}x | "
                   f"{r['decode_x_raw_copy']:.1f}x |")
    out += ["", "numpy frombuffer is zero-copy (it only wraps the buffer); the decoder must copy "
            "to give writable tensors, so the frombuffer+copy column is the like-for-like one.",
            "", f"### Bytes per round (one client: task down + update up; MQTT 3.1.1, QoS 1, "
            f"max packet {max_packet:,} bytes)", "",
            "| model | FedPara ratio | params | codec | MB/round (framed) | x smaller than dense "
            "fp32 | envelope overhead | chunk+MQTT overhead |", "|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        ratio = "dense" if r["ratio"] is None else f"{r['ratio']:.1f}"
        out.append(f"| {r['model']} | {ratio} | {r['params'] / 1e6:.3f}M | {r['codec']} | "
                   f"{r['round_framed_bytes'] / 1e6:.3f} | {r['x_smaller_than_dense_fp32']:.2f}x | "
                   f"{_pct(r['envelope_overhead'])} | {_pct(r['mqtt_chunk_overhead'])} |")
    out += ["", "Envelope overhead = (envelope - codec output) / codec output (fixed header, JSON "
            "manifest, safetensors headers, zstd framing; negative when zstd shrinks the data). "
            "Chunk+MQTT overhead = (framed - envelope) / envelope.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--reps", type=int, default=5, help="timing repetitions (median)")
    p.add_argument("--models", default="vgg16,cnn28")
    p.add_argument("--throughput-model", default="vgg16", help="its FedPara 0.1 state is timed")
    p.add_argument("--max-packet", type=int, default=1_000_000, help="broker limit (EMQX 1 MB)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = (f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
           f"1 thread")

    tp_state = model_state(args.throughput_model, 0.1)
    tp = throughput(tp_state, args.reps)
    print(f"throughput on {args.throughput_model} FedPara 0.1 ({tp[0]['bytes'] / 1e6:.1f} MB):")
    for r in tp:
        print(f"  {r['codec']:26s} enc {r['encode_MBps']:7.0f} MB/s ({r['encode_x_raw']:5.1f}x raw)"
              f"  dec {r['decode_MBps']:7.0f} MB/s ({r['decode_x_raw']:6.1f}x raw, "
              f"{r['decode_x_raw_copy']:4.1f}x raw+copy)  {r['bytes'] / 1e6:.2f} MB")
    rounds = bytes_per_round(args.models.split(","), args.max_packet)
    print("bytes per round (task + update, framed):")
    for r in rounds:
        print(f"  {r['model']:6s} {str(r['ratio']):5s} {r['codec']:28s} "
              f"{r['round_framed_bytes'] / 1e6:9.3f} MB  {r['x_smaller_than_dense_fp32']:6.2f}x  "
              f"env {_pct(r['envelope_overhead'])}  mqtt {_pct(r['mqtt_chunk_overhead'])}")
    key = next(r for r in rounds if r["model"] == "vgg16" and r["ratio"] == 0.1
               and r["codec"] == "fp16+zstd:3") if "vgg16" in args.models else None
    if key:
        print(f"TARGET vgg16 FedPara 0.1 + fp16 + zstd: {key['x_smaller_than_dense_fp32']:.2f}x "
              f"smaller than dense fp32 (target >= 19x)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(tp, f"{args.throughput_model} FedPara 0.1", rounds, args.max_packet, env)
    (args.out_dir / "wire_results.md").write_text("# Wire format: benchmark results\n\n" + md)
    (args.out_dir / "wire_results.json").write_text(json.dumps(
        {"env": env, "max_packet": args.max_packet, "throughput": tp, "rounds": rounds}, indent=1))
    wire_md = args.out_dir / "wire.md"
    if wire_md.exists():
        text = wire_md.read_text()
        block = re.compile(r"(<!-- bench:begin -->\n).*?(\n<!-- bench:end -->)", re.S)
        if block.search(text):
            wire_md.write_text(block.sub(lambda m: m.group(1) + md + m.group(2), text))
    print(f"wrote {args.out_dir / 'wire_results.md'} and wire_results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
