"""Signed runs: Ed25519 identities, sealing and opening, replay and forgery refused; a stranger on a
real Mosquitto (no ACL) who publishes empty, forged and replayed messages on every topic of a
signed run changes nothing: every honest client replies in every round and the final factors
equal a clean run's."""
from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from conftest import needs_fmnist

from coordinator.config import CoordinatorConfig
from coordinator.server import Coordinator
from edge_client.client import EdgeClient
from edge_client.config import ClientConfig
from fedpara.models import ModelSpec
from fedpara.runtime.messages import Control, Status, Task, TrainParams
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import RunDir
from fedpara.runtime.signing import (
    AuthError,
    Signer,
    Verifier,
    load_private_key,
    load_public_key,
    load_trust_dir,
    new_key,
)
from fedpara.runtime.topics import Topics
from fedpara.wire import Message, MessageKind, encode


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("coordinator", "c0", "c1", "c2"):
        new_key(name, d / ("clients" if name != "coordinator" else ""))
    new_key("c0", d / "other")  # a second identity claiming to be c0
    return d


def _status(sender="c0", state="online"):
    return Message(MessageKind.STATUS, "r", 0, sender, meta=Status(state).to_meta())


# --- keys ---------------------------------------------------------------------------------------
def test_key_files_modes_and_errors(keys, tmp_path):
    key = keys / "clients" / "c0.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and (keys / "clients" / "c0.pub").is_file()
    with pytest.raises(FileExistsError):
        new_key("c0", keys / "clients")
    loose = tmp_path / "loose.key"
    loose.write_bytes(key.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others.*chmod 600"):
        load_private_key(loose)
    with pytest.raises(FileNotFoundError, match="fedpara keys new"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(ValueError, match="not an Ed25519|not a PEM"):
        load_public_key(key)  # a private key where a public one belongs
    assert set(load_trust_dir(keys / "clients")) == {"c0", "c1", "c2"}


# --- sealing and opening ----------------------------------------------------------------------
def test_seal_open_and_every_refusal(keys):
    signer = Signer(load_private_key(keys / "clients" / "c0.key"), "c0")
    verifier = Verifier(load_trust_dir(keys / "clients"))
    data = signer.seal(_status()).data
    assert verifier.open(data, sender="c0").meta["state"] == "online"

    def refused(data, sender="c0", v=verifier):
        with pytest.raises(AuthError) as exc:
            v.open(data, sender=sender)
        return exc.value.reason

    assert refused(data) == "replayed"  # the same message again
    assert refused(encode(_status()).data) == "unsigned"
    impostor = Signer(load_private_key(keys / "other" / "c0.key"), "c0")
    assert refused(impostor.seal(_status()).data) == "bad_signature"
    assert refused(signer.seal(_status()).data, sender="c1") == "bad_signature"  # c0's signature on c1's topic
    ghost = Signer(load_private_key(keys / "other" / "c0.key"), "ghost")
    assert refused(ghost.seal(_status("ghost")).data, sender="ghost") == "unknown_sender"
    tampered = bytearray(signer.seal(_status()).data)
    tampered[25] ^= 1  # inside the signed digest
    assert refused(bytes(tampered)) == "bad_signature"
    old = Verifier(load_trust_dir(keys / "clients"), clock=lambda: time.time_ns() + int(3600e9))
    assert refused(signer.seal(_status()).data, v=old) == "stale"
    # kinds are ordered separately: a status sealed after an update may arrive first
    upd = signer.seal(Message(MessageKind.UPDATE, "r", 1, "c0", meta={"task_id": "t", "num_examples": 1})).data
    assert verifier.open(signer.seal(_status()).data, sender="c0") and verifier.open(upd, sender="c0")


# --- a stranger on the broker -----------------------------------------------------------------
TRAIN = "fashion-mnist,partition=iid,clients=3,index={i},limit=150"


def _signed_run(url, keys, out, run_id, attack=None, poison=None, **kw):
    base = dict(run_id=run_id, model="mlp", scheme="fedpara", ratio=0.3, rounds=3, min_clients=3,
                test_data="fashion-mnist,limit=300", out=str(out / "run"), round_deadline_s=30.0,
                wait_clients_s=60.0, lr=0.05, batch_size=32, coordinator_key=str(keys / "coordinator.key"),
                trusted_keys=str(keys / "clients"))
    cfg = CoordinatorConfig(**{**base, **kw})
    clients = [EdgeClient(ClientConfig(client_id=f"c{i}", run_id=run_id, data=TRAIN.format(i=i), energy="off",
                                       state_dir=str(out / f"s{i}"), key=str(keys / "clients"),
                                       coordinator_pub=str(keys / "coordinator.pub")), parse_broker_url(url))
               for i in range(3)]
    if poison is not None:
        honest = clients[2].trainer.fit
        clients[2].trainer.fit = lambda *a, **k: poison(honest(*a, **k))
    for c in clients:
        c.start()
    try:
        summary = Coordinator(cfg, parse_broker_url(url)).run()
    finally:
        if attack:
            attack.stop()
        for c in clients:
            c.stop()
    return summary, RunDir(cfg.out).read_metrics(), clients


class Stranger(threading.Thread):
    """Publishes, all run long, on every topic of the run: cleared and forged statuses, ghosts,
    forged tasks (epochs 1e6), impostor updates, retained forged finishes, and a replay of every
    genuine message it has seen; it also connects with the coordinator's old predictable id."""

    def __init__(self, url: str, run_id: str) -> None:
        super().__init__(daemon=True)
        b, self.t = parse_broker_url(url), Topics(run_id)
        self.run_id, self.seen, self.halt, self.sent = run_id, [], threading.Event(), 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"stranger-{secrets.token_hex(3)}")
        self.c.on_message = lambda cl, u, m: self.seen.append((m.topic, bytes(m.payload)))
        self.c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{self.t.base}/#", 1)
        self.c.connect(b.host, b.port)
        self.c.loop_start()
        self.squatter = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"coordinator-{run_id}")
        self.squatter.connect(b.host, b.port)
        self.squatter.loop_start()

    def pub(self, topic, payload, retain=False):
        self.c.publish(topic, payload, qos=1, retain=retain)
        self.sent += 1

    def run(self) -> None:
        spec = ModelSpec(model="mlp", ratio=0.3)
        forged_task = Task("evil-1-1", ("c0", "c1", "c2"), spec, TrainParams(epochs=10**6, batch_size=1, lr=1e3))
        while not self.halt.wait(0.3):
            for c in ("c0", "c1", "c2"):
                self.pub(self.t.status(c), b"", retain=True)
                self.pub(self.t.status(c), encode(Message(MessageKind.STATUS, self.run_id, 0, c,
                                                          meta=Status("offline").to_meta())).data, retain=True)
                self.pub(self.t.update(c), encode(Message(MessageKind.UPDATE, self.run_id, 1, c,
                                                          meta={"task_id": "x", "num_examples": 10**6})).data)
            for i in range(5):
                self.pub(self.t.status(f"ghost{i}"), encode(Message(MessageKind.STATUS, self.run_id, 0, f"ghost{i}",
                                                                    meta=Status("online", 10**6).to_meta())).data, True)
            for rnd in (1, 2, 3):
                self.pub(self.t.task, encode(Message(MessageKind.TASK, self.run_id, rnd, "coordinator",
                                                     meta=forged_task.to_meta())).data)
            self.pub(self.t.control, encode(Message(MessageKind.CONTROL, self.run_id, 9, "coordinator",
                                                    meta=Control("finish", "completed", 9).to_meta())).data, True)
            self.pub(self.t.coordinator, b"", retain=True)
            for topic, payload in list(self.seen)[:400]:  # replays of genuine messages
                if payload and not topic.endswith(("/ghost0", "/ghost1", "/ghost2", "/ghost3", "/ghost4")):
                    self.pub(topic, payload)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        for c in (self.c, self.squatter):
            c.loop_stop()
            c.disconnect()


@needs_fmnist
def test_a_stranger_changes_nothing_in_a_signed_run(mosquitto_broker, keys, tmp_path):
    clean, clean_rows, _ = _signed_run(mosquitto_broker, keys, tmp_path / "clean", f"clean-{secrets.token_hex(2)}")
    run_id = f"attacked-{secrets.token_hex(2)}"
    stranger = Stranger(mosquitto_broker, run_id)
    stranger.start()
    summary, rows, clients = _signed_run(mosquitto_broker, keys, tmp_path / "attacked", run_id, stranger)
    assert clean["status"] == summary["status"] == "completed"
    assert [r["replied"] for r in rows] == [3, 3, 3] and [r["replied"] for r in clean_rows] == [3, 3, 3]
    assert summary["digest"] == clean["digest"]  # the same factors as without the stranger
    assert stranger.sent > 100
    refused = summary["ignored"]
    assert refused.get("unsigned", 0) > 20 and refused.get("replayed", 0) > 0, refused
    for c in clients:
        assert c.rounds_done == [1, 2, 3] and c.counters["unsigned"] > 5, c.counters
        assert c.counters["status_reasserted"] > 0  # the stranger cleared its retained status


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_key_mistakes_are_one_line(keys, tmp_path):
    base = ["client", "--data", "synthetic,n=8", "--state-dir", str(tmp_path / "s"), "--energy", "off",
            "--broker", "mqtt://127.0.0.1:1"]
    r = _cli(*base)
    assert r.returncode == 2 and "key: a signed run needs" in r.stderr and "Traceback" not in r.stderr
    r = _cli(*base, "--key", str(tmp_path / "nope.key"), "--coordinator-pub", str(keys / "coordinator.pub"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    loose = tmp_path / "c0.key"
    loose.write_bytes((keys / "clients" / "c0.key").read_bytes())
    os.chmod(loose, 0o640)
    r = _cli(*base, "--client-id", "c0", "--key", str(loose), "--coordinator-pub", str(keys / "coordinator.pub"))
    assert r.returncode == 2 and "chmod 600" in r.stderr and "Traceback" not in r.stderr
    r = _cli("keys", "new", "c0", "--dir", str(keys / "clients"))
    assert r.returncode == 2 and "exists" in r.stderr


@needs_fmnist
def test_a_client_with_an_untrusted_key_never_takes_part(amqtt_broker, keys, tmp_path):
    run_id = f"k-{secrets.token_hex(2)}"
    cfg = CoordinatorConfig(run_id=run_id, model="mlp", ratio=0.3, rounds=1, min_clients=1, wait_clients_s=4.0,
                            test_data="fashion-mnist,limit=100", out=str(tmp_path / "run"),
                            coordinator_key=str(keys / "coordinator.key"), trusted_keys=str(keys / "clients"))
    impostor = EdgeClient(ClientConfig(client_id="c0", run_id=run_id, data=TRAIN.format(i=0), energy="off",
                                       state_dir=str(tmp_path / "s"), key=str(keys / "other" / "c0.key"),
                                       coordinator_pub=str(keys / "coordinator.pub")), parse_broker_url(amqtt_broker))
    impostor.start()
    try:
        summary = Coordinator(cfg, parse_broker_url(amqtt_broker)).run()
    finally:
        impostor.stop()
    assert summary["status"].startswith("failed: only 0 live clients")
    assert "did not verify against trusted_keys" in summary["status"]
    assert summary["ignored"].get("bad_signature", 0) >= 1


@needs_fmnist
def test_a_signed_broken_update_is_that_clients_failure(amqtt_broker, keys, tmp_path):
    """c2 signs NaN factors: the signature holds, so the coordinator knows the broken update is
    c2's and ends the attempt without waiting for the 30 s deadline."""
    import torch

    from edge_client.trainer import FitOutput

    def nan(out):
        return FitOutput({k: torch.full_like(v, float("nan")) for k, v in out.tensors.items()}, 150, out.metrics)

    summary, rows, _ = _signed_run(amqtt_broker, keys, tmp_path, f"nan-{secrets.token_hex(2)}", poison=nan,
                                   rounds=1, min_reply_fraction=0.5)
    assert summary["status"] == "completed" and rows[0]["clients"] == ["c0", "c1"]
    assert rows[0]["failures"]["c2"].startswith("malformed update") and rows[0]["duration_s"] < 20
