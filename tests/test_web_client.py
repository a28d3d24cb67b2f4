"""The browser client in a federated run: a real Mosquitto with a websockets listener, a real
coordinator, two Python edge clients and one browser client in headless chromium (a phone's
viewport, a throttled CPU), all signed. The run completes with the browser's updates accepted
every round, its bytes accounted like the Python clients' (its own count of an update's MQTT bytes
equals the frames the broker carried), and an accuracy in the band of runs with three Python
clients."""
from __future__ import annotations

import dataclasses
import json
import threading

import pytest
from conftest import fashion_mnist_available
from support import MOSQUITTO, TRAIN, Sniffer, coord_cfg, free_port, run_federated, start_clients, start_mosquitto
from web_support import StaticServer, phone_browser, wait_for

from edge_client.web.data import write_bundle
from edge_client.web.site import stage_client
from fedpara.runtime.webassets import WebAssetsMissing
from fedpara.runtime.mqtt import parse_broker_url
from fedpara.runtime.rundir import RunDir
from fedpara.runtime.signing import new_key
from fedpara.wire import framed_bytes, parse_chunk

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (apt-get install mosquitto)"),
              pytest.mark.skipif(not fashion_mnist_available(),
                                 reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")]


def browser_site(tmp_path, *, run_id, client_id, ws_url, keys, data_spec):
    """The staged client page with this phone's config (what an enrolment hands it) and data."""
    try:
        site = stage_client(tmp_path / "site")
    except WebAssetsMissing as exc:
        pytest.skip(str(exc))
    write_bundle(data_spec, site / "data" / f"{client_id}.bin")
    cfg = {"broker": ws_url, "run": run_id, "client_id": client_id,
           "key_pem": (keys / "clients" / f"{client_id}.key").read_text(),
           "coordinator_pub_pem": (keys / "coordinator.pub").read_text(), "data_url": f"data/{client_id}.bin"}
    (site / f"{client_id}.json").write_text(json.dumps(cfg))
    return site


def signed_fleet(tmp_path, ids):
    keys = tmp_path / "keys"
    new_key("coordinator", keys)
    for cid in ids:
        new_key(cid, keys / "clients")
    return keys


@pytest.fixture
def mosquitto_ws(tmp_path):
    ws_port = free_port()
    proc, url = start_mosquitto(tmp_path, f"listener {ws_port} 127.0.0.1\nprotocol websockets\n")
    try:
        yield url, f"ws://127.0.0.1:{ws_port}"
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.slow
def test_two_python_clients_and_a_browser_client_on_mosquitto(tmp_path, mosquitto_ws):
    from coordinator.server import Coordinator

    url, ws_url = mosquitto_ws
    keys = signed_fleet(tmp_path, ["c0", "c1", "c2"])
    cfg = coord_cfg(tmp_path, rounds=2, min_clients=3, insecure=False, coordinator_key=str(keys / "coordinator.key"),
                    trusted_keys=str(keys / "clients"), round_deadline_s=60.0, wait_clients_s=60.0,
                    uplink="fp16+zstd:3", downlink="fp16+zstd:3")
    site = browser_site(tmp_path, run_id=cfg.run_id, client_id="c2", ws_url=ws_url, keys=keys,
                        data_spec=TRAIN.format(n=3, i=2))
    server, driver, clients = StaticServer(site), None, []
    sniffer = Sniffer(url, cfg.run_id)
    try:
        clients = start_clients(url, cfg, tmp_path, 2, total=3, insecure=False, key=str(keys / "clients"),
                                coordinator_pub=str(keys / "coordinator.pub"))
        driver = phone_browser(tmp_path)
        driver.get(server.url + "app.html?config=c2.json&autostart")
        summary: dict = {}
        runner = threading.Thread(target=lambda: summary.update(Coordinator(cfg, parse_broker_url(url)).run()), daemon=True)
        runner.start()
        runner.join(240)
        assert not runner.is_alive(), "the run did not finish"
        rows = RunDir(cfg.out).read_metrics()
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            assert sorted(r["clients"]) == ["c0", "c1", "c2"], r  # the browser's update was accepted every round
            assert r["client_metrics"]["c2"]["steps"] > 0 and r["client_metrics"]["c2"]["task_payload_bytes"] > 0
        assert rows[-1]["accuracy"] > 0.3
        state = wait_for(lambda: driver.execute_script(
            "const s = window.fedparaClient; return s.state === 'finished' ? s : null"), "the browser to see the finish",
            driver=driver)
        assert state["rounds"] == [1, 2] and state["lastAccuracy"] is not None
        # bytes: every update frame that reached the coordinator, the browser's included, is counted
        # like a Python client's; the browser reports its previous upload's MQTT bytes the same way
        m1 = rows[1]["client_metrics"]
        assert m1["c2"]["prev_upload"]["round"] == 1 and m1["c2"]["prev_upload"]["acked"] is True
        # the browser's own count of its round-1 update is what the broker carried, frame by frame
        # (the sniffer's copy of every frame on update/c2, grouped by message id)
        per_message: dict[tuple[str, bytes], int] = {}
        for topic, payload in sniffer.messages:
            if "/update/" in topic:
                key = (topic.rsplit("/", 1)[1], parse_chunk(payload).message_id)
                per_message[key] = per_message.get(key, 0) + framed_bytes([len(payload)], topic)
        assert m1["c2"]["prev_upload"]["mqtt_bytes"] in [v for (c, _), v in per_message.items() if c == "c2"]
        # the coordinator counts every update frame arriving in a round's window: the updates (what
        # the clients report as prev_upload) and the Python clients' reports (small messages) that
        # arrived before the slower browser's update closed the round
        ups = sum(m["prev_upload"]["mqtt_bytes"] for m in m1.values())
        report = max(v for v in per_message.values() if v < 4096)
        assert 0 <= rows[0]["mqtt_bytes_up"] - ups <= 2 * report
        assert sum(m["task_mqtt_bytes"] for m in rows[0]["client_metrics"].values()) == rows[0]["mqtt_bytes_down"]
        # the browser's uplink: fp16 as the run asks, without zstd (no zstd compressor in the browser):
        # about 10% more bytes than the Python clients' fp16+zstd:3
        assert m1["c2"]["prev_upload"]["payload_bytes"] > m1["c0"]["prev_upload"]["payload_bytes"]
        # accuracy: in the band of runs with three Python clients (same data, two seeds)
        for c in clients:
            c.stop()
        clients = []
        band = []
        for seed in (0, 1):
            base = dataclasses.replace(cfg, run_id=f"{cfg.run_id}-py{seed}", out=str(tmp_path / f"py{seed}"), seed=seed)
            s, py_rows, _ = run_federated(url, base, tmp_path / f"py{seed}", 3, insecure=False,
                                          key=str(keys / "clients"), coordinator_pub=str(keys / "coordinator.pub"))
            assert s["status"] == "completed"
            band.append(py_rows[-1]["accuracy"])
        print("accuracy: 2 Python + 1 browser", rows[-1]["accuracy"], "3 Python", band)  # docs/mobile.md (-s)
        assert min(band) - 0.05 <= rows[-1]["accuracy"] <= max(band) + 0.05, (rows[-1]["accuracy"], band)
    except AssertionError:
        if driver is not None:  # what the phone saw, for the failure report
            print("\n".join(driver.execute_script("return window.fedparaClient.log") or []))
            print("\n".join(e["message"] for e in driver.get_log("browser")))
        raise
    finally:
        if driver is not None:
            driver.quit()
        for c in clients:
            c.stop()
        server.stop()
        sniffer.stop()

