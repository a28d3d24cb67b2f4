"""wss:// and https://: the browser client's page served over HTTPS (fedpara web serve --cert)
reaches Mosquitto's TLS websockets listener with the password and ACL of `fedpara broker-acl`
(handed to it at enrolment), and its signed status arrives. The certificates are a
throw-away CA's; chromium is told to accept them (--ignore-certificate-errors), which is what a
phone does once the operator's CA is installed or the certificate is a public one."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import fashion_mnist_available
from support import MOSQUITTO, free_port, start_mosquitto
from test_tls import make_pki
from web_support import fleet_writer, phone_browser, wait_for

from edge_client.web.data import write_bundle
from edge_client.web.enrol import EnrolStore
from edge_client.web.serve import WebServer
from edge_client.web.site import stage_client
from fedpara.runtime.webassets import WebAssetsMissing
from fedpara.runtime.signing import Verifier, load_public_key, new_key

pytestmark = [pytest.mark.browser, pytest.mark.skipif(
    not (MOSQUITTO and shutil.which("openssl") and shutil.which("mosquitto_passwd") and fashion_mnist_available()),
    reason="needs mosquitto, mosquitto_passwd, openssl and Fashion-MNIST")]


class Observer:
    """The coordinator's MQTT login (the ACL lets it read every status of the run)."""

    def __init__(self, url, username, password):
        import threading

        import paho.mqtt.client as mqtt

        from fedpara.runtime.mqtt import parse_broker_url
        b = parse_broker_url(url)
        self.messages = []
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer")
        self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe("fedpara/v1/tls-run/status/+", 1), ready.set())
        self.client.connect(b.host, b.port)
        self.client.loop_start()
        assert ready.wait(10)

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()


def test_https_page_and_wss_broker(tmp_path):
    make_pki(tmp_path)
    try:
        site = stage_client(tmp_path / "site")
    except WebAssetsMissing as exc:
        pytest.skip(str(exc))
    keys = tmp_path / "keys"
    new_key("coordinator", keys)
    new_key("phone-1", keys)
    write_fleet = fleet_writer()
    passwords = write_fleet(tmp_path / "acl", ["phone-1"], run="tls-run")
    ws_port = free_port()
    proc, url = start_mosquitto(tmp_path, (tmp_path / "acl" / "mosquitto.conf").read_text()
                                + f"listener {ws_port} 127.0.0.1\nprotocol websockets\n"
                                f"certfile {tmp_path / 'server.crt'}\nkeyfile {tmp_path / 'server.key'}\n",
                                anonymous=False)
    write_bundle("fashion-mnist,partition=iid,clients=100,index=1,limit=32", site / "data" / "phone-1.bin")
    (site / "phone-1.json").write_text(json.dumps({
        "broker": f"wss://127.0.0.1:{ws_port}", "run": "tls-run", "client_id": "phone-1",
        "key_pem": (keys / "phone-1.key").read_text(), "coordinator_pub_pem": (keys / "coordinator.pub").read_text(),
        "data_url": "data/phone-1.bin", "username": "phone-1", "password": passwords["phone-1"]}))
    server = WebServer(site, EnrolStore(tmp_path / "enrol"), certfile=str(tmp_path / "server.crt"),
                       keyfile=str(tmp_path / "server.key")).start()
    sniffer, driver = Observer(url, "coordinator", passwords["coordinator"]), None
    try:
        assert server.url.startswith("https://")
        driver = phone_browser(tmp_path, args=("--ignore-certificate-errors",))
        driver.get(server.url + "app.html?config=phone-1.json&autostart")
        verifier = Verifier({"phone-1": load_public_key(keys / "phone-1.pub")})
        status = wait_for(lambda: next((verifier.open(p, sender="phone-1", ordered=False).meta
                                        for t, p in list(sniffer.messages) if t.endswith("/status/phone-1") and p), None),
                          "the phone's status over wss", driver=driver)
        assert status["state"] == "online" and status["num_examples"] == 32
        # a secure origin: the page signs with WebCrypto where chromium has Ed25519
        assert driver.execute_script("return window.isSecureContext") is True
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
        sniffer.stop()
        proc.terminate()
        proc.wait(5)
