"""Robust aggregation in factor space, the screen, bounded metrics and example counts, failure
reports: pure parts, then an insider on a real Mosquitto."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from coordinator import aggregate as agg
from coordinator.acceptance import RoundState, judge_update
from coordinator.config import CoordinatorConfig
from coordinator.registry import ClientRegistry
from coordinator.strategy import FitResult, Strategy, parse_aggregator
from fedpara.runtime.messages import Failure, Status, sanitize_metrics
from fedpara.runtime.rundir import RunDir
from fedpara.wire import Message, MessageKind

G = torch.Generator().manual_seed(0)
REF = {"a.x1": torch.zeros(8, 4), "a.bias": torch.zeros(8)}


def honest(i: int, scale: float = 0.01):
    g = torch.Generator().manual_seed(i)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in REF.items()}


def attacker(scale: float = 1e4):
    return {k: scale * torch.randn(v.shape, generator=G) for k, v in REF.items()}


def dist(state) -> float:
    return math.sqrt(sum(float((state[k] - REF[k]).pow(2).sum()) for k in REF))


@pytest.mark.parametrize("name", ["median", "trimmed-mean:0.25", "krum:1", "norm-clip:0.5"])
def test_robust_aggregators_stay_near_the_honest_updates(name):
    states = [honest(i) for i in range(4)] + [attacker()]
    weights = [10, 10, 10, 10, 10**9]
    s = Strategy(aggregator=name, screen_factor=0)
    out = s.aggregate(REF, [FitResult(f"c{i}", st, w) for i, (st, w) in enumerate(zip(states, weights))])
    assert dist(out) < 0.5, (name, dist(out))
    plain = Strategy(screen_factor=0).aggregate(REF, [FitResult(f"c{i}", st, w) for i, (st, w) in enumerate(zip(states, weights))])
    assert dist(plain) > 1e3  # what they protect against


def test_median_and_trimmed_mean_exact_on_small_cases():
    states = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 100.0)]
    assert agg.coordinate_median(states)["w"].item() == 2.0
    assert agg.trimmed_mean(states + [{"w": torch.tensor([-50.0])}], 0.25)["w"].item() == 1.5
    assert agg.krum([{"w": torch.tensor([v])} for v in (0.0, 0.1, 0.2, 50.0, 0.15)], 1)["w"].item() == pytest.approx(0.15)
    with pytest.raises(ValueError, match="2f \\+ 3"):
        agg.krum(states, 1)


def test_screen_drops_far_and_nonfinite_updates():
    states = [honest(i) for i in range(4)] + [{k: torch.full_like(v, 1e30) for k, v in REF.items()}]
    assert agg.screen(REF, states, 10.0) == [0, 1, 2, 3]
    inf = {k: torch.full_like(v, float("inf")) for k, v in REF.items()}
    assert agg.screen(REF, [honest(0), inf], 10.0) == [0]  # too few to compare: only non-finite goes


def test_screen_uses_the_norms_taken_on_arrival():
    states = [honest(i) for i in range(4)] + [{k: torch.full_like(v, 1e30) for k, v in REF.items()}]
    norms = agg.delta_norms(REF, states)
    assert agg.screen(REF, states, 10.0, norms) == agg.screen(REF, states, 10.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="norms"):
        agg.screen(REF, states, 10.0, norms[:2])
    # the strategy takes them from the results (the coordinator fills delta_norm per update)
    results = [FitResult(f"c{i}", st, 100, delta_norm=n) for i, (st, n) in enumerate(zip(states, norms))]
    lying = [FitResult(r.client_id, r.state, 100, delta_norm=1.0) for r in results]
    assert Strategy().screen(REF, results)[1] == ["c4"]
    assert Strategy().screen(REF, lying)[1] == []  # it trusts them: they are computed by the coordinator


def test_fedavg_with_the_default_screen_survives_1e30_factors():
    results = [FitResult(f"c{i}", honest(i), 100) for i in range(3)]
    results.append(FitResult("evil", {k: torch.full_like(v, 1e30) for k, v in REF.items()}, 10**6))
    s = Strategy()
    kept, screened = s.screen(REF, results)
    assert screened == ["evil"]
    assert dist(s.aggregate(REF, kept)) < 0.1


@pytest.mark.parametrize("text, ok", [("fedavg", True), ("median", True), ("trimmed-mean:0.1", True),
                                      ("krum:2", True), ("norm-clip:3", True), ("trimmed-mean", False),
                                      ("trimmed-mean:0.5", False), ("krum:1.5", False), ("norm-clip:inf", False),
                                      ("mean", False), ("median:1", False)])
def test_parse_aggregator(text, ok):
    if ok:
        parse_aggregator(text)
        CoordinatorConfig(aggregator=text, insecure=True)
    else:
        with pytest.raises(ValueError, match="aggregator"):
            CoordinatorConfig(aggregator=text, insecure=True)


def test_metrics_are_bounded_and_strict_json(tmp_path):
    raw = {"loss": 10**400, "local_accuracy": float("nan"), "steps": 12, "evil": "x" * 10**6,
           "energy": {"total_j": 5.0, "source": "estimate", "note": "y" * 10**6, "prev_upload": "wrong type",
                      "deep": {"a": {"b": {"c": 1}}}},
           "prev_upload": {"round": 1, "acked": True, "mqtt_bytes": float("inf")}}
    clean = sanitize_metrics(raw)
    assert clean == {"steps": 12, "energy": {"total_j": 5.0, "source": "estimate", "prev_upload": "wrong type",
                                             "deep": {}}, "prev_upload": {"round": 1, "acked": True}}
    from coordinator.observation.records import (
        energy_fields,  # a wrongly typed field inside is harmless there
    )
    assert energy_fields([FitResult("a", REF, 1, clean)]) == {"energy_j": 5.0, "energy_measured": False}
    rd = RunDir(tmp_path)
    rd.start_metrics()
    rd.append_metrics({"round": 1, "accuracy": float("nan"), "x": [float("inf")]})
    assert json.loads(rd.metrics_path.read_text()) == {"round": 1, "accuracy": None, "x": [None]}
    assert "NaN" not in rd.metrics_path.read_text()


def _state(**kw):
    base = dict(run_id="r", round=1, task_id="t", sampled=frozenset({"a"}), replied=frozenset(), reference=REF,
                max_examples=1000, announced={"a": 50})
    base.update(kw)
    return RoundState(**base)


def test_example_counts_are_capped_by_announcement_and_config():
    msg = Message(MessageKind.UPDATE, "r", 1, "a", REF, {"task_id": "t", "num_examples": 2**40})
    assert judge_update(msg, "a", _state()).update.num_examples == 50
    assert judge_update(msg, "a", _state(announced={})).update.num_examples == 1000
    for n in (2**62, 10**400):
        huge = Message(MessageKind.UPDATE, "r", 1, "a", REF, {"task_id": "t", "num_examples": n})
        assert judge_update(huge, "a", _state()).reason == "malformed"


def test_failure_reports_are_typed():
    msg = Message(MessageKind.UPDATE, "r", 1, "a", {}, Failure("t", "model needs 3 channels", "ValueError").to_meta())
    v = judge_update(msg, "a", _state())
    assert v.reason == "failed" and v.failure == Failure("t", "model needs 3 channels", "ValueError")


def test_registry_is_bounded():
    reg = ClientRegistry(max_clients=2)
    reg.update("a", Status("online"))
    reg.update("b", Status("online"))
    with pytest.raises(ValueError, match="registry full"):
        reg.update("c", Status("online"))
    reg.update("a", Status("offline"))  # known ids still update
    assert reg.live() == ["b"]


def test_inbox_budgets_and_rate():
    from fedpara.runtime.inbox import Inbox

    t = [0.0]
    box = Inbox(per_topic_bytes=100, total_bytes=150, rate_bytes_per_s=10, clock=lambda: t[0])
    assert [box.put("a", b"x" * 40) for _ in range(3)] == [True, True, False]  # per-topic bytes
    assert box.put("b", b"y" * 60) is True and box.put("c", b"z" * 60) is False  # total bytes
    assert box.get(0) == ("a", b"x" * 40) and box.get(0)[0] == "a" and box.get(0)[0] == "b"
    assert box.put("a", b"x" * 40) is False  # drained, but a's bucket is spent (rate)
    t[0] = 4.0
    assert box.put("a", b"x" * 40) is True  # 4 s x 10 B/s refilled
    assert dict(box.dropped) == {"a": 2, "c": 1} and box.pending_bytes() == 40
    box.get(0)
    assert box.put("a", b"x" * 40) is False  # spent again, no time has passed
    box.grant("a", 1000)  # a task sent to a: one reply's worth, capped at the burst
    assert box.put("a", b"x" * 40) is True and box.put("a", b"x" * 40) is True
    assert box.put("a", b"x" * 40) is False  # 100-byte burst: the grant did not lift the cap


@pytest.mark.parametrize("workers", [1, 2, 3, None])
def test_blocked_fedavg_equals_the_whole_tensor_sum_bit_for_bit(workers, monkeypatch):
    monkeypatch.setattr(agg, "WORK_PER_THREAD", 1)  # threads even for this small a sum
    g = torch.Generator().manual_seed(3)
    n = agg.BLOCK * 2 + 12345  # several blocks and a ragged end
    states = [{"big": torch.randn(n, generator=g) * 10 ** i, "small": torch.randn(7, 3, generator=g),
               "half": torch.randn(n, generator=g).half(), "big2": torch.randn(3, n // 3, generator=g),
               "small2": torch.randn(4, 5, generator=g).t(),  # not contiguous
               "small_half": torch.randn(9, generator=g).half(), "one": torch.randn((), generator=g),
               "count": torch.tensor(5 + i)} for i in range(5)]
    weights = [3, 1, 4, 1, 5]
    out = agg.fedavg(states, weights, workers=workers)  # threads sum blocks: the same bits
    if workers and workers > 1:  # the blocks were shared out to the aggregation's threads
        assert any(t.name.startswith("fedavg") for t in threading.enumerate())
    total = float(sum(weights))
    for k in ("big", "small", "half", "big2", "small2", "small_half", "one"):
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for s, w in zip(states, weights):
            acc.add_(s[k], alpha=w / total)
        ref = acc.to(states[0][k].dtype)
        assert out[k].dtype == ref.dtype and torch.equal(out[k], ref)
    assert out["count"].item() == 5  # integer buffers: the first state's
    # every result owns its storage (a checkpoint refuses tensors that share it)
    assert len({t.untyped_storage().data_ptr() for t in out.values()}) == len(out)
    assert agg.all_finite(out)
    out["small"][0, 0] = float("nan")
    assert not agg.all_finite(out)
    assert agg.all_finite({"x": torch.full((4,), 3e38)})  # the sum overflows, the values do not
