"""What signing costs, side by side in one run: encode vs encode + sign, decode vs verify + decode,
and the bytes a signature adds, for a status, a cnn28 FedPara task and a VGG16 FedPara 0.1 task.

    python benchmarks/bench_signing.py [--repeats 50]

Writes docs/results/signing_results.json and docs/results/signing_results.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fedpara import global_state  # noqa: E402
from fedpara.models import ModelSpec  # noqa: E402
from fedpara.runtime.messages import Status  # noqa: E402
from fedpara.runtime.signing import TRAILER_BYTES, Signer, Verifier, load_private_key, load_trust_dir, new_key  # noqa: E402
from fedpara.wire import Message, MessageKind, decode, encode  # noqa: E402


def ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    keys = Path(tempfile.mkdtemp()) / "keys"
    new_key("coordinator", keys)
    signer = Signer(load_private_key(keys / "coordinator.key"), "coordinator")
    trust = load_trust_dir(keys)
    cases = {
        "status": Message(MessageKind.STATUS, "r", 0, "coordinator", meta=Status("online", role="coordinator").to_meta()),
        "cnn28 FedPara 0.1 task": Message(MessageKind.TASK, "r", 1, "coordinator",
                                          global_state(ModelSpec("cnn28", ratio=0.1).build(0)), {"task_id": "t"}),
        "vgg16 FedPara 0.1 task": Message(MessageKind.TASK, "r", 1, "coordinator",
                                          global_state(ModelSpec("vgg16", ratio=0.1).build(0)), {"task_id": "t"}),
    }
    rows = []
    for name, msg in cases.items():
        repeats = args.repeats if name == "status" else max(5, args.repeats // 5)
        plain = encode(msg).data
        sealed = signer.seal(msg).data
        row = {"message": name, "bytes": len(plain), "signature_bytes": len(sealed) - len(plain),
               "encode_ms": ms(lambda: encode(msg), repeats), "encode_sign_ms": ms(lambda: signer.seal(msg), repeats),
               "decode_ms": ms(lambda: decode(plain), repeats)}
        row["verify_decode_ms"] = ms(lambda: Verifier(trust).open(signer.seal(msg).data, sender="coordinator"),
                                     repeats) - row["encode_sign_ms"]
        row["sign_ms"] = row["encode_sign_ms"] - row["encode_ms"]
        row["verify_ms"] = row["verify_decode_ms"] - row["decode_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"repeats": args.repeats, "trailer_bytes": TRAILER_BYTES, "rows": rows}
    (ROOT / "docs" / "results" / "signing_results.json").write_text(json.dumps(out, indent=2))
    lines = ["# Signing cost (measured)", "", "`python benchmarks/bench_signing.py`: medians, one thread, this machine. "
             "Ed25519 signs the envelope's 32-byte digest, so its cost does not grow with the payload; the "
             "envelope's sha256 over the payload is paid with or without signing.", "",
             "| message | bytes | + signature | encode | encode + sign | decode | verify + decode | sign | verify |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['message']} | {r['bytes']:,} | {r['signature_bytes']} B | {r['encode_ms']:.3f} ms | "
                     f"{r['encode_sign_ms']:.3f} ms | {r['decode_ms']:.3f} ms | {r['verify_decode_ms']:.3f} ms | "
                     f"{r['sign_ms']:+.3f} ms | {r['verify_ms']:+.3f} ms |")
    (ROOT / "docs" / "results" / "signing_results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
