"""What a run looks like: the series and the plotly figures that ``fedpara report`` and the live
dashboard share, computed from metrics.jsonl rows (:func:`coordinator.observation.records.round_row`) and the
clients timeline (``clients.jsonl``, :class:`coordinator.observation.timeline.ClientTimeline`).

The series functions are plain Python (tested without plotly); :func:`figures` turns them into
``plotly.graph_objects.Figure`` objects. Missing fields (older runs, runs still in progress) give
empty series and a note, never an exception.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .records import finite_or_none

MB = 1e6
PHASES = ("download", "train", "upload")
# metrics row ``timing`` keys -> the round-time breakdown's labels, in drawing order
TIMING = (("send_s", "transfer (task out)"), ("wait_s", "waiting"), ("aggregate_s", "aggregation"),
          ("eval_s", "evaluation"), ("save_s", "saving"))
TRAINING = "training (slowest client)"
UNRECORDED = "not recorded"
FIGURES = ("accuracy_round", "accuracy_mb", "bytes", "energy", "round_time", "clients", "ignored")
TITLES = {
    "accuracy_round": "Test accuracy by round",
    "accuracy_mb": "Test accuracy vs cumulative MB moved (MQTT, down + up)",
    "bytes": "Bytes per round: down / up, payload and MQTT framing",
    "energy": "Energy per client by phase (all rounds)",
    "round_time": "Where each round's time went",
    "clients": "Clients online over time",
    "ignored": "Ignored and rejected messages by reason",
}


def _num(row: Mapping, key: str) -> float | None:
    return finite_or_none(row.get(key))


def _int(row: Mapping, key: str) -> int:
    v = finite_or_none(row.get(key))
    return int(v) if v is not None else 0


# --- series --------------------------------------------------------------------------------------
def accuracy_series(rows: Sequence[Mapping]) -> dict:
    """Per round: accuracy (and pFedPara's global accuracy), cumulative measured and dense MB."""
    out: dict[str, list] = {"round": [], "accuracy": [], "global_accuracy": [], "mb": [], "dense_mb": []}
    moved = dense = 0.0
    for r in rows:
        moved += _int(r, "mqtt_bytes_down") + _int(r, "mqtt_bytes_up")
        dense += _int(r, "dense_bytes_down") + _int(r, "dense_bytes_up")
        out["round"].append(r["round"])
        out["accuracy"].append(_num(r, "accuracy"))
        out["global_accuracy"].append(_num(r, "global_accuracy"))
        out["mb"].append(moved / MB)
        out["dense_mb"].append(dense / MB)
    if all(v is None for v in out["global_accuracy"]):
        out["global_accuracy"] = []
    return out


def bytes_series(rows: Sequence[Mapping]) -> dict:
    """Per round, MB: payload and MQTT framing (framed - payload), each way; dense fp32 each way."""
    out: dict[str, list] = {k: [] for k in ("round", "down_payload", "down_framing", "up_payload", "up_framing",
                                             "dense_down", "dense_up")}
    for r in rows:
        out["round"].append(r["round"])
        for way in ("down", "up"):
            payload, framed = _int(r, f"bytes_{way}"), _int(r, f"mqtt_bytes_{way}")
            out[f"{way}_payload"].append(payload / MB)
            out[f"{way}_framing"].append(max(0, framed - payload) / MB)
            out[f"dense_{way}"].append(_int(r, f"dense_bytes_{way}") / MB)
    return out


def energy_by_client(rows: Sequence[Mapping]) -> dict[str, dict]:
    """Client -> joules per phase over the run, ``measured`` (every phase from a sensor) and the
    sources. A round's upload is reported with the client's next reply (``prev_upload``), so the
    last round's upload is not in any row."""
    out: dict[str, dict] = {}
    for r in rows:
        metrics = r.get("client_metrics")
        if not isinstance(metrics, Mapping):
            continue
        for cid, m in metrics.items():
            energy = m.get("energy") if isinstance(m, Mapping) else None
            if not isinstance(energy, Mapping):
                continue
            entry = out.setdefault(str(cid), {**{p: 0.0 for p in PHASES}, "measured": True, "sources": set()})
            for phase, rec in (("download", energy.get("download")), ("train", energy.get("train")),
                               ("upload", energy.get("upload")), ("upload", energy.get("prev_upload"))):
                if not isinstance(rec, Mapping):
                    continue
                joules = finite_or_none(rec.get("joules"))
                if joules is None:
                    continue
                entry[phase] += joules
                entry["measured"] = entry["measured"] and rec.get("measured") is True
                if isinstance(rec.get("source"), str):
                    entry["sources"].add(rec["source"])
    for entry in out.values():
        entry["sources"] = sorted(entry["sources"])
    return dict(sorted(out.items()))


def energy_by_phase(rows: Sequence[Mapping]) -> dict[str, float]:
    """Joules per phase, all clients and rounds (the Prometheus counters' totals)."""
    per = energy_by_client(rows)
    return {p: sum(e[p] for e in per.values()) for p in PHASES}


def slowest_training(row: Mapping) -> float | None:
    """The longest ``train_s`` a replying client reported this round (the round waits for it)."""
    metrics = row.get("client_metrics")
    if not isinstance(metrics, Mapping):
        return None
    times = [finite_or_none(m.get("train_s")) for m in metrics.values() if isinstance(m, Mapping)]
    times = [t for t in times if t is not None]
    return max(times) if times else None


def round_time_parts(row: Mapping) -> tuple[dict[str, float], bool]:
    """One round's seconds by part, and whether the coordinator recorded its ``timing``.

    With ``timing``: transfer, training (slowest client, inside the wait), waiting (the rest of
    the wait: uploads, stragglers), aggregation, evaluation, saving, and whatever is left of
    ``duration_s``. Without it (older runs): training and the rest as "not recorded"."""
    duration = _num(row, "duration_s") or 0.0
    train = slowest_training(row)
    timing = row.get("timing")
    parts: dict[str, float] = {}
    if isinstance(timing, Mapping) and timing:
        wait = finite_or_none(timing.get("wait_s"))
        for key, label in TIMING:
            v = finite_or_none(timing.get(key))
            if v is None:
                continue
            if key == "wait_s" and train is not None:
                parts[TRAINING] = min(train, v)
                v = max(0.0, v - train)
            parts[label] = max(0.0, v)
        if wait is None and train is not None:
            parts[TRAINING] = train
        for key, v in timing.items():  # fields this module does not know yet
            if key not in dict(TIMING) and (v := finite_or_none(v)) is not None:
                parts[key.removesuffix("_s")] = max(0.0, v)
        rest = duration - sum(parts.values())
        if rest > 1e-3:
            parts["other"] = rest
        return parts, True
    if train is not None and train <= duration:
        parts[TRAINING] = train
        duration -= train
    parts[UNRECORDED] = max(0.0, duration)
    return parts, False


def round_time_series(rows: Sequence[Mapping]) -> dict:
    """{"round": [...], "parts": {label: [seconds per round]}, "recorded": rounds with timing}."""
    per = [round_time_parts(r) for r in rows]
    labels: list[str] = []
    for parts, _ in per:
        labels += [k for k in parts if k not in labels]
    order = [TIMING[0][1], TRAINING] + [label for _, label in TIMING[1:]]
    labels.sort(key=lambda k: (order.index(k) if k in order else len(order), k == UNRECORDED))
    return {"round": [r["round"] for r in rows],
            "parts": {k: [parts.get(k, 0.0) for parts, _ in per] for k in labels},
            "recorded": sum(1 for _, ok in per if ok)}


def ignored_series(rows: Sequence[Mapping], final: Mapping | None = None) -> dict:
    """Per round increments of the cumulative ``ignored`` counts, by reason, and the totals
    (``final``, e.g. summary.json's ``ignored``, when it is newer than the last row)."""
    reasons: list[str] = []
    prev: dict[str, int] = {}
    per_round: list[dict[str, int]] = []
    for r in rows:
        cum = r.get("ignored") if isinstance(r.get("ignored"), Mapping) else {}
        cum = {str(k): int(v) for k, v in cum.items() if finite_or_none(v) is not None}
        inc = {}
        for k, v in cum.items():
            # a resumed coordinator starts counting again: the count restarts, never goes negative
            inc[k] = v - prev.get(k, 0) if v >= prev.get(k, 0) else v
            if k not in reasons:
                reasons.append(k)
        per_round.append(inc)
        prev = cum
    totals: dict[str, int] = {}
    for inc in per_round:
        for k, v in inc.items():
            totals[k] = totals.get(k, 0) + v
    if isinstance(final, Mapping):  # counted after the last round (e.g. while finishing)
        for k, v in final.items():
            k = str(k)
            if finite_or_none(v) is not None and int(v) > prev.get(k, 0):
                totals[k] = totals.get(k, 0) + int(v) - prev.get(k, 0)
                if k not in reasons:
                    reasons.append(k)
    reasons.sort()
    return {"round": [r["round"] for r in rows], "reasons": reasons,
            "per_round": {k: [inc.get(k, 0) for inc in per_round] for k in reasons},
            "totals": {k: totals.get(k, 0) for k in reasons}}


def clients_series(rows: Sequence[Mapping], timeline: Sequence[Mapping]) -> dict:
    """Clients online over time (seconds since the first timeline record, step values) and per
    round: sampled and replied (from the rows)."""
    pts = [(finite_or_none(r.get("t")), finite_or_none(r.get("online"))) for r in timeline]
    pts = [(t, n) for t, n in pts if t is not None and n is not None]
    t0 = pts[0][0] if pts else 0.0
    rounds = [(finite_or_none(r.get("t")), r["round"]) for r in timeline if r.get("completed")]
    return {"t": [t - t0 for t, _ in pts], "online": [int(n) for _, n in pts],
            "round_marks": [(t - t0, rnd) for t, rnd in rounds if t is not None],
            "round": [r["round"] for r in rows], "sampled": [_int(r, "sampled") for r in rows],
            "replied": [_int(r, "replied") for r in rows]}


def headline(rows: Sequence[Mapping], summary: Mapping | None = None) -> dict:
    """The numbers at the top of a report or dashboard."""
    acc = accuracy_series(rows)
    accs = [a for a in acc["accuracy"] if a is not None]
    moved = acc["mb"][-1] if rows else 0.0
    dense = acc["dense_mb"][-1] if rows else 0.0
    energy = sum(_num(r, "energy_j") or 0.0 for r in rows)
    return {"rounds": len(rows), "last_round": rows[-1]["round"] if rows else 0,
            "accuracy": accs[-1] if accs else None, "best_accuracy": max(accs) if accs else None,
            "mb_moved": moved, "dense_mb": dense, "dense_ratio": dense / moved if moved else None,
            "mb_down": sum(_int(r, "mqtt_bytes_down") for r in rows) / MB,
            "mb_up": sum(_int(r, "mqtt_bytes_up") for r in rows) / MB,
            "energy_j": energy, "energy_measured": bool(rows) and all(r.get("energy_measured") is True for r in rows),
            "status": (summary or {}).get("status") or ("in progress" if rows else "not started")}


# --- figures -------------------------------------------------------------------------------------
def _layout(name: str, **kw) -> dict:
    """Common layout; the title is the page's (``TITLES[name]``), not the figure's."""
    base = dict(height=340, margin=dict(l=60, r=20, t=30, b=40), template="plotly_white",
                legend=dict(orientation="h", y=-0.22), meta=dict(name=name))
    base.update(kw)
    return base


def _round_axis(f, rounds: Sequence[int]) -> None:
    """Whole rounds on the x axis (no 1.5)."""
    f.update_xaxes(tickmode="linear", tick0=1, dtick=max(1, -(-len(rounds) // 12)))


def figures(rows: Sequence[Mapping], timeline: Sequence[Mapping] = (),
            summary: Mapping | None = None) -> dict[str, Any]:
    """name -> ``plotly.graph_objects.Figure`` for every plot in :data:`FIGURES`."""
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    acc = accuracy_series(rows)
    f = go.Figure(layout=_layout("accuracy_round", xaxis_title="round", yaxis_title="test accuracy"))
    f.add_scatter(x=acc["round"], y=acc["accuracy"], mode="lines+markers", name="accuracy", connectgaps=True)
    if acc["global_accuracy"]:
        f.add_scatter(x=acc["round"], y=acc["global_accuracy"], mode="lines+markers", name="global model (pFedPara)",
                      connectgaps=True)
    _round_axis(f, acc["round"])
    figs["accuracy_round"] = f

    f = go.Figure(layout=_layout("accuracy_mb", xaxis_title="cumulative MB", yaxis_title="test accuracy"))
    f.add_scatter(x=acc["mb"], y=acc["accuracy"], mode="lines+markers", name="measured (MQTT-framed)",
                  connectgaps=True)
    f.add_scatter(x=acc["dense_mb"], y=acc["accuracy"], mode="lines", name="dense fp32 (same rounds, exact)",
                  line=dict(dash="dash", color="gray"), connectgaps=True)
    figs["accuracy_mb"] = f

    b = bytes_series(rows)
    f = go.Figure(layout=_layout("bytes", xaxis_title="round", yaxis_title="MB", barmode="group"))
    for way, colors in (("down", ("#1f77b4", "#aec7e8")), ("up", ("#ff7f0e", "#ffbb78"))):
        f.add_bar(x=b["round"], y=b[f"{way}_payload"], name=f"{way}: payload", offsetgroup=way,
                  marker_color=colors[0])
        f.add_bar(x=b["round"], y=b[f"{way}_framing"], base=b[f"{way}_payload"], name=f"{way}: MQTT framing",
                  offsetgroup=way, marker_color=colors[1])
    _round_axis(f, b["round"])
    figs["bytes"] = f

    e = energy_by_client(rows)
    labels = [f"{cid} ({'measured' if v['measured'] else 'estimated'})" for cid, v in e.items()]
    f = go.Figure(layout=_layout("energy", xaxis_title="client", yaxis_title="joules", barmode="stack"))
    for phase in PHASES:
        f.add_bar(x=labels, y=[v[phase] for v in e.values()], name=phase)
    figs["energy"] = f

    t = round_time_series(rows)
    f = go.Figure(layout=_layout("round_time", xaxis_title="round", yaxis_title="seconds", barmode="stack"))
    for label, vals in t["parts"].items():
        f.add_bar(x=t["round"], y=vals, name=label,
                  marker_color="lightgray" if label == UNRECORDED else None)
    _round_axis(f, t["round"])
    figs["round_time"] = f

    c = clients_series(rows, timeline)
    f = go.Figure(layout=_layout("clients", xaxis_title="seconds since the first record", yaxis_title="clients"))
    if c["t"]:
        f.add_scatter(x=c["t"], y=c["online"], mode="lines", line_shape="hv", name="online")
        for tm, rnd in c["round_marks"]:
            f.add_vline(x=tm, line=dict(color="lightgray", width=1))
    else:  # no timeline (older run): per round sampled / replied only
        f.update_layout(xaxis_title="round")
        f.add_scatter(x=c["round"], y=c["sampled"], mode="lines+markers", name="sampled")
        f.add_scatter(x=c["round"], y=c["replied"], mode="lines+markers", name="replied")
        _round_axis(f, c["round"])
    figs["clients"] = f

    ig = ignored_series(rows, (summary or {}).get("ignored"))
    f = go.Figure(layout=_layout("ignored", xaxis_title="round", yaxis_title="messages", barmode="stack"))
    for reason in ig["reasons"]:
        f.add_bar(x=ig["round"], y=ig["per_round"][reason], name=f"{reason} ({ig['totals'][reason]})")
    if ig["reasons"]:
        _round_axis(f, ig["round"])
    else:
        f.add_annotation(text="none: every message was accepted", showarrow=False, xref="paper", yref="paper",
                         x=0.5, y=0.5, font=dict(size=14))
        f.update_xaxes(visible=False)
        f.update_yaxes(visible=False)
    figs["ignored"] = f
    return figs


def notes(rows: Sequence[Mapping], timeline: Sequence[Mapping] = ()) -> dict[str, str]:
    """A line under a plot when its data is partial or missing."""
    out: dict[str, str] = {}
    if not rows:
        for name in FIGURES:
            out[name] = "no round completed yet"
        return out
    t = round_time_series(rows)
    if t["recorded"] < len(rows):
        out["round_time"] = (f"{len(rows) - t['recorded']} of {len(rows)} rounds have no per-phase timing "
                             f"(coordinators before it was recorded): shown as '{UNRECORDED}'")
    e = energy_by_client(rows)
    if not e:
        out["energy"] = "no client reported energy (edge clients run with --energy off?)"
    else:
        out["energy"] = ("upload energy of a round arrives with the client's next reply; the last round's "
                         "uploads are not counted")
    if not timeline:
        out["clients"] = "no clients.jsonl in this run: sampled and replied clients per round instead"
    return out
