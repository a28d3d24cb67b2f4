"""``fedpara report RUN_DIR``: one self-contained HTML file with a run's plots and numbers.

The plots are plotly figures (:mod:`.runview`, shared with the live dashboard); plotly.js is
inlined once, so the file opens offline and loads nothing from the network. Works on a finished
run and on one still in progress (no summary.json yet, perhaps a torn last line in metrics.jsonl:
:class:`~fedpara.runtime.rundir.RunDir` drops it).

Shown: the run's settings (never key paths or credentials), its headline numbers, the plots of
:data:`.plots.FIGURES`, and a table per round.
"""
from __future__ import annotations

import html
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedpara.runtime.rundir import RunDir

from . import plots

log = logging.getLogger(__name__)

# the config fields a report shows (key paths, the run directory and the like stay out)
SHOWN_CONFIG = ("model", "scheme", "ratio", "rounds", "clients_per_round", "min_clients", "local_epochs", "batch_size",
                "lr", "lr_decay", "aggregator", "downlink", "uplink", "insecure")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em} td,th{border-bottom:1px solid #ddd;padding:.25em .7em;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.kv td:first-child{color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}
.note{color:#666;font-size:.85em;margin:.2em 0 0 .3em} .plot{min-width:0}
.plot h3{font-size:1em;margin:.8em 0 0 .3em;font-weight:600}
"""


def _fmt(v, spec: str = "", none: str = "-") -> str:
    if v is None:
        return none
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _kv_table(items: Sequence[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in items)
    return f'<table class="kv">{rows}</table>'


def headline_items(rows: Sequence[Mapping], summary: Mapping, config: Mapping) -> list[tuple[str, str]]:
    h = plots.headline(rows, summary)
    total = config.get("rounds")
    items = [
        ("run", str(summary.get("run_id") or config.get("run_id") or "-")),
        ("status", h["status"] if summary else f"in progress (no summary.json yet; {h['rounds']} rounds recorded)"),
        ("rounds", f"{h['rounds']}" + (f" of {total}" if total else "")),
        ("test accuracy (last / best)", f"{_fmt(h['accuracy'], '.2%')} / {_fmt(h['best_accuracy'], '.2%')}"),
        ("MB that crossed the broker (down / up)", f"{h['mb_down']:.2f} / {h['mb_up']:.2f}"),
        ("dense fp32 MB for the same rounds", f"{h['dense_mb']:.2f}"),
        ("dense / measured", f"{h['dense_ratio']:.1f}x" if h["dense_ratio"] else "-"),
        ("energy, all clients", f"{h['energy_j']:.1f} J ({'measured' if h['energy_measured'] else 'estimated'})"
         if rows else "-"),
    ]
    stale = [s for r in rows if isinstance(r.get("staleness"), Mapping) for s in r["staleness"].values()
             if isinstance(s, int)]
    if any(r.get("mode") == "async" for r in rows):  # asynchronous buffered versions (docs/async.md)
        items.append(("async: updates per version, staleness (mean / max)",
                      f"{len(stale) / max(1, len(rows)):.1f}, {sum(stale) / max(1, len(stale)):.2f} / "
                      f"{max(stale, default=0)}; refused as too stale: {sum(r.get('too_stale', 0) for r in rows)}"))
    eps = [r for r in rows if isinstance(r.get("epsilon"), (int, float))]
    if eps:  # a differentially private run: the budget it spent (docs/privacy.md)
        dp = eps[-1].get("dp") or {}
        items.append(("privacy spent (user-level DP)", f"epsilon {eps[-1]['epsilon']:.3f} at delta {eps[-1].get('delta')}"
                      f" ({dp.get('mode', 'central')}, noise multiplier {dp.get('noise_multiplier', '-')})"))
    if summary.get("wall_s") is not None:
        items.append(("wall time", f"{_fmt(summary.get('demo_wall_s', summary['wall_s']), '.1f')} s"))
    return items


def _round_table(rows: Sequence[Mapping]) -> str:
    head = ("round", "accuracy", "loss", "replied / sampled", "MB down", "MB up", "seconds", "energy J")
    body = []
    for r in rows:
        cells = (str(r["round"]), _fmt(plots.finite_or_none(r.get("accuracy")), ".4f"),
                 _fmt(plots.finite_or_none(r.get("loss")), ".4f"), f"{r.get('replied', '-')} / {r.get('sampled', '-')}",
                 _fmt((r.get("mqtt_bytes_down") or 0) / plots.MB, ".3f"),
                 _fmt((r.get("mqtt_bytes_up") or 0) / plots.MB, ".3f"),
                 _fmt(plots.finite_or_none(r.get("duration_s")), ".2f"), _fmt(plots.finite_or_none(r.get("energy_j")), ".1f"))
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render(rows: Sequence[Mapping], *, summary: Mapping | None = None, config: Mapping | None = None,
           timeline: Sequence[Mapping] = (), name: str = "run") -> str:
    """The report as one HTML document (plotly.js inline)."""
    import plotly
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    summary, config = dict(summary or {}), dict(config or {})
    figs = plots.figures(rows, timeline, summary)
    notes = plots.notes(rows, timeline)
    sections = []
    for key in plots.FIGURES:
        div = pio.to_html(figs[key], include_plotlyjs=False, full_html=False, div_id=f"plot-{key}",
                          config=PLOT_CONFIG)
        note = f'<p class="note">{html.escape(notes[key])}</p>' if key in notes else ""
        sections.append(f'<section class="plot" id="{key}"><h3>{html.escape(plots.TITLES[key])}</h3>{div}{note}'
                        '</section>')
    settings = [(k, str(config[k])) for k in SHOWN_CONFIG if k in config]
    if "insecure" in config:
        settings[-1] = ("messages", "unsigned (insecure)" if config["insecure"] else "signed (Ed25519)")
    title = f"fedpara run {summary.get('run_id') or config.get('run_id') or name}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{html.escape(name)} &middot; generated {html.escape(generated)} by <code>fedpara report</code>
&middot; plots: plotly {html.escape(plotly.__version__)}, inline (opens offline)</p>
<div class="grid"><div><h2>Summary</h2>{_kv_table(headline_items(rows, summary, config))}</div>
<div><h2>Settings</h2>{_kv_table(settings) if settings else '<p class="note">no config.json</p>'}</div></div>
<h2>Plots</h2>
<div class="grid">{''.join(sections)}</div>
<h2>Rounds</h2>
{_round_table(rows) if rows else '<p class="note">no round completed yet</p>'}
</body></html>
"""


def write_report(run_dir: str | os.PathLike | RunDir, out: str | os.PathLike | None = None) -> Path:
    """Write RUN_DIR/report.html (or ``out``) atomically; returns its path."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if not rd.root.is_dir() or not rd.looks_like_run():
        raise FileNotFoundError(f"{rd.root}: not a run directory (no metrics.jsonl, checkpoints/ or summary.json)")
    try:
        config = rd.read_config()
    except (FileNotFoundError, ValueError) as exc:
        log.info("report without the run's settings: %s", exc)
        config = {}
    try:
        summary = rd.read_summary()
    except ValueError as exc:  # a summary half-written by a dying process
        log.warning("report: ignoring %s", exc)
        summary = {}
    text = render(rd.read_metrics(), summary=summary, config=config, timeline=rd.read_client_timeline(),
                  name=rd.root.resolve().name)
    path = Path(out) if out is not None else rd.report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
