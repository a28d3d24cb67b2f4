"""The live dashboard, its Prometheus /metrics and the other observers of a run: fed with events,
over real HTTP, in a real headless browser (Debian's chromium through selenium) during a real run,
and through ``fedpara demo --dashboard``."""
from __future__ import annotations

import http.client
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import needs_fmnist
from prometheus_client.parser import text_string_to_metric_families
from support import coord_cfg, start_clients, start_mosquitto, wait_until

from coordinator.observation.dashboard import Dashboard, DashboardState
from coordinator.events import ClientStatusChanged, ReplyAccepted, RoundCompleted, TaskSent
from coordinator.observation.attach import observers
from coordinator.observation.listen import parse_listen
from coordinator.observation.timeline import ClientTimeline, Listeners
from coordinator.observation.prom import RunMetrics
from coordinator.registry import ClientRegistry
from coordinator.observation.tblog import TensorBoardLogger
from fedpara.runtime.messages import Status
from fedpara.runtime.rundir import RunDir
from test_report_html import make_row

SECRET = "/very/secret/keys/coordinator.key"


# --- helpers --------------------------------------------------------------------------------------
def fake_coordinator(tmp_path, **kw):
    """What Dashboard.for_coordinator reads from a Coordinator: cfg, registry, ignored, rows, run_dir."""
    cfg = coord_cfg(tmp_path, coordinator_key=SECRET, trusted_keys="/very/secret/keys", **kw)
    return SimpleNamespace(cfg=cfg, registry=ClientRegistry(), ignored=Counter(), rows=[], run_dir=RunDir(cfg.out))


def request(url: str, method: str = "GET", path: str = "/") -> tuple[int, dict, bytes]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def metric_values(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, from the Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def feed_round(listener, rnd, clients=("c0", "c1"), **row_kw):
    listener(TaskSent(rnd, 1, tuple(clients)))
    for i, c in enumerate(clients):
        listener(ReplyAccepted(rnd, c, i + 1, len(clients)))
    row = make_row(rnd, clients=clients, **row_kw)
    listener(RoundCompleted(rnd, row))
    return row


# --- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:8050", ("127.0.0.1", 8050)), (":8050", ("127.0.0.1", 8050)), ("8050", ("127.0.0.1", 8050)),
    ("0.0.0.0:9", ("0.0.0.0", 9)), ("[::1]:0", ("::1", 0)), ("localhost:80", ("localhost", 80)),
])
def test_parse_listen(value, expected):
    assert parse_listen("dashboard", value) == expected


@pytest.mark.parametrize("value", ["nope", "127.0.0.1:", "1.2.3.4:70000", "http://x:80", "a b:1"])
def test_a_bad_dashboard_value_names_the_field(tmp_path, value):
    with pytest.raises(ValueError, match="dashboard"):
        coord_cfg(tmp_path, dashboard=value)


# --- Prometheus ----------------------------------------------------------------------------------------
def test_metrics_after_events_parse_as_prometheus_text():
    ignored = Counter({"stale": 4})
    m = RunMetrics(run_info={"run_id": "r1", "model": "mlp"}, ignored=lambda: ignored)
    m(ClientStatusChanged("c0", True))
    m(ClientStatusChanged("c1", True))
    m(ClientStatusChanged("c2", False))
    feed_round(m, 1, ignored={"stale": 1})
    feed_round(m, 2, ignored={"stale": 3, "malformed": 2})
    m(TaskSent(3, 1, ("c0", "c1")))
    m(ReplyAccepted(3, "c0", 1, 2))
    v = metric_values(m.exposition().decode())
    assert v[("fedpara_round", ())] == 2 and v[("fedpara_round_started", ())] == 3
    assert v[("fedpara_round_replies", ())] == 1 and v[("fedpara_round_sampled_clients", ())] == 2
    assert v[("fedpara_accuracy", ())] == pytest.approx(0.7)
    assert v[("fedpara_clients_online", ())] == 2 and v[("fedpara_clients_known", ())] == 3
    assert v[("fedpara_bytes_total", (("direction", "down"), ("layer", "payload")))] == 2_000_000
    assert v[("fedpara_bytes_total", (("direction", "up"), ("layer", "mqtt")))] == 1_801_000
    assert v[("fedpara_bytes_total", (("direction", "down"), ("layer", "socket")))] == 0  # not in these rows
    assert v[("fedpara_dense_bytes_total", (("direction", "up"),))] == 20_000_000
    assert v[("fedpara_energy_joules_total", (("phase", "download"),))] == 4.0
    assert v[("fedpara_energy_joules_total", (("phase", "train"),))] == 40.0
    assert v[("fedpara_energy_joules_total", (("phase", "upload"),))] == 4.0  # round 2's prev_upload of round 1
    assert v[("fedpara_energy_measured", ())] == 0
    # live counts win when newer than the last row; a reason only the rows know stays
    assert v[("fedpara_ignored_messages_total", (("reason", "stale"),))] == 4
    assert v[("fedpara_ignored_messages_total", (("reason", "malformed"),))] == 2
    assert v[("fedpara_round_duration_seconds_count", ())] == 2
    assert v[("fedpara_round_duration_seconds_sum", ())] == 6.0
    assert v[("fedpara_round_duration_seconds_bucket", (("le", "5.0"),))] == 2
    assert v[("fedpara_round_phase_seconds_total", (("phase", "wait"),))] == 4.0
    assert v[("fedpara_round_phase_seconds_total", (("phase", "train"),))] == 3.0
    assert v[("fedpara_run_info", (("model", "mlp"), ("run_id", "r1")))] == 1


def test_grafana_panels_query_only_metrics_we_export():
    """docs/grafana-dashboard.json stays in step with /metrics."""
    import re

    doc = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(fedpara_[a-z_]+)", e)}
    m = RunMetrics(run_info={"run_id": "r"})
    feed_round(m, 1, ignored={"stale": 1})
    exported = {s.name for f in text_string_to_metric_families(m.exposition().decode()) for s in f.samples}
    assert used and used <= exported, used - exported
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


def test_two_coordinators_in_one_process_keep_their_own_metrics():
    a, b = RunMetrics(), RunMetrics()
    feed_round(a, 1)
    va, vb = metric_values(a.exposition().decode()), metric_values(b.exposition().decode())
    assert va[("fedpara_round", ())] == 1 and vb[("fedpara_round", ())] == 0


def test_listeners_never_raise_into_the_coordinator(caplog):
    m = RunMetrics()
    state = DashboardState(run_info={}, rounds_total=1)
    junk = [RoundCompleted(1, {"round": 1, "accuracy": "high", "mqtt_bytes_down": -5, "client_metrics": [1],
                               "timing": "x", "ignored": {"a": "b"}}),
            RoundCompleted(2, {}), object(), None]
    boom = Listeners(lambda e: 1 / 0, m, state)
    with caplog.at_level(logging.ERROR):
        for event in junk:
            boom(event)
    assert "ZeroDivisionError" in caplog.text
    assert metric_values(m.exposition().decode())[("fedpara_round", ())] == 1


# --- the HTTP endpoints ---------------------------------------------------------------------------------
def test_dashboard_endpoints_read_only_and_nothing_secret(tmp_path):
    coord = fake_coordinator(tmp_path)
    coord.registry.update("c0", Status("online", num_examples=150, device="cpu <b>x</b>", heartbeat_s=10))
    coord.registry.update("c1", Status("online", num_examples=150, device="x" * 500, heartbeat_s=10))
    coord.ignored["malformed"] += 2
    with Dashboard.for_coordinator(coord) as dash:
        assert dash.url.startswith("http://127.0.0.1:")
        for c in ("c0", "c1"):
            dash.listener(ClientStatusChanged(c, True))
        feed_round(dash.listener, 1)
        dash.listener(TaskSent(2, 1, ("c0", "c1")))
        dash.listener(ReplyAccepted(2, "c1", 1, 2))

        status, headers, body = request(dash.url, path="/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b'src="/static/plotly.min.js"' in body and b"http" not in body.split(b"<body")[0]
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        status, headers, js = request(dash.url, path="/static/plotly.min.js")
        assert status == 200 and len(js) > 1_000_000 and headers["Content-Type"].startswith("text/javascript")

        status, _, body = request(dash.url, path="/api/state")
        state = json.loads(body)
        assert status == 200 and state["run_id"] == coord.cfg.run_id and state["signed"] is False
        assert state["round"] == 1 and state["current_round"] == 2 and state["replies"] == 1
        assert {c["id"]: c["state"] for c in state["clients"]} == {"c0": "training", "c1": "replied"}
        assert state["clients_online"] == 2 and state["rounds_total"] == 2
        assert len(state["clients"][1]["device"]) <= 64  # client-supplied text is bounded
        text = body.decode()
        assert "secret" not in text and str(tmp_path) not in text and "password" not in text

        status, _, body = request(dash.url, path="/api/figures")
        figs = json.loads(body)
        assert status == 200 and set(figs["figures"]) == {"accuracy_round", "accuracy_mb", "bytes", "energy",
                                                            "round_time", "clients", "ignored"}
        assert figs["version"] == state["figures_version"]

        status, headers, body = request(dash.url, path="/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        v = metric_values(body.decode())
        assert v[("fedpara_round", ())] == 1 and v[("fedpara_clients_online", ())] == 2
        assert v[("fedpara_ignored_messages_total", (("reason", "malformed"),))] == 2
        assert "secret" not in body.decode()

        assert request(dash.url, path="/nope")[0] == 404
        for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "BREW"):
            status, headers, _ = request(dash.url, method, "/metrics")
            assert status == 405 and headers["Allow"] == "GET", method
        assert request(dash.url, path="/api/state")[0] == 200  # still serving


def test_a_taken_port_is_a_named_error():
    with Dashboard(DashboardState(run_info={}, rounds_total=1), RunMetrics()) as first:
        with pytest.raises(OSError, match="dashboard: cannot listen on 127.0.0.1"):
            Dashboard(DashboardState(run_info={}, rounds_total=1), RunMetrics(), port=first.port)


def test_the_page_works_without_a_registry():
    state = DashboardState(run_info={"run_id": "r"}, rounds_total=2)
    state(ClientStatusChanged("a", True))
    state(ClientStatusChanged("b", False))
    snap = state.snapshot()
    assert [(c["id"], c["state"]) for c in snap["clients"]] == [("a", "idle"), ("b", "offline")]
    assert snap["clients_online"] == 1 and snap["status"] == "waiting for clients"


def test_beyond_loopback_only_with_the_flag_and_a_token(caplog):
    import http.client

    from coordinator.config import CoordinatorConfig

    with pytest.raises(ValueError, match=r"dashboard: 0.0.0.0 is not a loopback address.*dashboard_public"):
        CoordinatorConfig(dashboard="0.0.0.0:8050", insecure=True)
    assert CoordinatorConfig(dashboard="0.0.0.0:8050", dashboard_public=True, insecure=True).dashboard_public
    with pytest.raises(ValueError, match="dashboard_token: must be at least 16"):
        CoordinatorConfig(dashboard="0.0.0.0:8050", dashboard_public=True, dashboard_token="short", insecure=True)
    with pytest.raises(ValueError, match="needs a token"):
        Dashboard(DashboardState(run_info={}, rounds_total=1), RunMetrics(), host="0.0.0.0", port=0)
    token = "t" * 24
    with caplog.at_level(logging.WARNING, logger="coordinator.observation.dashboard"):
        dash = Dashboard(DashboardState(run_info={}, rounds_total=1), RunMetrics(), host="0.0.0.0", port=0,
                         token=token).start()
    assert "every request needs the token" in caplog.text

    def get(path, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        body, hdrs = r.read(), dict(r.getheaders())
        conn.close()
        return r.status, hdrs, body

    try:
        for path in ("/", "/api/state", "/metrics", "/static/dashboard.js"):
            assert get(path)[0] == 401, path
        assert get("/metrics", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert get("/?token=nope")[0] == 401
        status, hdrs, _ = get(f"/?token={token}")
        assert status == 200 and "HttpOnly" in hdrs["Set-Cookie"] and "SameSite=Strict" in hdrs["Set-Cookie"]
        cookie = hdrs["Set-Cookie"].split(";")[0]
        assert get("/api/state", {"Cookie": cookie})[0] == 200  # the page's own requests
        status, _, body = get("/metrics", {"Authorization": f"Bearer {token}"})  # a Prometheus scraper
        assert status == 200 and b"fedpara_round" in body
    finally:
        dash.stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coordinator.observation.dashboard"):
        Dashboard(DashboardState(run_info={}, rounds_total=1), RunMetrics(), port=0).stop()
    assert caplog.text == ""


# --- the clients timeline and TensorBoard ---------------------------------------------------------------
def test_client_timeline_records_changes_not_heartbeats_and_is_bounded(tmp_path):
    rd = RunDir(tmp_path)
    clock = iter(range(100)).__next__
    tl = ClientTimeline(rd, clock=clock, max_records=5)
    for event in (ClientStatusChanged("a", True), ClientStatusChanged("a", True),  # a heartbeat
                  ClientStatusChanged("b", True), TaskSent(1, 1, ("a", "b")), RoundCompleted(1, {}),
                  ClientStatusChanged("b", False)):
        tl(event)
    recs = rd.read_client_timeline()
    assert [(r["round"], r["online"], r.get("completed", False)) for r in recs] == [
        (0, 1, False), (0, 2, False), (1, 2, True), (1, 1, False)]
    for i in range(10):
        tl(ClientStatusChanged("b", i % 2 == 0))
    assert len(rd.read_client_timeline()) == 5 and tl.written == 14
    # a resumed coordinator appends to what is there
    ClientTimeline(rd, fresh=False)(ClientStatusChanged("z", True))
    assert len(rd.read_client_timeline()) == 6


def test_tensorboard_logger_writes_round_scalars():
    logged = []

    class Writer:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            logged.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            logged.append("closed")

    tb = TensorBoardLogger("tb-dir", writer_factory=Writer)
    tb(TaskSent(1, 1, ("c0",)))
    tb(RoundCompleted(1, make_row(1)))
    tb(RoundCompleted(2, make_row(2)))
    tb.close()
    scalars = {(t, s): v for t, v, s in logged[:-1]}
    assert scalars[("accuracy", 2)] == pytest.approx(0.7) and scalars[("mb/cumulative", 2)] == pytest.approx(3.8016)
    assert scalars[("seconds/evaluation", 1)] == 0.3 and logged[-1] == "closed"


# --- end to end -------------------------------------------------------------------------------------------
def _browser(tmp_path):
    """Headless Debian chromium driven through its chromedriver (never a downloaded browser)."""
    from web_support import chromium

    return chromium(tmp_path, "--window-size=1300,1800")


@needs_fmnist
@pytest.mark.browser
def test_dashboard_in_a_real_browser_during_a_real_run(tmp_path):
    """The page loads before any client is online, shows the three clients once they are, and its
    round counter advances round by round while the run goes on."""
    from coordinator.server import Coordinator
    from fedpara.runtime.mqtt import parse_broker_url

    proc, url = start_mosquitto(tmp_path)
    clients, driver = [], None
    cfg = coord_cfg(tmp_path, rounds=3, dashboard="127.0.0.1:0", wait_clients_s=90.0)

    def slow_round(event):  # on the coordinator's thread: each round stays on screen for > 1 poll
        if isinstance(event, RoundCompleted) and event.round < cfg.rounds:
            time.sleep(2.0)

    try:
        listeners = Listeners()
        coord = Coordinator(cfg, parse_broker_url(url), on_event=listeners)
        with observers(cfg, coord, listeners) as obs:
            listeners.add(slow_round)
            summary: dict = {}
            runner = threading.Thread(target=lambda: summary.update(coord.run()), daemon=True)
            runner.start()
            driver = _browser(tmp_path)
            driver.get(obs.dashboard.url)

            def page(script):
                return driver.execute_script(script)

            wait_until(lambda: page("return document.getElementById('status').textContent") == "waiting for clients",
                       60.0, what="the page to load", interval=0.1)
            assert page("return document.getElementById('round').textContent") == "0"
            assert page("return document.getElementById('rounds-total').textContent") == "3"

            clients = start_clients(url, cfg, tmp_path, 3)
            rows_js = ("return [...document.querySelectorAll('#clients tbody tr')]"
                       ".map(r => r.dataset.client).join(',')")
            wait_until(lambda: page(rows_js) == "c0,c1,c2", 60.0, what="the three clients on the page", interval=0.1)

            seen = [0]
            def counter_done():
                value = int(page("return document.getElementById('round').textContent"))
                if value != seen[-1]:
                    seen.append(value)
                return value == cfg.rounds
            wait_until(counter_done, 60.0, what="the round counter to reach 3", interval=0.05)
            assert seen == sorted(seen) and len(seen) >= 3, seen  # 0, then at least one round before the last
            runner.join(60)
            assert summary["status"] == "completed"
            obs.finish(summary)
            wait_until(lambda: page("return document.getElementById('status').textContent") == "run completed",
                       10, interval=0.1, what="the page to say the run completed")
            plots = wait_until(lambda: page("return document.querySelectorAll('#plots .js-plotly-plot').length") == 7,
                               10, interval=0.1, what="the seven plots")
            assert plots
            assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        if driver is not None:
            driver.quit()
        for c in clients:
            c.stop()
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
@needs_fmnist
def test_demo_serves_the_dashboard_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fedpara.runtime.cli", "demo", "--model", "mlp", "--clients", "2", "--rounds", "2",
           "--limit", "300", "--insecure", "--dashboard", "127.0.0.1:0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line)
            if line.startswith("dashboard: "):
                dash = line.split()[1]
                state = json.loads(urllib.request.urlopen(dash + "api/state", timeout=10).read())
                assert state["rounds_total"] == 2
                metrics = urllib.request.urlopen(dash + "metrics", timeout=10).read().decode()
                assert "fedpara_round " in metrics
                break
        rest, _ = p.communicate(timeout=170)
    finally:
        if p.poll() is None:
            p.kill()
    text = "".join(lines) + rest
    assert p.returncode == 0, text[-3000:]
    report = [ln for ln in text.splitlines() if ln.startswith("report: ")]
    assert report and Path(report[0].split(" ", 1)[1]) == out / "report.html"
    assert (out / "report.html").stat().st_size > 1_000_000 and (out / "clients.jsonl").is_file()
