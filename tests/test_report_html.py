"""``fedpara report``: the series behind the plots, and the self-contained HTML file (finished runs,
runs in progress with a torn last line, older runs without timing or a clients timeline)."""
from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from coordinator.observation import plots
from coordinator.observation.htmlreport import write_report
from fedpara.runtime.rundir import RunDir

SECRET = "/very/secret/keys/coordinator.key"
ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def energy(download=1.0, train=10.0, prev_upload=None, measured=False):
    src = "rapl:package-0" if measured else "estimate"
    e = {"download": {"joules": download, "seconds": 0.1, "source": src, "measured": measured},
         "train": {"joules": train, "seconds": 1.0, "source": src, "measured": measured},
         "total_j": download + train, "source": src, "measured": measured}
    if prev_upload is not None:
        e["prev_upload"] = {"round": 0, "joules": prev_upload, "seconds": 0.1, "source": src, "measured": measured}
    return e


def make_row(rnd, *, timing=True, ignored=None, clients=("c0", "c1")):
    cm = {c: {"loss": 1.0, "train_s": 0.5 + i, "steps": 5, "local_accuracy": 0.5,
              "energy": energy(prev_upload=2.0 if rnd > 1 else None, measured=(c == "c0"))}
          for i, c in enumerate(clients)}
    row = {"round": rnd, "attempt": 1, "accuracy": 0.5 + 0.1 * rnd, "loss": 2.0 - 0.1 * rnd,
           "sampled": len(clients), "replied": len(clients), "clients": list(clients),
           "bytes_down": 1_000_000, "bytes_up": 900_000, "mqtt_bytes_down": 1_000_300, "mqtt_bytes_up": 900_500,
           "dense_bytes_down": 10_000_000, "dense_bytes_up": 10_000_000, "broadcast": True, "lr": 0.1,
           "train_loss": 1.0, "duration_s": 3.0, "ignored": dict(ignored or {}), "client_metrics": cm,
           "energy_j": 25.0, "energy_measured": False}
    if timing:
        row["timing"] = {"send_s": 0.2, "wait_s": 2.0, "aggregate_s": 0.1, "eval_s": 0.3, "save_s": 0.05}
    return row


def make_run(root, rows, *, torn=False, summary=None, timeline=True):
    rd = RunDir(root)
    rd.write_config({"run_id": "t-report", "model": "mlp", "scheme": "fedpara", "ratio": 0.3, "rounds": 5,
                     "insecure": False, "coordinator_key": SECRET, "trusted_keys": "/very/secret/keys",
                     "out": str(root)})
    rd.start_metrics()
    for r in rows:
        rd.append_metrics(r)
    if torn:
        with open(rd.metrics_path, "a") as f:
            f.write('{"round": 99, "accuracy": 0.9, "client_me')
    if timeline:
        rd.start_client_timeline()
        for i, n in enumerate((1, 2, 2)):
            rd.append_client_timeline({"round": 0, "t": 1000.0 + i, "online": n})
        for r in rows:
            rd.append_client_timeline({"round": r["round"], "t": 1003.0 + r["round"], "online": 2, "completed": True})
    if summary is not None:
        rd.write_summary(summary)
    return rd


class Page(HTMLParser):
    """Scripts (and their src), ids, and text of an HTML document."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.scripts: list[dict] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "script":
            self.scripts.append({"src": attrs.get("src"), "body": ""})
            self._in_script = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1]["body"] += data
        else:
            self.text.append(data)


# --- series ---------------------------------------------------------------------------------------
def test_bytes_split_payload_and_framing_and_dense_reference():
    b = plots.bytes_series([make_row(1), make_row(2)])
    assert b["down_payload"] == [1.0, 1.0] and b["down_framing"] == pytest.approx([0.0003, 0.0003])
    assert b["up_payload"] == [0.9, 0.9] and b["up_framing"] == pytest.approx([0.0005, 0.0005])
    acc = plots.accuracy_series([make_row(1), make_row(2)])
    assert acc["mb"] == pytest.approx([1.9008, 3.8016]) and acc["dense_mb"] == pytest.approx([20.0, 40.0])


def test_energy_by_client_counts_uploads_from_the_next_reply_and_labels_the_source():
    e = plots.energy_by_client([make_row(1), make_row(2), make_row(3)])
    assert set(e) == {"c0", "c1"}
    assert e["c0"]["download"] == 3.0 and e["c0"]["train"] == 30.0 and e["c0"]["upload"] == 4.0  # rounds 1, 2
    assert e["c0"]["measured"] is True and e["c1"]["measured"] is False
    assert e["c0"]["sources"] == ["rapl:package-0"]
    assert plots.energy_by_phase([make_row(1), make_row(2)]) == {"download": 4.0, "train": 40.0, "upload": 4.0}


def test_round_time_uses_timing_when_recorded_and_says_when_not():
    parts, recorded = plots.round_time_parts(make_row(1))
    assert recorded
    # training is the slowest client (c1: 1.5 s), inside the 2 s wait
    assert parts[plots.TRAINING] == 1.5 and parts["waiting"] == pytest.approx(0.5)
    assert parts["transfer (task out)"] == 0.2 and parts["aggregation"] == 0.1 and parts["evaluation"] == 0.3
    assert sum(parts.values()) == pytest.approx(3.0)  # the rest of duration_s is "other"
    parts, recorded = plots.round_time_parts(make_row(1, timing=False))
    assert not recorded and parts == {plots.TRAINING: 1.5, plots.UNRECORDED: 1.5}
    series = plots.round_time_series([make_row(1), make_row(2, timing=False)])
    assert series["recorded"] == 1 and list(series["parts"])[0] == "transfer (task out)"
    assert "not recorded" in plots.notes([make_row(1, timing=False)])["round_time"]


def test_ignored_counts_are_split_per_round_and_survive_a_restart():
    rows = [make_row(1, ignored={"stale": 2}), make_row(2, ignored={"stale": 5, "malformed": 1}),
            make_row(3, ignored={"stale": 1})]  # a resumed coordinator counts from 0 again
    s = plots.ignored_series(rows, final={"stale": 4, "duplicate": 2})
    assert s["reasons"] == ["duplicate", "malformed", "stale"]
    assert s["per_round"]["stale"] == [2, 3, 1] and s["per_round"]["malformed"] == [0, 1, 0]
    assert s["totals"] == {"duplicate": 2, "malformed": 1, "stale": 9}  # 6 + 1 in rows, 3 more at the end


def test_series_survive_missing_and_odd_fields():
    odd = {"round": 1, "accuracy": None, "client_metrics": {"x": "not a dict", "y": {"energy": {"train": {
        "joules": float("nan")}}}}, "ignored": "nope", "timing": {"wait_s": "soon"}}
    figs = plots.figures([odd])
    assert set(figs) == set(plots.FIGURES)
    assert plots.headline([odd])["accuracy"] is None


# --- the HTML file --------------------------------------------------------------------------------
def test_report_of_a_run_in_progress_with_a_torn_last_line(tmp_path):
    rd = make_run(tmp_path / "run", [make_row(1, ignored={"stale": 1}), make_row(2, ignored={"stale": 3})],
                  torn=True)
    path = write_report(rd.root)
    assert path == rd.report_path
    text = path.read_text()
    page = Page(text)
    assert not [s for s in page.scripts if s["src"]]  # everything inline: opens offline
    assert "http://" not in "".join(s["src"] or "" for s in page.scripts)
    assert "Plotly" in page.scripts[0]["body"] and len(page.scripts[0]["body"]) > 1_000_000  # plotly.js itself
    for name in plots.FIGURES:
        assert name in page.ids and f"plot-{name}" in page.ids, name
        assert any(f'"plot-{name}"' in s["body"] and "newPlot" in s["body"] for s in page.scripts), name
    words = " ".join(page.text)
    assert "in progress (no summary.json yet; 2 rounds recorded)" in words
    assert "2 of 5" in words and "signed (Ed25519)" in words
    assert SECRET not in text and "/very/secret" not in text  # no key paths, no directories
    # the torn round 99 is not in the report
    assert "0.9000" not in words and "99" not in [c.strip() for c in page.text]


def test_report_of_a_finished_older_run_without_timing_or_timeline(tmp_path):
    rows = [make_row(1, timing=False), make_row(2, timing=False)]
    summary = {"status": "completed", "run_id": "t-report", "wall_s": 12.5, "rounds": 2, "ignored": {}}
    rd = make_run(tmp_path / "run", rows, summary=summary, timeline=False)
    out = tmp_path / "elsewhere" / "r.html"
    assert write_report(rd.root, out) == out
    page = Page(out.read_text())
    words = " ".join(page.text)
    assert "completed" in words and "12.5 s" in words
    assert "no per-phase timing" in words and "no clients.jsonl" in words
    assert all(f"plot-{name}" in page.ids for name in plots.FIGURES)


def test_report_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        write_report(tmp_path)


def test_report_cli_prints_the_path(tmp_path):
    rd = make_run(tmp_path / "run", [make_row(1)])
    out = tmp_path / "x.html"
    r = subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "report", str(rd.root), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and out.stat().st_size > 1_000_000
    r = subprocess.run([sys.executable, "-m", "fedpara.runtime.cli", "report", str(tmp_path / "nothing")],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "not a run directory" in r.stderr and "Traceback" not in r.stderr


def test_client_timeline_lines_are_read_back_and_a_torn_one_dropped(tmp_path):
    rd = RunDir(tmp_path)
    rd.start_client_timeline()
    rd.append_client_timeline({"round": 0, "t": 1.0, "online": 1})
    with open(rd.client_timeline_path, "a") as f:
        f.write('{"round": 0, "t": 2.0, "onl')
    assert rd.read_client_timeline() == [{"round": 0, "t": 1.0, "online": 1}]
    assert json.loads(rd.client_timeline_path.read_text().splitlines()[0])["online"] == 1
