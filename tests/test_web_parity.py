"""Parity: for one task, the browser client's update (TensorFlow.js in headless chromium) equals the
Python client's (torch) within float32 tolerance: the same global factors in (a real task
envelope), the same data in the same order (the order torch's seeded DataLoader draws, handed to
the browser explicitly), the same SGD. mlp and cnn28, FedPara, low-rank and dense."""
from __future__ import annotations

import base64
import copy

import numpy as np
import pytest
import torch
from conftest import fashion_mnist_available
from torch.utils.data import DataLoader, TensorDataset
from web_support import harness_page

import fedpara
from fedpara.models import ModelSpec
from fedpara.training import train_epochs
from fedpara.wire import Message, decode, encode

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not fashion_mnist_available(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with harness_page(tmp_path_factory.mktemp("webparity")) as driver:
        yield driver


@pytest.fixture(scope="module")
def data():
    from fedpara.data import load_client_data, parse_data_spec
    train, _ = load_client_data(parse_data_spec("fashion-mnist,partition=iid,clients=100,index=3"))
    x, y = train.tensors if hasattr(train, "tensors") else (torch.stack([a for a, _ in train]),
                                                            torch.tensor([b for _, b in train]))
    return x[:96].contiguous(), y[:96].contiguous()


def torch_order(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """The example order fedpara.training.train_epochs visits: its DataLoader, replayed on indices."""
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return [torch.cat([b[0] for b in loader]).tolist() for _ in range(epochs)]


BROWSER_TRAIN = """
const done = arguments[arguments.length - 1];
const [task, xs, ys, order, backend] = arguments;
Promise.all(['wire', 'hash', 'model', 'train', 'backend'].map(n => import(`./client/${n}.js`))).then(async ([w, h, m, t, b]) => {
  if (await b.useBackend(backend) !== backend) throw new Error(`no ${backend} backend`);
  const msg = w.decode(h.b64decode(task));
  const model = new m.Model(msg.meta.spec, msg.tensors);
  const x = new Float32Array(h.b64decode(xs).buffer), y = Int32Array.from(ys);
  const res = await t.trainEpochs(model, {x, y}, msg.meta.train, {order});
  const enc = w.encode({kind: 'update', run: msg.run, round: msg.round, sender: 'phone-1',
                        meta: {task_id: msg.meta.task_id, num_examples: res.num_examples, metrics: {loss: res.loss, steps: res.steps}},
                        tensors: model.state()});
  model.dispose();
  return h.b64encode(enc.data);
}).then(r => done({ok: r}), e => done({error: String(e && e.stack || e)}));
"""


@pytest.mark.parametrize("model, scheme, train, backend", [
    ("mlp", "fedpara", {"epochs": 2, "batch_size": 16, "lr": 0.1, "seed": 5}, "wasm"),
    ("mlp", "fedpara", {"epochs": 2, "batch_size": 16, "lr": 0.1, "seed": 5}, "cpu"),
    ("mlp", "lowrank", {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "seed": 1}, "wasm"),
    ("mlp", "dense", {"epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 2}, "wasm"),
    ("cnn28", "fedpara", {"epochs": 1, "batch_size": 16, "lr": 0.3, "seed": 3}, "wasm"),
    ("cnn28", "fedpara", {"epochs": 1, "batch_size": 16, "lr": 0.3, "seed": 3}, "cpu"),
    ("cnn28", "lowrank", {"epochs": 1, "batch_size": 16, "lr": 0.1, "seed": 4}, "wasm"),
    ("cnn28", "lowrank", {"epochs": 1, "batch_size": 16, "lr": 0.1, "seed": 4}, "cpu"),
    ("cnn28", "dense", {"epochs": 1, "batch_size": 16, "lr": 0.05, "seed": 6}, "wasm"),
])
def test_browser_update_equals_python_update(page, data, model, scheme, train, backend):
    spec = ModelSpec(model=model, scheme=scheme, ratio=0.1)
    net = spec.build(seed=7)
    start = {k: v.detach().clone() for k, v in fedpara.global_state(net).items()}
    train = {"momentum": 0.0, "weight_decay": 0.0, **train}
    task = encode(Message("task", "run-1", 1, "coordinator", start,
                          {"task_id": "t-1", "spec": spec.to_dict(), "train": train}), "fp32").data
    x, y = data
    order = torch_order(len(y), train["batch_size"], train["epochs"], train["seed"])
    ref_net = copy.deepcopy(net)
    ref = train_epochs(ref_net, TensorDataset(x, y), epochs=train["epochs"], batch_size=train["batch_size"],
                       lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"], seed=train["seed"])
    expected = fedpara.global_state(ref_net)
    # the scale of float32 rounding here: the same training in float64 (torch), against float32's
    net64 = copy.deepcopy(net).double()
    train_epochs(net64, TensorDataset(x.double(), y), epochs=train["epochs"], batch_size=train["batch_size"],
                 lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"], seed=train["seed"])
    exact = fedpara.global_state(net64)
    out = page.execute_async_script(BROWSER_TRAIN, base64.b64encode(bytes(task)).decode(),
                                    base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(), y.tolist(), order, backend)
    assert "error" not in out, out.get("error")
    update = decode(base64.b64decode(out["ok"]))
    assert update.meta["num_examples"] == len(y) and update.meta["metrics"]["steps"] == ref["steps"]
    assert update.meta["metrics"]["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert set(update.tensors) == set(expected)
    bad = []
    for name, want in expected.items():
        got, delta = update.tensors[name], (want - start[name]).abs().max().item()
        assert delta > 0, name  # every tensor moved
        err = (got - want).abs().max().item()
        fp32 = (want.double() - exact[name]).abs().max().item()  # torch float32 vs float64
        print(f"parity {model} {scheme} {backend} {name}: |browser - torch| {err:.2e}, "  # docs/mobile.md (-s)
              f"|torch fp32 - fp64| {fp32:.2e}, change {delta:.2e}")
        # float32 tolerance: TensorFlow.js sums in another order than torch; its distance to torch's
        # float32 result stays within a few times torch's own float32 rounding error (against float64)
        bad.extend([(name, err, fp32, delta)] if err > 4 * fp32 + 1e-6 else [])
    assert not bad, bad


def test_normalisation_and_shapes_match_python(page):
    from fedpara.data.fashion_mnist import PIXEL_LUT
    out = page.execute_async_script("""const done = arguments[arguments.length - 1];
      Promise.all([import('./client/train.js'), import('./client/model.js')]).then(([t, m]) => {
        const specs = arguments[0];
        done({lut: Array.from(t.normalise(Uint8Array.from({length: 256}, (_, i) => i))),
              shapes: specs.map(s => Object.entries(m.stateShapes(s)))}); });""",
                                    [ModelSpec(model=mo, scheme=sc, ratio=r).to_dict()
                                     for mo in ("mlp", "cnn28") for sc in ("fedpara", "lowrank", "dense")
                                     for r in (0.0, 0.1, 0.5, 1.0)])
    assert np.array_equal(np.asarray(out["lut"], dtype=np.float32), PIXEL_LUT)  # bit for bit
    i = 0
    for mo in ("mlp", "cnn28"):
        for sc in ("fedpara", "lowrank", "dense"):
            for r in (0.0, 0.1, 0.5, 1.0):
                state = fedpara.global_state(ModelSpec(model=mo, scheme=sc, ratio=r).build())
                # the same names, shapes and order as fedpara.global_state
                assert [[k, list(v.shape)] for k, v in state.items()] == out["shapes"][i], (mo, sc, r)
                i += 1

