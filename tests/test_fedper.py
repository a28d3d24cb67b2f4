"""FedPer (the paper's personalisation baseline): the classifier head stays on the device, the
rest is averaged; it goes through the real protocol like pFedPara."""
from __future__ import annotations

import pytest
import torch
from conftest import needs_fmnist
from support import Sniffer, coord_cfg, start_clients

import fedpara
from coordinator.server import Coordinator
from edge_client.client import EdgeClient
from edge_client.config import ClientConfig
from fedpara.models import SCHEMES, ModelSpec, head_name
from fedpara.runtime.checkpoint import load_checkpoint, save_checkpoint
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.wire import MessageKind

torch.set_num_threads(1)

HEADS = {"mlp": "fc2", "mlp2": "fc3", "cnn28": "classifier.2", "vgg16": "classifier.4", "char_lstm": "head"}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_fedper_keeps_exactly_the_head_local(name):
    spec = ModelSpec(model=name, scheme="fedper")
    model = spec.build(0)
    head = HEADS[name]
    assert head_name(model) == head
    local, shared = fedpara.local_state(model), fedpara.global_state(model)
    assert set(local) == {f"{head}.weight", f"{head}.bias"}
    assert not set(local) & set(shared)
    assert set(local) | set(shared) == set(model.state_dict())
    assert spec.personalised and ModelSpec(model=name, scheme="pfedpara").personalised
    assert not ModelSpec(model=name, scheme="fedpara").personalised
    # FedPer is the dense model: same architecture, same initial weights as the dense baseline
    dense = ModelSpec(model=name, scheme="dense").build(0).state_dict()
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    assert "fedper" in SCHEMES


def test_fedper_head_survives_a_client_restart(tmp_path):
    spec = ModelSpec(model="mlp", scheme="fedper")
    cfg = ClientConfig(client_id="pi", run_id="r", data="synthetic,n=64,classes=10,clients=2,index=0",
                       state_dir=str(tmp_path / "pi"), energy="off", insecure=True)
    saved = {k: torch.randn_like(v) for k, v in fedpara.local_state(spec.build()).items()}
    save_checkpoint(tmp_path / "pi" / "local.safetensors", saved, spec, round=3)
    client = EdgeClient(cfg, parse_broker_url("mqtt://127.0.0.1:1"))  # never connects
    client.trainer.ensure_model(spec, seed=0)
    got = fedpara.local_state(client.trainer.model)
    assert set(got) == {"fc2.weight", "fc2.bias"}
    assert all(torch.equal(v, saved[k]) for k, v in got.items())


@needs_fmnist
def test_fedper_never_publishes_the_head(amqtt_broker, tmp_path):
    cfg = coord_cfg(tmp_path, scheme="fedper", min_clients=2, rounds=2)
    sniffer = Sniffer(amqtt_broker, cfg.run_id)
    clients = start_clients(amqtt_broker, cfg, tmp_path, 2)
    try:
        summary = Coordinator(cfg, parse_broker_url(amqtt_broker)).run()
        assert all(c.wait(60) for c in clients)
    finally:
        for c in clients:
            c.stop()
        sniffer.stop()
    assert summary["status"] == "completed"
    model = cfg.spec.build()
    local, shared = set(fedpara.local_state(model)), set(fedpara.global_state(model))
    assert local == {"fc2.weight", "fc2.bias"}
    carried = [(t, m) for t, m in sniffer.decoded() if m.tensors]
    assert [m.kind for _, m in carried].count(MessageKind.UPDATE) == 4
    for topic, msg in carried:
        assert set(msg.tensors) == shared, topic  # the body travels, the head never does
    # every device keeps its own head, trained on its own data; the coordinator's checkpoints hold none
    heads = [load_checkpoint(tmp_path / f"state-c{i}" / "local.safetensors")[0] for i in range(2)]
    assert set(heads[0]) == local
    assert not torch.equal(heads[0]["fc2.weight"], heads[1]["fc2.weight"])
    ckpt, spec, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0002.safetensors")
    assert spec.scheme == "fedper" and set(ckpt) == shared
