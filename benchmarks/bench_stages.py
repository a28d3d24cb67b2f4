"""Per-message CPU cost of each step of a round, on the real code paths, one process, no broker.

    python benchmarks/bench_stages.py [--payloads vgg16-fedpara,vgg16-dense] [--repeat 5]

For each payload (the factor states of bench_round.py), median milliseconds (after one untimed
run of each step) of: the coordinator encoding + signing the task and splitting it into 1 MB chunks; a client reassembling, verifying and
decoding it (reassembly takes the envelope's digest, in the runtime as frames arrive; decoding
then skips it); another client of the same pool taking the verified copy (edge_client/pool_verify.py);
loading the factors into the model; the client encoding + signing and splitting its update; the
coordinator reassembling, verifying and decoding it and taking the screen's distance. Beside them,
the primitives the steps cannot avoid: one digest (sha256, blake3) and one copy of the payload.
docs/round.md explains where these costs sit in a round.

Each payload is measured three times, side by side, in fresh processes: SHA-256 envelopes with the
C library's malloc defaults (``FEDPARA_MALLOC=default``); SHA-256 with the settings every
``fedpara`` command applies at start (fedpara/runtime/memory.py: freed buffers are reused instead
of page-faulted in anew); and BLAKE3 envelopes with those settings (docs/wire.md, Digests).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def run(payload: str, repeat: int, digest: str) -> dict[str, float]:
    import hashlib

    from blake3 import blake3

    import torch

    from bench_round import PAYLOADS
    from coordinator.aggregate import delta_norms
    from edge_client.pool_verify import SharedVerified
    from fedpara import global_state, load_state
    from fedpara.models import ModelSpec
    from fedpara.runtime.signing import endpoints, load_public_key, new_key
    from fedpara.wire import CodecPolicy, Limits, Message, MessageKind, Reassembler, WireConfig

    model_name, scheme, ratio, _ = PAYLOADS[payload]
    keys = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    for name in ("coordinator", "c1"):
        new_key(name, keys)
    coord_seal, coord_open = endpoints("coordinator", insecure=False, key_path=keys / "coordinator.key",
                                       trusted={"c1": load_public_key(keys / "c1.pub")})

    def client_endpoints():
        return endpoints("c1", insecure=False, key_path=keys / "c1.key",
                         trusted={"coordinator": load_public_key(keys / "coordinator.pub")})

    client_seal, client_open = client_endpoints()
    model = ModelSpec(model=model_name, scheme=scheme, ratio=ratio).build(0)
    state = global_state(model)
    out: dict[str, float] = {}

    def timed(name, fn):
        times, result = [], fn()  # once untimed: a round's buffers are warm after the first round
        for _ in range(repeat):
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
        return result

    checked = set()  # ids of messages whose digest the reassembler verified (as the runtime uses it)

    def reassemble(frames):
        r = Reassembler(max_partial_bytes=1 << 30)
        data = [x for x in map(r.add, frames) if x is not None][0]
        if r.checked(data):
            checked.add(id(data))
        return data

    task = Message(MessageKind.TASK, "run", 1, "coordinator", state, {"task_id": "t"})
    enc = timed("coordinator: encode + sign task", lambda: coord_seal.seal(task, WireConfig(), digest=digest))
    frames, _ = timed("coordinator: split task", lambda: enc.split(1_000_000, "fedpara/v1/run/task"))
    data = timed("client: reassemble task", lambda: reassemble(frames))

    def opening(opener, message, sender):  # a fresh replay record each time: the same message again
        def run_once():
            opener._last.clear()
            mine = id(message) in checked  # as the runtime: no second hash, tensors aliased in place
            return opener.open(message, Limits(), sender=sender, digest_checked=mine, alias=mine)
        return run_once

    msg = timed("client: verify + decode task", opening(client_open, data, "coordinator"))
    shared = SharedVerified()
    shared.open(data, client_endpoints()[1], Limits(), sender="coordinator")

    out_hit = []
    for _ in range(repeat):  # the pool's other clients: their own verifier, their own copy of the bytes
        opener, mine = client_endpoints()[1], bytes(bytearray(data))
        t = time.perf_counter()
        shared.open(mine, opener, Limits(), sender="coordinator")
        out_hit.append(time.perf_counter() - t)
    out["client of the same pool: take the verified task"] = statistics.median(out_hit) * 1e3
    timed("client: load factors into the model", lambda: load_state(model, msg.tensors))
    update = Message(MessageKind.UPDATE, "run", 1, "c1", global_state(model), {"task_id": "t"})
    uenc = timed("client: encode + sign update", lambda: client_seal.seal(update, CodecPolicy.parse("fp32"), digest=digest))
    uframes, _ = timed("client: split update", lambda: uenc.split(1_000_000, "fedpara/v1/run/update/c1"))
    udata = timed("coordinator: reassemble update", lambda: reassemble(uframes))

    umsg = timed("coordinator: verify + decode update", opening(coord_open, udata, "c1"))
    timed("coordinator: screen distance of update", lambda: delta_norms(state, [umsg.tensors]))
    raw = bytes(data)
    timed("primitive: sha256 of the payload", lambda: hashlib.sha256(raw).digest())
    timed("primitive: blake3 of the payload", lambda: blake3(raw).digest())
    timed("primitive: one copy of the payload", lambda: bytearray(raw))
    out["payload MB"] = len(data) / 1e6
    return out


def main(argv=None) -> int:
    import json
    import os
    import subprocess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--payloads", default="vgg16-fedpara,vgg16-dense")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one payload in this process
    p.add_argument("--digest", default="sha256", help=argparse.SUPPRESS)  # internal, with --one
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if args.one:
        from fedpara.runtime.memory import tune_malloc
        tune_malloc()
        print(json.dumps(run(args.one, args.repeat, args.digest)))
        return 0
    for payload in args.payloads.split(","):
        cols = {}
        for label, malloc, digest in (("sha256, libc malloc", "default", "sha256"),
                                      ("sha256, tuned", "", "sha256"), ("blake3, tuned", "", "blake3")):
            out = subprocess.run([sys.executable, __file__, "--one", payload, "--repeat", str(args.repeat),
                                  "--digest", digest],
                                 env={**os.environ, "FEDPARA_MALLOC": malloc, "OMP_NUM_THREADS": "1"},
                                 check=True, capture_output=True, text=True).stdout
            cols[label] = json.loads(out.strip().splitlines()[-1])
        first = next(iter(cols.values()))
        print(f"\n{payload} ({first['payload MB']:.2f} MB), median of {args.repeat}, ms: "
              f"{' | '.join(cols)}")
        for name in first:
            if name != "payload MB":
                print(f"  {name:52s} " + " | ".join(f"{c[name]:8.2f}" for c in cols.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
