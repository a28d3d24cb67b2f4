"""User-level DP-FedAvg (docs/privacy.md): clipping, noise, the accountant against dp-accounting's
own figures and a hand computation, adaptive clipping, and a run that stops at its budget."""
from __future__ import annotations

import math

import pytest
import torch

from coordinator.privacy import (
    ORDERS,
    Accountant,
    AdaptiveClip,
    DPFedAvg,
    RoundEvent,
    noise_for_epsilon,
)
from fedpara.dp import add_gaussian, clip_delta, delta_norm

dp_accounting = pytest.importorskip("dp_accounting")


def test_clip_delta_scales_the_whole_update_to_the_norm():
    ref = {"a": torch.zeros(3), "b": torch.zeros(4), "steps": torch.tensor(7)}
    new = {"a": torch.tensor([3.0, 0, 0]), "b": torch.tensor([0, 4.0, 0, 0]), "steps": torch.tensor(9)}
    delta, norm = clip_delta(new, ref, 1.0)
    assert norm == pytest.approx(5.0) and set(delta) == {"a", "b"}  # non-float tensors carry no delta
    assert delta_norm({k: ref[k] + delta[k] for k in delta} | {"steps": ref["steps"]}, ref) == pytest.approx(1.0)
    assert torch.allclose(delta["a"], torch.tensor([0.6, 0, 0], dtype=torch.float64))
    small, n = clip_delta(new, ref, 10.0)
    assert n == pytest.approx(5.0) and torch.equal(small["b"], torch.tensor([0, 4.0, 0, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not finite"):
        clip_delta({"a": torch.full((3,), float("inf")), "b": torch.zeros(4)}, ref, 1.0)


def test_noise_has_the_asked_std():
    g = torch.Generator().manual_seed(0)
    d = {"x": torch.zeros(200_000, dtype=torch.float64)}
    add_gaussian(d, 0.7, g)
    assert float(d["x"].std()) == pytest.approx(0.7, rel=0.01) and abs(float(d["x"].mean())) < 0.01


def test_dp_fedavg_clips_server_side_and_divides_by_the_fixed_denominator():
    ref = {"w": torch.zeros(2)}
    acc = DPFedAvg(ref, clip=1.0)
    assert acc.add({"w": torch.tensor([30.0, 40.0])}) == pytest.approx(50.0)  # a liar's huge update: clipped
    acc.add({"w": torch.tensor([0.5, 0.0])})
    out = acc.result(denominator=4, noise_std=0.0)
    assert torch.allclose(out["w"], torch.tensor([(0.6 + 0.5) / 4, 0.8 / 4]))
    assert acc.count == 2 and acc.unclipped == 1


def _hand_epsilon(rdp: list[float], delta: float) -> float:
    """Epsilon from RDP at each order (the conversion dp-accounting documents: Prop. 12 of
    Canonne, Kamath, Steinke 2020): min over a of rdp(a) + log((a-1)/a) - (log delta + log a)/(a-1)."""
    best = math.inf
    for a, r in zip(ORDERS, rdp):
        best = min(best, r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return max(best, 0.0)


def test_accountant_matches_a_hand_computation_and_the_library():
    # all clients every round, z = 2: each round is a Gaussian mechanism with noise multiplier
    # z/2 = 1 (replace-one doubles the sensitivity), RDP a / (2 (z/2)^2) at order a, composed 50x
    acc = Accountant(1e-5)
    for _ in range(50):
        acc.spend(RoundEvent("gaussian", 2.0, 10, 10))
    hand = _hand_epsilon([50 * a / 2.0 for a in ORDERS], 1e-5)
    assert acc.epsilon() == pytest.approx(hand, rel=1e-6)
    classic = min(50 * a / 2.0 + math.log(1e5) / (a - 1) for a in ORDERS)  # Mironov's conversion: looser
    assert acc.epsilon() <= classic
    # K of N without replacement and Poisson: the library's own figure for the same events
    dp, rdp = dp_accounting, dp_accounting.rdp
    lib = rdp.RdpAccountant(list(ORDERS), dp.NeighboringRelation.REPLACE_ONE)
    lib.compose(dp.SampledWithoutReplacementDpEvent(100, 10, dp.GaussianDpEvent(0.6)), 30)
    ours = Accountant(1e-5)
    for _ in range(30):
        ours.spend(RoundEvent("wor", 1.2, 100, 10))
    assert ours.epsilon() == pytest.approx(lib.get_epsilon(1e-5), rel=1e-9)
    lib = rdp.RdpAccountant(list(ORDERS))
    lib.compose(dp.PoissonSampledDpEvent(0.1, dp.GaussianDpEvent(1.1)), 30)
    ours = Accountant(1e-5, poisson=True)
    ours.events = [RoundEvent("poisson", 1.1, q=0.1)] * 30
    assert ours.epsilon() == pytest.approx(lib.get_epsilon(1e-5), rel=1e-9)
    # sampling amplifies: 10 of 100 costs far less than everyone
    assert Accountant(1e-5).epsilon_after(RoundEvent("wor", 1.2, 100, 10)) < \
        Accountant(1e-5).epsilon_after(RoundEvent("gaussian", 1.2, 100, 100))


def test_noise_for_epsilon_hits_the_target():
    z = noise_for_epsilon(3.0, 20, 1e-5, n=100, k=10)
    acc = Accountant(1e-5)
    acc.events = [RoundEvent("wor", z, 100, 10)] * 20
    assert 2.9 < acc.epsilon() <= 3.0
    acc.events = [RoundEvent("wor", z * 0.97, 100, 10)] * 20
    assert acc.epsilon() > 3.0


def test_adaptive_clip_moves_toward_the_quantile_and_pays_for_its_count():
    clip = AdaptiveClip(1.0, quantile=0.5, lr=0.2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        clip.update(unclipped=100, expected=100, generator=g)  # every update under the norm: it shrinks
    assert clip.clip < 0.95
    z = AdaptiveClip.delta_multiplier(1.0, AdaptiveClip.count_std(100))
    assert z == pytest.approx((1.0 - 1 / 100.0) ** -0.5)
    with pytest.raises(ValueError, match="too large for the count's noise"):
        AdaptiveClip.delta_multiplier(2.0, AdaptiveClip.count_std(10))


@pytest.mark.usefixtures("mosquitto_broker")
def test_a_dp_run_reports_epsilon_stops_at_its_budget_and_resume_keeps_what_was_spent(mosquitto_broker, tmp_path):
    from conftest import fashion_mnist_available
    if not fashion_mnist_available():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    import dataclasses

    from support import coord_cfg, start_clients

    from coordinator.server import Coordinator
    from fedpara.runtime.mqtt import parse_broker_url
    from fedpara.runtime.rundir import RunDir

    spent = Accountant(1e-5)
    eps = [spent.spend(RoundEvent("wor", 0.5, 6, 3)) for _ in range(6)]
    cfg = coord_cfg(tmp_path, min_clients=6, clients_per_round=3, rounds=10, dp_noise_multiplier=0.5,
                    dp_clip_norm=0.05, max_epsilon=(eps[2] + eps[3]) / 2, lr=0.1)
    # --stay: the clients serve the resumed run too (a budget stop tells them the run finished)
    clients = start_clients(mosquitto_broker, cfg, tmp_path, 6, energy="off", exit_on_finish=False)
    try:
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker)).run()
        rows = RunDir(cfg.out).read_metrics()
        assert summary["status"].startswith("stopped: privacy budget: round 4 would bring epsilon to"), summary
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert [r["epsilon"] for r in rows] == pytest.approx(eps[:3], rel=1e-9)
        assert all(r["delta"] == 1e-5 and r["dp"]["clients"] == r["replied"] == 3 for r in rows)
        assert rows[0]["dp"]["event"] == {"kind": "wor", "z": 0.5, "n": 6, "k": 3, "q": 0.0}
        assert summary["privacy"]["epsilon"] == pytest.approx(eps[2]) and summary["privacy"]["rounds_released"] == 3
        # the operator raises the budget and resumes: the spent epsilon carries over
        more = dataclasses.replace(cfg, max_epsilon=(eps[4] + eps[5]) / 2)
        resumed = Coordinator(more, parse_broker_url(mosquitto_broker), resume=True).run()
    finally:
        for c in clients:
            c.stop()
    rows = RunDir(cfg.out).read_metrics()
    assert resumed["status"].startswith("stopped: privacy budget: round 6"), resumed["status"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["epsilon"] for r in rows] == pytest.approx(eps[:5], rel=1e-9)


def test_dp_config_errors_name_the_field(tmp_path):
    from coordinator.config import CoordinatorConfig

    with pytest.raises(ValueError, match="aggregator: differential privacy runs DP-FedAvg"):
        CoordinatorConfig(insecure=True, dp_noise_multiplier=1.0, aggregator="median")
    with pytest.raises(ValueError, match="max_epsilon: a privacy budget needs dp_noise_multiplier"):
        CoordinatorConfig(insecure=True, max_epsilon=3.0)
    with pytest.raises(ValueError, match="dp_adaptive_clip: central mode only"):
        CoordinatorConfig(insecure=True, dp_noise_multiplier=1.0, dp_adaptive_clip=True, dp_mode="local")
    with pytest.raises(ValueError, match="dp_delta"):
        CoordinatorConfig(insecure=True, dp_noise_multiplier=1.0, dp_delta=1.5)
    with pytest.raises(ValueError, match="sampling"):
        CoordinatorConfig(insecure=True, sampling="random")


def test_the_client_clips_and_in_local_mode_noises_its_update():
    from fedpara.dp import delta_norm, privatize

    ref = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    new = {"w": torch.ones(1000), "b": torch.ones(10)}
    central = privatize(new, ref, clip=2.0)
    assert delta_norm(central, ref) == pytest.approx(2.0, rel=1e-6) and central["w"].dtype == torch.float32
    local = privatize(new, ref, clip=2.0, noise_multiplier=1.0)
    noise = {k: local[k] - central[k] for k in ref}
    assert float(torch.cat([v for v in noise.values()]).std()) == pytest.approx(2.0, rel=0.15)


def test_epsilon_reaches_prometheus_the_dashboard_and_the_report():
    from coordinator.observation.dashboard import DashboardState
    from coordinator.events import RoundCompleted
    from coordinator.observation.htmlreport import headline_items
    from coordinator.observation.prom import RunMetrics

    row = {"round": 1, "accuracy": 0.5, "loss": 1.0, "replied": 3, "sampled": 3, "epsilon": 2.5, "delta": 1e-5,
           "dp": {"mode": "central", "noise_multiplier": 1.1}}
    metrics, state = RunMetrics(), DashboardState(run_info={}, rounds_total=3)
    for listener in (metrics, state):
        listener(RoundCompleted(1, row))
    assert "fedpara_epsilon 2.5" in metrics.exposition().decode()
    snap = state.snapshot()
    assert snap["epsilon"] == 2.5 and snap["delta"] == 1e-5
    items = dict(headline_items([row], {}, {}))
    assert items["privacy spent (user-level DP)"].startswith("epsilon 2.500 at delta 1e-05 (central, noise multiplier 1.1")


@pytest.mark.parametrize("kw, kind", [
    ({"dp_mode": "local"}, "gaussian"),
    ({"sampling": "poisson", "sample_rate": 0.5}, "poisson"),
    ({"dp_adaptive_clip": True}, "gaussian"),
])
def test_local_poisson_and_adaptive_runs(mosquitto_broker, tmp_path, kw, kind):
    from conftest import fashion_mnist_available
    if not fashion_mnist_available():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    from support import coord_cfg, run_federated

    cfg = coord_cfg(tmp_path, min_clients=4, rounds=3, **{"dp_noise_multiplier": 0.3, "dp_clip_norm": 0.05, **kw})
    summary, rows, clients = run_federated(mosquitto_broker, cfg, tmp_path, 4, energy="off")
    assert summary["status"] == "completed" and len(rows) == 3
    assert all(r["dp"]["event"]["kind"] == kind for r in rows)
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"]
    if kind == "poisson":  # the expected count is the denominator, whoever was drawn
        assert all(r["dp"]["denominator"] == 2.0 for r in rows)
    if kw.get("dp_mode") == "local":
        assert all(r["dp"]["mode"] == "local" for r in rows) and summary["privacy"]["mode"] == "local"
    if kw.get("dp_adaptive_clip"):
        clips = [r["dp"]["clip"] for r in rows]
        assert clips[1] == rows[0]["dp"]["next_clip"] and len(set(clips)) == 3  # it moved every round


def test_adaptive_clipping_with_too_few_clients_fails_at_once(mosquitto_broker, tmp_path):
    from conftest import fashion_mnist_available
    if not fashion_mnist_available():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    from support import coord_cfg, start_clients

    from coordinator.server import Coordinator
    from fedpara.runtime.mqtt import parse_broker_url

    cfg = coord_cfg(tmp_path, min_clients=2, rounds=2, dp_noise_multiplier=1.0, dp_adaptive_clip=True)
    clients = start_clients(mosquitto_broker, cfg, tmp_path, 2, energy="off")
    try:
        summary = Coordinator(cfg, parse_broker_url(mosquitto_broker)).run()
    finally:
        for c in clients:
            c.stop()
    assert summary["status"].startswith("failed: round 1: dp_adaptive_clip: dp_noise_multiplier 1.0 is too large")
