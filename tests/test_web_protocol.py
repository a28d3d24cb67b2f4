"""The browser client's protocol replies, against a scripted coordinator on the embedded amqtt
broker's websockets listener (headless chromium, signed): its status and heartbeats, a failure
reply for a task it cannot run, an update for one it can, no second reply to a replayed task, a
finish obeyed only from the current coordinator session."""
from __future__ import annotations

import json
import secrets

import pytest
from conftest import fashion_mnist_available
from support import Sniffer
from web_support import StaticServer, phone_browser, wait_for

import fedpara
from coordinator.broker import EmbeddedBroker
from edge_client.web.data import write_bundle
from edge_client.web.site import stage_client
from fedpara.runtime.webassets import WebAssetsMissing
from fedpara.models import ModelSpec
from fedpara.runtime.messages import Control, Status, Task, TrainParams
from fedpara.runtime.signing import Signer, Verifier, load_private_key, load_public_key, new_key
from fedpara.runtime.topics import Topics
from fedpara.wire import Message, Reassembler, parse_chunk

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not fashion_mnist_available(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


class ScriptedCoordinator:
    """Signs and publishes what a coordinator would; reads the phone's replies off the broker."""

    def __init__(self, url, run_id, keys):
        self.topics = Topics(run_id)
        self.run_id = run_id
        self.signer = Signer(load_private_key(keys / "coordinator.key"), "coordinator")
        self.verifier = Verifier({"phone-1": load_public_key(keys / "phone-1.pub")})
        self.sniffer = Sniffer(url, run_id)
        self.session = secrets.token_hex(8)

    def status(self):
        meta = Status("online", role="coordinator", coordinator_session=self.session).to_meta()
        data = self.signer.seal(Message("status", self.run_id, 0, "coordinator", meta=meta)).data
        self.sniffer.client.publish(self.topics.coordinator, bytes(data), qos=1, retain=True).wait_for_publish(10)

    def task(self, task: Task, tensors, rnd=1):
        enc = self.signer.seal(Message("task", self.run_id, rnd, "coordinator", tensors, task.to_meta()), "fp16+zstd:3")
        frames, _ = enc.split(task.max_packet, self.topics.task)
        for f in frames:
            self.sniffer.publish(self.topics.task, f)
        return frames

    def finish(self, session):
        meta = Control("finish", status="completed", round=1, session=session).to_meta()
        data = self.signer.seal(Message("control", self.run_id, 1, "coordinator", meta=meta)).data
        self.sniffer.publish(self.topics.control, bytes(data))

    def replies(self):
        """Decoded, verified messages from phone-1 on its update topic, in arrival order."""
        out, reasm = [], Reassembler(authenticate=self.verifier.chunk_authenticator("phone-1"))
        seen = set()
        for topic, payload in list(self.sniffer.messages):
            if topic == self.topics.update("phone-1"):
                data = reasm.add(payload)
                mid = parse_chunk(payload).message_id
                if data is not None and mid not in seen:
                    seen.add(mid)
                    out.append(self.verifier.open(data, sender="phone-1", ordered=False))
        return out

    def statuses(self):
        return [self.verifier.open(p, sender="phone-1", ordered=False).meta
                for t, p in list(self.sniffer.messages) if t == self.topics.status("phone-1") and p]


def test_status_failure_update_replay_and_finish(tmp_path):
    keys = tmp_path / "keys"
    new_key("coordinator", keys)
    new_key("phone-1", keys)
    run_id = f"w-{secrets.token_hex(3)}"
    try:
        site = stage_client(tmp_path / "site")
    except WebAssetsMissing as exc:
        pytest.skip(str(exc))
    write_bundle("fashion-mnist,partition=iid,clients=100,index=5,limit=64", site / "data" / "phone-1.bin")
    (site / "phone-1.json").write_text(json.dumps({
        "broker": "", "run": run_id, "client_id": "phone-1", "heartbeat_s": 1,
        "key_pem": (keys / "phone-1.key").read_text(), "coordinator_pub_pem": (keys / "coordinator.pub").read_text(),
        "data_url": "data/phone-1.bin"}))
    with EmbeddedBroker(ws_port=0) as broker:
        cfg = json.loads((site / "phone-1.json").read_text())
        (site / "phone-1.json").write_text(json.dumps({**cfg, "broker": broker.ws_url}))
        coord = ScriptedCoordinator(broker.url, run_id, keys)
        server, driver = StaticServer(site), None
        try:
            coord.status()
            driver = phone_browser(tmp_path)
            driver.get(server.url + "app.html?config=phone-1.json&autostart")
            # online, signed, retained, and repeated every heartbeat_s (a new seq each time)
            def online():
                found = [s for s in coord.statuses() if s["state"] == "online"]
                return found if len(found) >= 2 else None
            sts = wait_for(online, "two online statuses", driver=driver)
            assert sts[0]["num_examples"] == 64 and sts[0]["heartbeat_s"] == 1 and sts[0]["seq"] < sts[1]["seq"]
            assert sts[0]["session"] > 0 and "blake3" in sts[0]["digests"]
            # a task for a scheme the browser cannot train: a failure reply, at once
            bad = ModelSpec(model="mlp", scheme="pfedpara", ratio=0.1)
            t1 = Task("task-1", ("phone-1",), bad, TrainParams(epochs=1, batch_size=32, lr=0.05))
            frames = coord.task(t1, fedpara.global_state(bad.build()))
            fail = wait_for(lambda: coord.replies() or None, "the failure reply", driver=driver)[0]
            assert fail.meta["task_id"] == "task-1" and "pfedpara" in fail.meta["failure"]["reason"]
            assert not fail.tensors
            # a task it can run: the update (the global factors, fp16 as asked), then its report
            spec = ModelSpec(model="mlp", scheme="fedpara", ratio=0.1)
            t2 = Task("task-2", ("phone-1",), spec, TrainParams(epochs=1, batch_size=32, lr=0.05), uplink="fp16",
                      digest="blake3")
            start = fedpara.global_state(spec.build())
            coord.task(t2, start, rnd=2)
            got = wait_for(lambda: (lambda r: r if len(r) >= 3 else None)(coord.replies()), "the update and report",
                           driver=driver)
            update, report = got[1], got[2]
            assert update.meta["task_id"] == "task-2" and update.meta["num_examples"] == 64
            assert set(update.tensors) == set(start) and update.meta["metrics"]["steps"] == 2
            assert update.meta["metrics"]["report_follows"] is True
            assert 0.0 <= report.meta["report"]["local_accuracy"] <= 1.0
            # the first task again (a QoS 1 redelivery / a replay): no second failure reply
            for f in frames:
                coord.sniffer.publish(coord.topics.task, f)
            wait_for(lambda: driver.execute_script("return window.fedparaClient.counters.duplicate || "
                                                   "window.fedparaClient.counters.replayed || 0"),
                     "the replayed task to be refused", driver=driver)
            assert len(coord.replies()) == 3
            # a finish naming another coordinator session is refused; the current one's is obeyed
            coord.finish("0123456789abcdef")
            wait_for(lambda: driver.execute_script("return window.fedparaClient.counters.stale_control || 0"),
                     "the stale finish to be refused", driver=driver)
            assert driver.execute_script("return window.fedparaClient.state") != "finished"
            coord.finish(coord.session)
            wait_for(lambda: driver.execute_script("return window.fedparaClient.state") == "finished",
                     "the finish", driver=driver)
            wait_for(lambda: coord.statuses()[-1]["state"] == "offline", "the offline status", driver=driver)
        finally:
            if driver is not None:
                driver.quit()
            server.stop()
            coord.sniffer.stop()
