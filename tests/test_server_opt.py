"""Server optimisers over the factor delta (coordinator/server_opt.py) against hand computations,
their proposal/commit contract, their state round trip, config errors, and exact --resume."""
import math

import pytest
import torch

from coordinator.server_opt import OPTIMISERS, ServerOptimizer, load_state, save_state, state_path
from coordinator.strategy import Strategy

X0 = {"w": torch.tensor([1.0, -2.0, 0.5]), "n": torch.tensor(3)}
A1 = {"w": torch.tensor([1.5, -2.5, 0.5]), "n": torch.tensor(7)}  # delta (0.5, -0.5, 0)


def hand(name, lr, deltas, *, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. Alg. 2 (FedAvgM: Hsu et al.) written out per coordinate, in Python floats."""
    x = [1.0, -2.0, 0.5]
    m, v = [0.0] * 3, [tau * tau] * 3
    for d in deltas:
        for i in range(3):
            if name == "fedavg":
                x[i] += lr * d[i]
                continue
            if name == "fedavgm":
                m[i] = momentum * m[i] + d[i]
                x[i] += lr * m[i]
                continue
            m[i] = b1 * m[i] + (1 - b1) * d[i]
            sq = d[i] * d[i]
            if name == "fedadagrad":
                v[i] = v[i] + sq
            elif name == "fedadam":
                v[i] = b2 * v[i] + (1 - b2) * sq
            else:
                s = (v[i] > sq) - (v[i] < sq)
                v[i] = v[i] - (1 - b2) * sq * s
            x[i] += lr * m[i] / (math.sqrt(v[i]) + tau)
    return x


@pytest.mark.parametrize("name", OPTIMISERS)
def test_one_and_two_steps_match_the_hand_computation(name):
    lr = 0.1 if name not in ("fedavg", "fedavgm") else 0.5
    opt = ServerOptimizer(name, lr)
    x1, moments = opt.propose(X0, A1)
    assert x1["w"].tolist() == pytest.approx(hand(name, lr, [[0.5, -0.5, 0.0]]), rel=1e-6, abs=1e-7)
    assert x1["n"].item() == 7  # a counter takes the aggregate's value
    opt.commit(moments)
    a2 = {"w": x1["w"] + torch.tensor([0.25, 0.1, -0.2]), "n": torch.tensor(9)}
    x2, _ = opt.propose(x1, a2)
    # the hand computation sees the delta the optimiser saw: float32 a2 - float32 x1
    d2 = (a2["w"].double() - x1["w"].double()).tolist()
    assert x2["w"].tolist() == pytest.approx(hand(name, lr, [[0.5, -0.5, 0.0], d2]), rel=1e-5, abs=1e-6)
    assert x2["w"].dtype == torch.float32


def test_plain_fedavg_is_the_aggregate_itself():
    opt = ServerOptimizer()
    new, _ = opt.propose(X0, A1)
    assert new["w"] is A1["w"] and new["n"] is A1["n"]
    assert not opt.stateful


def test_yogi_differs_from_adam_where_v_is_below_the_squared_delta():
    """tau 0.1: v starts at 0.01 < 0.25 = delta^2: Yogi adds (1-b2) delta^2 (sign -1); Adam decays v."""
    adam, yogi = ServerOptimizer("fedadam", 0.1, tau=0.1), ServerOptimizer("fedyogi", 0.1, tau=0.1)
    va = adam.propose(X0, A1)[1].v["w"][0].item()
    vy = yogi.propose(X0, A1)[1].v["w"][0].item()
    assert va == pytest.approx(0.99 * 0.01 + 0.01 * 0.25)
    assert vy == pytest.approx(0.01 + 0.01 * 0.25)


def test_a_refused_step_leaves_the_moments_where_they_were():
    strategy = Strategy(server_opt=ServerOptimizer("fedadam", 0.1))
    first = strategy.step(X0, A1)  # proposed, not committed (the step guard refused it)
    again = strategy.step(X0, A1)  # the same round again: the same proposal
    assert torch.equal(first["w"], again["w"])
    assert strategy.server_opt.moments.steps == 0
    strategy.commit()
    assert strategy.server_opt.moments.steps == 1
    with pytest.raises(RuntimeError):
        strategy.commit()  # nothing proposed since


def test_state_round_trips_exactly_through_the_side_file(tmp_path):
    opt = ServerOptimizer("fedyogi", 0.03)
    x = X0
    for k in range(3):
        a = {"w": x["w"] + torch.tensor([0.1, -0.2, 0.3]) * (k + 1), "n": torch.tensor(k)}
        x, mo = opt.propose(x, a)
        opt.commit(mo)
    path = state_path(tmp_path / "checkpoints", 3)
    save_state(path, *opt.state_dict(), round=3)
    back = ServerOptimizer("fedyogi", 0.03)
    back.load_state_dict(*load_state(path))
    assert back.moments.steps == 3
    for part in ("m", "v"):
        a, b = getattr(opt.moments, part), getattr(back.moments, part)
        assert a.keys() == b.keys() == {"w"} and torch.equal(a["w"], b["w"])
    a = {"w": x["w"] + 1, "n": torch.tensor(0)}
    assert torch.equal(opt.propose(x, a)[0]["w"], back.propose(x, a)[0]["w"])
    other = ServerOptimizer("fedyogi", 0.1)  # a resume with another server lr is refused, naming it
    with pytest.raises(ValueError, match="server_lr"):
        other.load_state_dict(*load_state(path))
    with pytest.raises(ValueError, match="missing"):
        load_state(state_path(tmp_path / "checkpoints", 4))


@pytest.mark.parametrize("field, value", [("server_opt", "adam"), ("server_lr", 0.0), ("server_momentum", 1.0),
                                          ("server_beta1", -0.1), ("server_beta2", 1.5), ("server_tau", 0.0),
                                          ("prox_mu", -1.0)])
def test_config_errors_name_the_field(tmp_path, field, value):
    from support import coord_cfg
    with pytest.raises(ValueError, match=field):
        coord_cfg(tmp_path, **{field: value})


def test_resume_gives_the_uninterrupted_runs_final_factors_bit_for_bit(amqtt_broker, tmp_path):
    """fedadam + FedProx for 3 rounds straight, against 2 rounds then --resume to 3: the moments of
    round 2 come back from their side file, so round 3 steps exactly as it did without the stop."""
    import dataclasses

    from coordinator.server import Coordinator
    from fedpara.runtime.checkpoint import load_checkpoint
    from support import coord_cfg, run_federated, start_clients

    kw = dict(server_opt="fedadam", server_lr=0.01, prox_mu=0.01, min_clients=2, rounds=3)
    full = coord_cfg(tmp_path / "a", **kw)
    summary_full, rows_full, _ = run_federated(amqtt_broker, full, tmp_path / "a", 2)
    assert summary_full["status"] == "completed" and len(rows_full) == 3
    part = coord_cfg(tmp_path / "b", **{**kw, "rounds": 2})
    assert run_federated(amqtt_broker, part, tmp_path / "b", 2)[0]["status"] == "completed"
    resumed = dataclasses.replace(part, rounds=3)
    clients = start_clients(amqtt_broker, resumed, tmp_path / "b2", 2)
    try:
        summary = Coordinator(resumed, _url(amqtt_broker), resume=True).run()
    finally:
        for c in clients:
            c.stop()
    assert summary["status"] == "completed" and summary["rounds"] == 3
    assert summary["digest"] == summary_full["digest"]
    ckpt = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "round-0003.safetensors")[0]
    assert all(torch.equal(ckpt[k], v) for k, v in load_checkpoint(
        tmp_path / "a" / "run" / "checkpoints" / "round-0003.safetensors")[0].items())
    # what came back from the side file: two steps' moments, both halves of the factors
    tensors, meta = load_state(state_path(tmp_path / "b" / "run" / "checkpoints", 2))
    assert meta["steps"] == "2" and {k.split("/")[0] for k in tensors} == {"m", "v"}
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if k.startswith("m/"))
    # a run whose side file is gone cannot resume exactly: said, naming the file
    state_path(tmp_path / "b" / "run" / "checkpoints", 3).unlink()
    with pytest.raises(ValueError, match="round-0003"):
        Coordinator(dataclasses.replace(resumed, rounds=4), _url(amqtt_broker), resume=True)


def _url(url):
    from fedpara.runtime.mqtt import parse_broker_url
    return parse_broker_url(url)


def test_the_coordinator_commits_a_step_only_when_the_guard_takes_it(tmp_path):
    """Coordinator._release: an accepted step moves the moments; a refused one (a non-finite
    aggregate) keeps model and moments; both rounds' optimiser state is kept for its checkpoint."""
    from coordinator.server import Coordinator
    from coordinator.strategy import Aggregate
    from support import coord_cfg

    c = Coordinator(coord_cfg(tmp_path, server_opt="fedadam", server_lr=0.01), _url("mqtt://127.0.0.1:1"))
    x0 = dict(c.state)
    assert c._release(1, Aggregate({k: v + 0.01 for k, v in x0.items()})) is None
    assert c.strategy.server_opt.moments.steps == 1 and not torch.equal(c.state["fc1.x1"], x0["fc1.x1"])
    x1, m1 = dict(c.state), c.strategy.server_opt.moments
    refused = c._release(2, Aggregate({k: torch.full_like(v, float("nan")) for k, v in x1.items()}))
    assert refused == "the aggregate is not finite"
    assert c.strategy.server_opt.moments is m1 and all(torch.equal(c.state[k], x1[k]) for k in x1)
    assert [c.ledger._server_opt[r][1]["steps"] for r in (1, 2)] == ["1", "1"]


def test_dp_composes_with_a_server_optimiser(tmp_path):
    """The optimiser steps along the noised aggregate: post-processing, accepted as configured."""
    pytest.importorskip("dp_accounting")
    from support import coord_cfg
    cfg = coord_cfg(tmp_path, server_opt="fedyogi", server_lr=0.01, dp_noise_multiplier=1.0, prox_mu=0.1)
    assert cfg.server_opt == "fedyogi" and cfg.dp_noise_multiplier == 1.0
