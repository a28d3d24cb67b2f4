"""FedProx's proximal term on the client (fedpara/training.py, edge_client/trainer.py): its
gradient, one SGD step by hand, prox_mu 0 bit-identical, the task field, and pFedPara's local
half left without an anchor."""
import pytest
import torch
from torch.utils.data import TensorDataset

from fedpara import global_state, local_state
from fedpara.models import ModelSpec
from fedpara.runtime.messages import ProtocolError, Task, TrainParams
from fedpara.training import add_prox_grad, train_epochs


def _data(n=32):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def _model():
    return ModelSpec(model="mlp", num_classes=10, scheme="fedpara", ratio=0.3).build(0)


def test_the_added_gradient_is_that_of_mu_half_the_squared_distance():
    w = torch.randn(5, 3, requires_grad=True)
    anchor = torch.randn(5, 3)
    mu = 0.37
    (mu / 2 * (w - anchor).pow(2).sum()).backward()
    expected = w.grad.clone()
    w.grad = torch.full_like(w, 0.5)  # on top of the loss's own gradient
    add_prox_grad([(w, anchor)], mu)
    assert torch.allclose(w.grad, expected + 0.5, atol=1e-7)
    w.grad = None
    add_prox_grad([(w, anchor)], mu)
    assert torch.allclose(w.grad, expected, atol=1e-7)


def test_one_step_moves_by_the_prox_term_beyond_plain_sgd():
    """One full-batch step from w0 with anchor a: w0 - lr (g + mu (w0 - a)) = plain step - lr mu (w0 - a)."""
    data, lr, mu = _data(), 0.05, 0.5
    plain, prox = _model(), _model()
    w0 = {k: v.clone() for k, v in global_state(plain).items()}
    anchor = {k: v + 0.1 * torch.randn_like(v) for k, v in w0.items()}
    train_epochs(plain, data, epochs=1, batch_size=len(data), lr=lr, seed=3)
    train_epochs(prox, data, epochs=1, batch_size=len(data), lr=lr, seed=3, prox_mu=mu, prox_anchor=anchor)
    after_plain, after_prox = global_state(plain), global_state(prox)
    for k in w0:
        expected = after_plain[k] - lr * mu * (w0[k] - anchor[k])
        assert torch.allclose(after_prox[k], expected, atol=1e-6), k


def test_prox_mu_zero_leaves_training_bit_identical():
    data = _data(64)
    a, b = _model(), _model()
    anchor = {k: v + 1.0 for k, v in global_state(b).items()}
    ra = train_epochs(a, data, epochs=2, batch_size=16, lr=0.1, momentum=0.5, seed=7)
    rb = train_epochs(b, data, epochs=2, batch_size=16, lr=0.1, momentum=0.5, seed=7, prox_mu=0.0, prox_anchor=anchor)
    assert ra["loss"] == rb["loss"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_prox_needs_an_anchor_of_model_parameters():
    with pytest.raises(ValueError, match="prox_anchor"):
        train_epochs(_model(), _data(), epochs=1, batch_size=8, lr=0.1, prox_mu=0.1)
    with pytest.raises(ValueError, match="not parameters"):
        train_epochs(_model(), _data(), epochs=1, batch_size=8, lr=0.1, prox_mu=0.1,
                     prox_anchor={"nope": torch.zeros(1)})


def test_prox_mu_travels_in_the_task_and_is_left_out_when_off():
    assert "prox_mu" not in TrainParams(lr=0.1).to_meta()  # the default task reads as before FedProx
    meta = TrainParams(lr=0.1, prox_mu=0.01).to_meta()
    assert TrainParams.from_meta(meta).prox_mu == 0.01
    assert TrainParams.from_meta({"epochs": 1, "batch_size": 8, "lr": 0.1}).prox_mu == 0.0
    with pytest.raises(ProtocolError, match="task.train.prox_mu"):
        TrainParams.from_meta({**meta, "prox_mu": -1})


def test_pfedpara_anchors_only_the_global_factors(tmp_path, monkeypatch):
    """The trainer anchors what the task brought (the global factors); the local half, which has
    no global value, trains on its own loss alone."""
    import edge_client.trainer as trainer_mod

    seen = {}
    real = trainer_mod.train_epochs

    def spy(model, data, **kw):
        seen.update(kw)
        return real(model, data, **kw)

    monkeypatch.setattr(trainer_mod, "train_epochs", spy)
    spec = ModelSpec(model="mlp", num_classes=10, scheme="pfedpara", ratio=0.5, input_shape=(1, 28, 28))
    tr = trainer_mod.Trainer("c0", "fashion-mnist,partition=iid,clients=4,index=0,limit=64", device="cpu",
                             state_dir=str(tmp_path / "state"), eval_local=False)
    model = spec.build(0)
    glob = {k: v + 0.01 for k, v in global_state(model).items()}
    task = Task("t-1-1", ("c0",), spec, TrainParams(batch_size=32, lr=0.05, prox_mu=0.1))
    tr.fit(task, 1, glob)
    assert seen["prox_mu"] == 0.1
    assert set(seen["prox_anchor"]) == set(glob) and not set(seen["prox_anchor"]) & set(local_state(model))
    assert all(torch.equal(seen["prox_anchor"][k], glob[k]) for k in glob)
