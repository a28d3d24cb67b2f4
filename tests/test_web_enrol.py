"""Enrolling phones: one-time links (used once, expiring, revocable), the server's /enrol, the
page enrolling itself in headless chromium, and revocation taking the phone's key out of the
coordinator's trust."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from web_support import fleet_writer, phone_browser, wait_for

from edge_client.web.cli import main as web_main
from edge_client.web.enrol import EnrolError, EnrolStore
from edge_client.web.serve import WebServer
from edge_client.web.site import stage_client
from fedpara.runtime.webassets import WebAssetsMissing
from fedpara.runtime.signing import AuthError, Verifier, load_trust_dir, new_key


@pytest.fixture
def fleet(tmp_path):
    keys = tmp_path / "keys"
    for name in ("coordinator", "phone-1", "phone-2"):
        new_key(name, keys)
    return keys


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(store, keys, cid="phone-1", **kw):
    return store.create(cid, run="run-1", broker="wss://fl.example:8081", key=keys / f"{cid}.key",
                        coordinator_pub=keys / "coordinator.pub", **kw)


def test_a_link_works_once_expires_and_can_be_revoked(tmp_path, fleet):
    clock = Clock()
    store = EnrolStore(tmp_path / "enrol", clock=clock)
    code = make(store, fleet)
    assert code not in (tmp_path / "enrol" / "phone-1.json").read_text()  # only its hash is stored
    assert (tmp_path / "enrol" / "phone-1.json").stat().st_mode & 0o077 == 0
    cfg = store.redeem(code)
    assert cfg["client_id"] == "phone-1" and cfg["run"] == "run-1" and cfg["broker"] == "wss://fl.example:8081"
    assert cfg["key_pem"] == (fleet / "phone-1.key").read_text()
    assert cfg["coordinator_pub_pem"] == (fleet / "coordinator.pub").read_text()
    with pytest.raises(EnrolError, match="used already"):
        store.redeem(code)
    late = make(store, fleet, "phone-2", ttl_s=60)
    clock.t += 61
    with pytest.raises(EnrolError, match="expired"):
        store.redeem(late)
    pending = make(store, fleet, "phone-2")
    assert store.revoke("phone-2")
    with pytest.raises(EnrolError, match="revoked"):
        store.redeem(pending)
    with pytest.raises(EnrolError, match="unknown"):
        store.redeem("x" * 22)


def test_enrolment_refuses_wrong_keys_and_brokers(tmp_path, fleet):
    store = EnrolStore(tmp_path / "enrol")
    with pytest.raises(ValueError, match="identity of 'phone-2'"):
        store.create("phone-1", run="run-1", broker="wss://h:1", key=fleet / "phone-2.key",
                     coordinator_pub=fleet / "coordinator.pub")
    with pytest.raises(ValueError, match="WebSockets"):
        store.create("phone-1", run="run-1", broker="mqtt://h:1883", key=fleet / "phone-1.key",
                     coordinator_pub=fleet / "coordinator.pub")
    assert not (tmp_path / "enrol" / "phone-1.json").exists()


def test_revoking_takes_the_key_out_of_the_coordinators_trust(tmp_path, fleet, capsys):
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    for n in ("phone-1", "phone-2"):
        (trusted / f"{n}.pub").write_bytes((fleet / f"{n}.pub").read_bytes())
    store = EnrolStore(tmp_path / "enrol")
    make(store, fleet)
    assert web_main(["revoke", "phone-1", "--store", str(tmp_path / "enrol"), "--trusted-keys", str(trusted)]) == 0
    assert "refuse phone-1" in capsys.readouterr().out
    keys = load_trust_dir(trusted)  # what a coordinator started now trusts
    assert set(keys) == {"phone-2"} and (trusted / "revoked" / "phone-1.pub").is_file()
    with pytest.raises(AuthError, match="unknown_sender"):
        Verifier(keys).open(b"\0" * 200 + b"FPSG" + b"\0" * 64, sender="phone-1")


@pytest.mark.browser
def test_the_page_enrols_once_over_http(tmp_path, fleet, capsys):
    try:
        site = stage_client(tmp_path / "site")
    except WebAssetsMissing as exc:
        pytest.skip(str(exc))
    store_dir = tmp_path / "enrol"
    server = WebServer(site, EnrolStore(store_dir)).start()
    driver = other = None
    try:
        assert web_main(["enrol", "phone-1", "--store", str(store_dir), "--run", "run-1", "--broker",
                         "ws://127.0.0.1:9", "--url", server.url, "--key", str(fleet / "phone-1.key")]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        link = printed[-1]
        assert link.startswith(server.url + "app.html#enrol=")
        # the operator's QR code page draws the link (from its fragment) and forgets it
        qr_url = printed[0].split("as a QR code on your screen: ")[1]
        assert qr_url == f"{server.url}qr.html#{link}"
        driver = phone_browser(tmp_path / "a")
        driver.get(qr_url)
        modules = wait_for(lambda: driver.execute_script(
            "const e = document.getElementById('qr'); return e && e.querySelector('svg') && Number(e.dataset.modules)"),
            "the QR code", driver=driver)
        assert modules >= 33 and "#" not in driver.current_url  # version 4+ for a ~80-character link
        driver.get(link)
        state = wait_for(lambda: driver.execute_script(
            "return ['ready', 'no data', 'not enrolled'].includes(window.fedparaClient.state) && window.fedparaClient.state"),
            "the page to enrol", driver=driver)
        assert state == "no data"  # enrolled; this phone has no pictures yet and no bundle was given
        saved = json.loads(driver.execute_script("return localStorage.getItem('fedpara-enrolment')"))
        assert saved["client_id"] == "phone-1" and saved["key_pem"].startswith("-----BEGIN PRIVATE KEY-----")
        assert "#enrol" not in driver.current_url  # the used code left the address bar
        assert web_main(["list", "--store", str(store_dir)]) == 0
        assert "phone-1" in capsys.readouterr().out
        # the same link on another phone: refused, with the reason on the page
        other = phone_browser(tmp_path / "b")
        other.get(link)
        text = wait_for(lambda: other.execute_script(
            "return window.fedparaClient.state === 'not enrolled' && document.getElementById('state').textContent"),
            "the refusal", driver=other)
        assert "used already" in text
        # the endpoint itself: bad requests are refused without a traceback
        req = urllib.request.Request(server.url + "enrol", data=b"not json", method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400
    finally:
        for d in (driver, other):
            if d is not None:
                d.quit()
        server.stop()


def test_enrolling_several_phones_with_broker_credentials(tmp_path, fleet, capsys):
    write_fleet = fleet_writer()
    passwords = write_fleet(tmp_path / "acl", ["phone-1", "phone-2"], run="run-1")
    store_dir = tmp_path / "enrol"
    assert web_main(["enrol", "phone-1", "phone-2", "--store", str(store_dir), "--run", "run-1", "--broker",
                     "wss://fl.example:8081", "--url", "https://fl.example:8443", "--keys", str(fleet),
                     "--credentials", str(tmp_path / "acl" / "credentials")]) == 0
    links = [line for line in capsys.readouterr().out.splitlines() if line.startswith("https://fl.example:8443/app")]
    assert len(links) == 2
    store = EnrolStore(store_dir)
    for cid, link in zip(("phone-1", "phone-2"), links):
        cfg = store.redeem(link.split("#enrol=")[1])
        assert cfg["client_id"] == cid and cfg["username"] == cid and cfg["password"] == passwords[cid]
        assert cfg["key_pem"] == (fleet / f"{cid}.key").read_text()
    # one --key for several phones, and a data spec without {index}, are refused before anything is written
    assert web_main(["enrol", "phone-1", "phone-2", "--store", str(store_dir), "--run", "r", "--broker", "wss://h:1",
                     "--url", "https://h", "--key", str(fleet / "phone-1.key")]) == 2
    assert "--keys DIR" in capsys.readouterr().err
