"""Delta coding with error feedback through the real protocol (wire = "delta" / "lean";
docs/compression.md): tasks are deltas between digested states, every client ends a round holding
exactly the coordinator's mirror, a client that lost its base gets the full state and never trains
on a wrong one, and the uplink residual survives a client restart."""

import json
import threading
from pathlib import Path

import pytest
import torch
from conftest import needs_fmnist
from safetensors import safe_open
from support import Sniffer, coord_cfg, start_clients

from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from fedpara import global_state
from fedpara.models import ModelSpec
from fedpara.runtime.messages import Task, TrainParams
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import RunDir
from fedpara.wire import CodecPolicy, Message, WireError
from fedpara.wire.lean import CODECS, LEAN_DOWNLINK, LEAN_UPLINK, policy_codecs, state_digest, status_holds, subtract
from fedpara.wire.lean_client import RESIDUAL_FILE, LeanClient

torch.set_num_threads(1)


def _mirror_digest(cfg) -> str:
    with safe_open(f"{cfg.out}/lean_mirror.safetensors", framework="pt") as f:
        return f.metadata()["digest"]


def _run(url, cfg, tmp_path, n=3, before_start=None):
    """A run with ``n`` in-process clients that take turns training, as a pool's clients do (one
    process, one torch RNG: the initial model is built while nobody trains)."""
    sniffer = Sniffer(url, cfg.run_id)
    lock = threading.Lock()

    def prepare(client):
        client.trainer.lock = client.lean.rng_lock = lock
        if before_start is not None:
            before_start(client)

    clients = start_clients(url, cfg, tmp_path, n, before_start=prepare, energy="off")
    try:
        summary = Coordinator(cfg, parse_broker_url(url)).run()
    finally:
        for c in clients:
            c.stop()
        sniffer.stop()
    tasks = [m for topic, m in sniffer.decoded() if m.kind == "task"]
    return summary, RunDir(cfg.out).read_metrics(), clients, tasks


@needs_fmnist
def test_lean_run_sends_chained_deltas_and_every_client_holds_the_mirror(mosquitto_broker, tmp_path):
    cfg = coord_cfg(tmp_path, wire="lean", rounds=3)
    summary, rows, clients, tasks = _run(mosquitto_broker, cfg, tmp_path)
    assert summary["status"] == "completed" and [r["replied"] for r in rows] == [3, 3, 3]
    leans = [t.meta["lean"] for t in tasks]
    assert [x["mode"] for x in leans] == ["delta"] * 3  # one broadcast a round, round 1 from the initial model
    init = state_digest(global_state(ModelSpec.from_dict(tasks[0].meta["spec"]).build(cfg.seed)))
    assert leans[0]["base"] == init
    assert [x["base"] for x in leans[1:]] == [x["target"] for x in leans[:-1]]  # each from the last one's result
    assert all(c.lean.held_digest == leans[-1]["target"] == _mirror_digest(cfg) for c in clients)
    assert all(not c.counters["lean_resync"] for c in clients)
    # the uplink's deltas carry their base; every client kept a residual
    assert all((tmp_path / f"state-c{i}" / RESIDUAL_FILE).exists() for i in range(3))
    dense_fp32 = rows[0]["dense_bytes_down"]
    assert all(r["mqtt_bytes_up"] < 0.25 * r["dense_bytes_up"] for r in rows)
    assert all(r["mqtt_bytes_down"] < 0.25 * dense_fp32 for r in rows)


@needs_fmnist
def test_a_client_without_the_base_gets_the_full_state_and_never_trains_on_a_wrong_one(mosquitto_broker, tmp_path):
    cfg = coord_cfg(tmp_path, wire="delta", downlink="int4+zstd:3", uplink="int4+zstd:3", rounds=3)
    trained_on = []

    def forgetful(client):
        real_receive, real_out = client.lean.receive, client.lean.outgoing
        calls = {"n": 0}

        def receive(msg, task):
            calls["n"] += 1
            # before round 3 (round 2's base is still the initial model, which any client can build):
            # the device lost what it held (a wiped state directory)
            if calls["n"] == 3:
                client.lean.held = {k: v + 1 for k, v in client.lean.held.items()}
                client.lean.held_digest = "0" * 64
            return real_receive(msg, task)

        def outgoing(trained, msg, task):
            trained_on.append((client.cfg.client_id, msg.round, state_digest(msg.tensors)))
            return real_out(trained, msg, task)

        client.lean.receive, client.lean.outgoing = receive, outgoing

    summary, rows, clients, tasks = _run(mosquitto_broker, cfg, tmp_path,
                                         before_start=lambda c: forgetful(c) if c.cfg.client_id == "c1" else None)
    assert summary["status"] == "completed" and [r["replied"] for r in rows] == [3, 3, 3]
    assert clients[1].counters["lean_resync"] == 1 and not clients[0].counters["lean_resync"]
    full = [t for t in tasks if t.meta["lean"]["mode"] == "full"]
    assert len(full) == 1 and full[0].round == 3  # sent to c1 alone, on its own topic
    targets = {t.round: t.meta["lean"]["target"] for t in tasks}
    assert all(digest == targets[rnd] for _, rnd, digest in trained_on)  # every round trained on the mirror
    assert sorted(rnd for c, rnd, _ in trained_on if c == "c1") == [1, 2, 3]
    assert all(c.lean.held_digest == _mirror_digest(cfg) for c in clients)


@needs_fmnist
def test_a_client_that_does_not_announce_delta_coding_gets_full_states_it_can_answer(mosquitto_broker, tmp_path):
    cfg = coord_cfg(tmp_path, wire="lean", rounds=2)

    def older(client):
        if client.cfg.client_id == "c2":  # an older version: no codecs in its status, no lean key read
            client.lean.status_meta = lambda: {}
            client.lean.receive = lambda msg, task: msg
            client.lean.outgoing = lambda trained, msg, task: (dict(trained), {})

    summary, rows, clients, tasks = _run(mosquitto_broker, cfg, tmp_path, before_start=older)
    assert summary["status"] == "completed" and [r["replied"] for r in rows] == [3, 3]
    modes = sorted({(t.round, t.meta["lean"]["mode"], t.meta["uplink"]) for t in tasks})  # per client topic
    assert modes == [(r, m, u) for r in (1, 2) for m, u in (("delta", LEAN_UPLINK), ("full", "fp32"))]
    assert clients[0].lean.held_digest == _mirror_digest(cfg)


def _task(spec: ModelSpec, lean: dict, state: dict, rnd: int = 1):
    task = Task(task_id=f"s-{rnd}-1", selected=("c0",), spec=spec, train=TrainParams(), init_seed=0)
    return task, Message("task", "r1", rnd, "coordinator", state, {**task.to_meta(), "lean": lean})


def test_the_client_state_survives_a_restart_and_a_bad_full_state_is_refused(tmp_path):
    spec = ModelSpec(model="mlp", scheme="fedpara", ratio=0.3, num_classes=10)
    init = {k: v.float() for k, v in global_state(spec.build(0)).items()}
    new = {k: v + 0.01 for k, v in init.items()}
    zero = subtract(new, new)
    lc = LeanClient(tmp_path, "r1")
    assert lc.status_meta()["lean"]["holds"] is None and "topk" in lc.status_meta()["codecs"]
    task, msg = _task(spec, {"mode": "delta", "base": state_digest(init), "target": state_digest(new),
                             "ef": True}, subtract(new, init))
    got = lc.receive(msg, task)
    assert state_digest(got.tensors) == state_digest(new)
    trained = {k: v + 0.5 * torch.randn_like(v) for k, v in new.items()}
    tensors, meta = lc.outgoing(trained, got, task)
    assert meta == {"lean": {"base": state_digest(new)}}
    from fedpara.wire import encode
    lc.sent(encode(Message("update", "r1", 1, "c0", tensors, meta), "int4+topk:0.05"))
    residual = {k: v.clone() for k, v in lc.feedback.residual.items()}
    assert max(float(v.abs().max()) for v in residual.values()) > 0.1

    again = LeanClient(tmp_path, "r1")  # a restart: holds the same state, owes the same residual
    assert again.status_meta()["lean"]["holds"] == state_digest(new)
    task2, msg2 = _task(spec, {"mode": "delta", "base": state_digest(new), "target": state_digest(new),
                               "ef": True}, zero, rnd=2)
    got2 = again.receive(msg2, task2)
    tensors2, _ = again.outgoing(got2.tensors, got2, task2)  # trained nothing: sends exactly the residual
    assert all(torch.allclose(tensors2[k], residual[k]) for k in residual)
    assert LeanClient(tmp_path, "another-run").held_digest is None  # another run starts afresh

    _, bad = _task(spec, {"mode": "full", "target": state_digest(init), "ef": True}, new)
    with pytest.raises(WireError, match="digest"):
        again.receive(bad, task)


@pytest.mark.parametrize("kw,match", [({"wire": "fast"}, "wire"),
                                      ({"wire": "delta", "uplink": "int8+sr"}, "uplink"),
                                      ({"wire": "lean", "dp_noise_multiplier": 1.0, "dp_clip_norm": 1.0}, "wire")])
def test_config_errors_name_the_field(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        coord_cfg(tmp_path, **kw)


def test_lean_sets_the_measured_preset(tmp_path):
    cfg = coord_cfg(tmp_path, wire="lean")
    assert (cfg.downlink, cfg.uplink) == (LEAN_DOWNLINK, LEAN_UPLINK)
    assert CoordinatorConfig(insecure=True).wire == "plain" and json.dumps(cfg.to_dict())


COMPRESS = Path(__file__).resolve().parents[1] / "docs" / "results" / "compress_results.json"


@pytest.mark.skipif(not COMPRESS.exists(), reason="no docs/results/compress_results.json")
def test_lean_is_the_measured_choice_and_meets_the_goal():
    """LEAN_* are the policies of the configuration with error feedback that has the fewest bytes a
    round among those ending within 1 pp of FedPara fp32 in every setting measured
    (benchmarks/bench_compress.py), and it is >= 30x fewer bytes than dense fp32 to a target in each."""
    res = json.loads(COMPRESS.read_text())
    groups = [g for parts in res["summary"].values() for g in parts.values()]
    extra = {c: e for c, (_, e) in res["setting"]["configs"].items()}
    compressed = [c for c, e in extra.items() if e.get("wire") == "delta" and e.get("error_feedback", True)]
    within = [c for c in compressed if all(c in g and g[c]["vs_fedpara_fp32_pp"] >= -1.0 for g in groups)]
    best = min(within, key=lambda c: sum(g[c]["mb_per_round"] for g in groups))
    assert (extra[best]["downlink"], extra[best]["uplink"]) == (LEAN_DOWNLINK, LEAN_UPLINK), within
    for g in groups:
        assert max(x or 0 for x in g[best]["to_target_vs_dense"].values()) >= 30, g[best]["to_target_vs_dense"]


def test_a_resent_task_is_the_delta_unless_the_client_refused_it(tmp_path):
    from coordinator.leanwire import LeanServer

    cfg = coord_cfg(tmp_path, wire="lean")
    server = LeanServer(cfg, cfg.spec, tmp_path)
    server._delta_msg, server._full_msg = "delta", "full"
    server.sent_delta, server.receivers, server.capable = {"c0", "c1"}, {"c0", "c1"}, {"c0", "c1"}

    class Out:  # what resend_enc needs of coordinator.outbound.Outbound
        class seal:  # noqa: N801 - stands in for the signer: returns what it would seal
            seal = staticmethod(lambda msg, policy, digest: (msg, str(policy)))

        digest_for = staticmethod(lambda receivers: "sha256")

    assert server.resend_enc(Out, ["c0", "c1"])[0] == "delta"  # a reconnect: the delta again
    server.task_id = "s-3-1"
    stale = {"codecs": list(CODECS), "lean": {"holds": None}}  # sent before the task arrived: no refusal
    assert not server.saw_status("c1", stale) and not server.saw_status("c1", {**stale, "lean": {"refused": "s-2-1"}})
    refused = {"codecs": list(CODECS), "lean": {"holds": "0" * 64, "refused": "s-3-1"}}
    assert server.saw_status("c1", refused) and server.resend_enc(Out, ["c1"])[0] == "full"
    assert not server.saw_status("c0", {"codecs": list(CODECS), "lean": {"holds": server.digest}})


def test_a_client_must_announce_every_codec_the_policies_use_to_be_sent_deltas(tmp_path):
    """An older client that decodes deltas and int4 but not int2 gets full fp32 states (and answers
    in fp32) under an int2 policy, instead of a task it cannot decode."""
    from coordinator.leanwire import LeanServer

    cfg = coord_cfg(tmp_path, wire="delta", downlink="int2+zstd:3", uplink="int4+topk:0.1+zstd:3")
    server = LeanServer(cfg, cfg.spec, tmp_path)
    assert server.needs == {"delta", "int2", "int4", "topk"}
    older = [c for c in CODECS if c != "int2"]
    server.saw_status("new", {"codecs": list(CODECS), "lean": {"holds": None}})
    server.saw_status("old", {"codecs": older, "lean": {"holds": None}})
    assert server.capable == {"new"}
    assert policy_codecs(CodecPolicy.parse("fp16+zstd:3; *.bias=raw")) == {"delta", "fp16"}
    assert status_holds({"codecs": ["delta", 3, None]})[0] and not status_holds({"codecs": "delta"})[0]
