"""How often a client writes its trained global factors (``save_every``): every round for one
device by default, at the end of the run for the clients of a pool; pFedPara's local half is
written every round whatever the setting; nothing trained is lost when the client stops."""
import pytest
import torch

from edge_client.client import EdgeClient
from edge_client.runner import TaskItem
from edge_client.config import ClientConfig
from edge_client.pool import pool_configs
from fedpara import global_state
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import load_checkpoint
from fedpara.runtime.messages import Task, TrainParams
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.wire import Message, MessageKind

torch.set_num_threads(1)
DATA = "synthetic,n=64,shape=1x28x28,classes=10,clients=2"


class Session:  # what TaskRunner.run and stop need of an MQTT session: uploads that succeed
    connects = 1
    def publish_until_acked(self, topic, frames, timeout=0):
        return True

    def socket_bytes(self):
        return None

    def publish(self, topic, payload, qos=1, retain=False):  # the offline status when stopping
        return type("Info", (), {"wait_for_publish": lambda self, t=None: None})()

    def stop(self, graceful=True):
        pass


def client(tmp_path, scheme="fedpara", **kw):
    cfg = ClientConfig(client_id="c", run_id="r", data=f"{DATA},index=0", state_dir=str(tmp_path / "c"),
                       energy="off", insecure=True, eval_local=False, **kw)
    c = EdgeClient(cfg, parse_broker_url("mqtt://127.0.0.1:1"))
    c.session = Session()
    spec = ModelSpec(model="mlp", scheme=scheme, ratio=0.5)
    return c, spec


def run_round(c, spec, rnd):
    task = Task(f"t-{rnd}-1", ("c",), spec, TrainParams(batch_size=32, lr=0.01, seed=rnd))
    msg = Message(MessageKind.TASK, "r", rnd, "coordinator", global_state(spec.build(0)), task.to_meta())
    c.runner.run(TaskItem(rnd, task, msg, {"task_payload_bytes": 0, "task_mqtt_bytes": 0, "download_s": 0.0}))


def saved_round(path):
    return load_checkpoint(path)[2]["round"] if path.exists() else None


def test_every_round_by_default_for_one_device(tmp_path):
    c, spec = client(tmp_path)
    assert c.runner.save_every == 1
    for rnd in (1, 2):
        run_round(c, spec, rnd)
        assert saved_round(c.trainer.state.global_path) == rnd


@pytest.mark.parametrize("scheme", ["fedpara", "pfedpara"])
def test_every_n_rounds_and_the_rest_when_stopping(tmp_path, scheme):
    c, spec = client(tmp_path, scheme, save_every=2)
    local = c.trainer.state.local_path
    for rnd, written in ((1, None), (2, 2), (3, 2)):
        run_round(c, spec, rnd)
        assert saved_round(c.trainer.state.global_path) == written
        if scheme == "pfedpara":  # the local half never leaves the device: written every round
            assert saved_round(local) == rnd
    assert c.trainer.global_pending
    c.stop()  # round 3's factors are not lost
    assert saved_round(c.trainer.state.global_path) == 3 and not c.trainer.global_pending
    state, _, _ = load_checkpoint(c.trainer.state.global_path)
    assert all(torch.equal(state[k], v) for k, v in global_state(c.trainer.model).items())


def test_only_at_the_end_in_a_pool_unless_asked(tmp_path):
    base = ClientConfig(client_id="p", run_id="r", data=DATA, state_dir=str(tmp_path), energy="off", insecure=True)
    assert {c.save_every for c in pool_configs(base, 2)} == {0}
    assert {c.save_every for c in pool_configs(ClientConfig(**{**base.__dict__, "save_every": 3}), 2)} == {3}
    c, spec = client(tmp_path, save_every=0)
    run_round(c, spec, 1)
    assert saved_round(c.trainer.state.global_path) is None
    c._on_finish()  # the run ended: written before the process may exit
    assert saved_round(c.trainer.state.global_path) == 1
    with pytest.raises(ValueError, match="save_every"):
        ClientConfig(client_id="c", run_id="r", data=DATA, insecure=True, save_every=-2)


def test_a_newer_tasks_factors_are_never_written_as_the_clients_own(tmp_path):
    c, spec = client(tmp_path, save_every=2)
    for rnd in (1, 2, 3):
        run_round(c, spec, rnd)
    assert c.trainer.global_pending  # round 3 trained, not written (every 2)
    task = Task("t-4-1", ("c",), spec, TrainParams(batch_size=32, lr=0.01, seed=4))
    c.trainer.load(task, global_state(spec.build(0)))  # round 4's factors overwrite round 3's
    assert not c.trainer.global_pending
    c.stop()  # nothing to write: the file keeps round 2, the last one written
    assert saved_round(c.trainer.state.global_path) == 2
    with pytest.raises(ValueError, match="not loaded"):
        c.trainer.fit(Task("t-5-1", ("c",), spec, TrainParams(batch_size=32, lr=0.01)), 5)
