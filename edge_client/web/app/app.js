// The client page: enrolment (a one-time link from the operator), the phone's own pictures, and
// the browser client joining its run. State for tests and the operator: window.fedparaClient.
import * as tf from "tfjs";
import { BrowserClient } from "./client/client.js";
import { useBackend } from "./client/backend.js";
import { b64decode, publicFromPem, seedFromPem } from "./client/hash.js";
import { loadBundle, concatData, ownImages, addOwnImage, clearOwnImages, photoToInput } from "./client/data.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const STORE = "fedpara-enrolment";
const CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
const state = { state: "loading", rounds: [], epochSeconds: [], counters: {}, log: [] };
window.fedparaClient = state;

function log(text) {
  const line = `${new Date().toISOString().slice(11, 19)} ${text}`;
  state.log.push(line);
  $("log").textContent = state.log.slice(-200).join("\n");
  console.log(line);
}

function setState(s, detail = "") { state.state = s; $("state").textContent = detail ? `${s}: ${detail}` : s; }

/** The enrolment: from ?config=URL (the demo, tests), a one-time #enrol=CODE (the operator's
 *  link: the code is exchanged once for this phone's identity), or what this phone stored. */
async function enrolment() {
  if (params.has("config")) {
    const r = await fetch(params.get("config"), { cache: "no-store" });
    if (!r.ok) throw new Error(`config ${params.get("config")}: HTTP ${r.status}`);
    return r.json();
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.has("enrol")) {
    const r = await fetch("enrol", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ code: hash.get("enrol") }) });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `enrolment refused (HTTP ${r.status})`);
    localStorage.setItem(STORE, JSON.stringify(body));
    history.replaceState(null, "", location.pathname);  // the used code leaves the address bar
    return body;
  }
  const saved = localStorage.getItem(STORE);
  if (saved) return JSON.parse(saved);
  throw new Error("this phone is not enrolled: open the enrolment link the operator gave you");
}

async function battery() {
  if (!navigator.getBattery) { $("battery").textContent = "no Battery Status API in this browser"; return; }
  const b = await navigator.getBattery();
  const show = () => { $("battery").textContent = `${Math.round(b.level * 100)}% ${b.charging ? "(charging)" : ""} (Battery Status API level, not joules)`; };
  show(); b.addEventListener("levelchange", show); b.addEventListener("chargingchange", show);
}

let wakeLock = null;
async function keepAwake() {
  try {
    wakeLock = await navigator.wakeLock.request("screen");
    $("wake").textContent = "Screen stays on";
    wakeLock.addEventListener("release", () => { $("wake").textContent = "Keep the screen on"; });
  } catch (e) { log(`wake lock: ${e.message || e} (keep the screen on by hand)`); }
}
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "hidden" && state.state === "training") log("tab in the background: the browser slows this round down");
  if (document.visibilityState === "visible" && wakeLock && wakeLock.released) keepAwake();
});

async function refreshOwn() { const d = await ownImages(); $("own").textContent = `${d.y.length} picture(s)`; return d; }

async function main() {
  $("label").replaceChildren(...CLASSES.map((c, i) => Object.assign(document.createElement("option"), { value: i, textContent: c })));
  $("wake").addEventListener("click", keepAwake);
  $("photo").addEventListener("change", async (ev) => {
    const f = ev.target.files[0];
    if (!f) return;
    await addOwnImage(photoToInput(await createImageBitmap(f)), Number($("label").value));
    refreshOwn();
  });
  $("clear").addEventListener("click", async () => { await clearOwnImages(); refreshOwn(); });
  battery();
  let cfg;
  try { cfg = await enrolment(); } catch (e) { setState("not enrolled", e.message); log(e.message); return; }
  $("who").textContent = `${cfg.client_id} · run ${cfg.run}`;
  log(`TensorFlow.js backend: ${await useBackend(cfg.backend || "auto")}`);
  let bundle = null;
  if (cfg.data_url) { bundle = await loadBundle(cfg.data_url); log(`data: ${bundle.header.train} training examples from the coordinator's bundle`); }
  const own = await refreshOwn();
  const data = concatData(bundle && bundle.train, own);
  $("examples").textContent = data.y.length;
  if (!data.y.length) { setState("no data", "add labelled pictures first"); return; }
  const client = new BrowserClient({ broker: cfg.broker, run: cfg.run, clientId: cfg.client_id, insecure: !!cfg.insecure,
    keySeed: cfg.insecure ? null : (cfg.key_pem ? seedFromPem(cfg.key_pem) : b64decode(cfg.key_seed)),
    coordinatorPub: cfg.insecure ? null : publicFromPem(cfg.coordinator_pub_pem), username: cfg.username, password: cfg.password,
    heartbeatS: cfg.heartbeat_s ?? 10, device: `browser/${tf.getBackend()}` },
  { data, testData: bundle && bundle.test, log, onEvent: (e) => onEvent(e, data.y.length) });
  state.client = client;
  const start = async () => {
    $("start").disabled = true; $("stop").disabled = false;
    setState("connecting");
    await client.start();
    client.finished.then((m) => {
      setState("finished", m.status || "");
      $("stop").disabled = true;
      if (params.has("exit")) fetch("exit", { method: "POST" }).catch(() => {});  // fedpara demo's pages
    });
  };
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", async () => { await client.stop(); setState("left the run"); $("stop").disabled = true; });
  $("start").disabled = false;
  setState("ready");
  if (params.has("autostart")) await start();
}

function onEvent(e, n) {
  state.counters = state.client ? state.client.counters : {};
  if (e.type === "connection") setState(e.connected ? "online" : "reconnecting");
  if (e.type === "task") { $("round").textContent = e.round; }
  if (e.type === "training") setState("training", `round ${e.round}`);
  if (e.type === "round") {
    state.rounds.push(e.round);
    state.epochSeconds.push(e.seconds);
    $("loss").textContent = e.loss.toFixed(4);
    $("epoch").textContent = `${e.seconds.toFixed(1)} s (${n} examples)`;
    setState("online", `round ${e.round} sent`);
  }
  if (e.type === "report") { state.lastAccuracy = e.accuracy; $("accuracy").textContent = `${(100 * e.accuracy).toFixed(1)}%`; }
}

main().catch((e) => { setState("error", e.message || String(e)); log(e.stack || String(e)); });
