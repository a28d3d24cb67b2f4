// fedpara live dashboard: polls /api/state every second, fetches /api/figures when they change.
// Every value from the server is inserted as text (textContent), never as HTML.
"use strict";

const POLL_MS = 1000;
let figuresVersion = -1;
let fetchingFigures = false;
let lastClients = "";

function $(id) { return document.getElementById(id); }
function setText(id, text) { const el = $(id); if (el && el.textContent !== text) el.textContent = text; }
function pct(v) { return v === null || v === undefined ? "-" : (100 * v).toFixed(2) + "%"; }
function num(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
function ago(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function renderClients(clients) {
  const key = JSON.stringify(clients);
  if (key === lastClients) return;  // unchanged: keep the rows (and any selection in them)
  lastClients = key;
  const body = $("clients").tBodies[0];
  const rows = [];
  for (const c of clients) {
    const tr = document.createElement("tr");
    tr.dataset.client = c.id;
    tr.dataset.state = c.state;
    const cells = [c.id, c.state, ago(c.last_seen_s), c.device || "-", String(c.num_examples || "-")];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 1) td.className = "st-" + c.state.split(" ")[0];
      tr.appendChild(td);
    });
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function render(s) {
  setText("run-id", s.run_id);
  setText("run-info", `${s.model} / ${s.scheme}, ratio ${s.ratio}, ${s.signed ? "signed" : "unsigned (insecure)"}`);
  setText("status", s.status);
  setText("round", String(s.round));
  setText("rounds-total", String(s.rounds_total));
  setText("replies", s.current_round ? `${s.replies} / ${s.sampled}`
    : (s.last_round_sampled ? `${s.last_round_replied} / ${s.last_round_sampled} (last)` : "-"));
  setText("accuracy", pct(s.accuracy));
  setText("best-accuracy", s.best_accuracy === null ? "" : `(${pct(s.best_accuracy)})`);
  setText("mb", `${num(s.mb_down, 2)} / ${num(s.mb_up, 2)}`);
  setText("dense", `${num(s.dense_mb, 1)} (${s.dense_ratio ? num(s.dense_ratio, 1) + "x" : "-"})`);
  setText("energy", s.energy_j ? `${num(s.energy_j, 1)} J ${s.energy_measured ? "measured" : "est."}` : "-");
  setText("online", `${s.clients_online} / ${s.clients_known}`);
  if (s.mode === "async") {  // asynchronous buffered versions (docs/async.md)
    document.getElementById("async-card").hidden = false;
    setText("staleness", `max ${s.staleness_max} · ${s.in_flight} in flight`);
  }
  if (typeof s.epsilon === "number") {  // differentially private runs only
    document.getElementById("privacy-card").hidden = false;
    setText("epsilon", `ε ${num(s.epsilon, 2)} (δ ${s.delta})`);
  }
  renderClients(s.clients);
  if (s.figures_version !== figuresVersion && !fetchingFigures) loadFigures();
}

function plotSection(name, title) {
  let sec = $("sec-" + name);
  if (!sec) {
    sec = document.createElement("section");
    sec.className = "plot";
    sec.id = "sec-" + name;
    const h = document.createElement("h3");
    h.textContent = title;
    const div = document.createElement("div");
    div.id = "plot-" + name;
    const note = document.createElement("p");
    note.className = "note";
    note.id = "note-" + name;
    sec.append(h, div, note);
    $("plots").appendChild(sec);
  }
  return sec;
}

async function loadFigures() {
  fetchingFigures = true;
  try {
    const r = await fetch("/api/figures", {cache: "no-store"});
    if (!r.ok) return;
    const data = await r.json();
    for (const [name, fig] of Object.entries(data.figures)) {
      plotSection(name, data.titles[name] || name);
      setText("note-" + name, data.notes[name] || "");
      if (window.Plotly) {
        Plotly.react("plot-" + name, fig.data, fig.layout, {displaylogo: false, responsive: true});
      }
    }
    figuresVersion = data.version;
  } catch (e) {
    // the next poll retries
  } finally {
    fetchingFigures = false;
  }
}

async function poll() {
  try {
    const r = await fetch("/api/state", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    setText("conn", "");
  } catch (e) {
    setText("conn", "no answer from the coordinator (" + e.message + "); retrying");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
