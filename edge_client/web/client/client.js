// The browser client: protocol v1 (docs/protocol.md) over MQTT over WebSockets (mqtt.js), the
// same topics, messages and replies as edge_client/client.py: a retained, signed online status
// repeated every heartbeat_s with a signed last will per connection, tasks reassembled, verified
// and trained on, the update (global factors) sent at once, then the local evaluation as a
// report; a task that cannot run gets a failure reply; a finish from the current coordinator
// session ends the run. Every message is signed with the phone's Ed25519 key unless insecure.
import mqtt from "mqtt";
import { AuthError, DIGESTS, makeSigner, makeVerifier, WireError } from "./hash.js";
import { Reassembler, chunkSignedBytes, framedBytes, parseChunk, split } from "./chunks.js";
import { Signer, Verifier, Plain, nowNs } from "./seal.js";
import { uplinkPolicy } from "./wire.js";
import { Model } from "./model.js";
import { trainEpochs, evaluate } from "./train.js";

const ID = /^[A-Za-z0-9_.-]{1,64}$/;

export function topics(run) {
  const base = `fedpara/v1/${run}`;
  return { base, coordinator: `${base}/coordinator`, task: `${base}/task`, control: `${base}/control`,
    status: (c) => `${base}/status/${c}`, taskFor: (c) => `${base}/task/${c}`, update: (c) => `${base}/update/${c}` };
}

/** The fields of a task this client uses, checked as fedpara.runtime.messages.Task checks them. */
function parseTask(meta) {
  const t = meta.train || {};
  const num = (v, lo, hi, d) => { const x = v === undefined ? d : v; if (typeof x !== "number" || !(x >= lo && x <= hi)) throw new Error(`task field out of range: ${x}`); return x; };
  if (typeof meta.task_id !== "string" || !meta.task_id || meta.task_id.length > 128) throw new Error("task.task_id: missing");
  if (!meta.spec || typeof meta.spec !== "object") throw new Error("task.spec: missing or not an object");
  return { task_id: meta.task_id, spec: meta.spec, init_seed: meta.init_seed || 0,
    train: { epochs: num(t.epochs, 1, 10000), batch_size: num(t.batch_size, 1, 1 << 20), lr: num(t.lr, 1e-12, 1e3),
      momentum: num(t.momentum, 0, 0.999999, 0), weight_decay: num(t.weight_decay, 0, 1, 0), seed: num(t.seed, 0, Number.MAX_SAFE_INTEGER, 0) },
    deadline_s: num(meta.deadline_s, 1e-3, 7 * 86400, 120), uplink: typeof meta.uplink === "string" ? meta.uplink : "fp32",
    max_packet: num(meta.max_packet, 1024, 1 << 28, 1_000_000), digest: DIGESTS.includes(meta.digest) ? meta.digest : "sha256", dp: meta.dp };
}

export class BrowserClient {
  /**
   * cfg: {broker (ws:// or wss:// URL), run, clientId, insecure, keySeed (32 bytes), coordinatorPub
   *       (32 bytes), username, password, heartbeatS (10), maxAgeS (600), device}
   * data, testData: {x: Float32Array (N * 784, normalised), y: Int32Array}; testData optional.
   * log(text), onEvent({type, ...}) report to the page.
   */
  constructor(cfg, { data, testData = null, log = () => {}, onEvent = () => {} }) {
    for (const [what, v] of [["run", cfg.run], ["client id", cfg.clientId]]) if (!ID.test(v || "")) throw new Error(`${what} must be 1-64 characters of [A-Za-z0-9_.-], got ${v}`);
    if (!/^wss?:\/\//.test(cfg.broker || "")) throw new Error(`broker must be a ws:// or wss:// URL, got ${cfg.broker}`);
    Object.assign(this, { cfg, data, testData, log, onEvent });
    this.t = topics(cfg.run);
    this.heartbeatS = cfg.heartbeatS ?? 10;
    this.counters = {};
    this.seen = new Set();
    this.rounds = [];
    this.connects = 0;
    this.incoming = new Map();
    this.queue = Promise.resolve();
    this.pending = null;  // the newest task waiting for the trainer (a newer one supersedes it)
    this.training = false;
    this.carry = {};
    this.watch = { seq: 0n, session: "", live: false };
    this.finished = new Promise((r) => { this._finish = r; });
  }

  count(k) { this.counters[k] = (this.counters[k] || 0) + 1; }

  async start() {
    const c = this.cfg;
    if (c.insecure) {
      this.log("insecure: messages are not signed; this phone obeys anyone who can publish on the broker");
      this.seal = new Plain(c.clientId); this.opener = new Plain();
    } else {
      const signer = await makeSigner(c.keySeed), verifier = await makeVerifier(c.coordinatorPub);
      this.seal = new Signer(signer, c.clientId);
      this.opener = new Verifier({ coordinator: verifier }, { maxAgeS: c.maxAgeS ?? 600 });
      this.log(`signing with Ed25519 (${signer.impl}), verifying the coordinator (${verifier.impl})`);
    }
    this.reasm = new Reassembler({ authenticate: c.insecure ? null : this.opener.chunkAuthenticator("coordinator", chunkSignedBytes) });
    this.session = 0n;
    const will = await this.status("offline", true);
    const hex = Array.from(crypto.getRandomValues(new Uint8Array(3)), (b) => b.toString(16).padStart(2, "0")).join("");
    this.mqtt = mqtt.connect(c.broker, { clientId: `fp-${c.run}-${c.clientId}-${hex}`, clean: true, keepalive: 30,
      reconnectPeriod: 2000, connectTimeout: 15000, protocolVersion: 4, username: c.username, password: c.password,
      will: { topic: this.t.status(c.clientId), payload: will, qos: 1, retain: true } });
    this.mqtt.on("connect", () => this.onConnect());
    this.mqtt.on("close", () => { this.onEvent({ type: "connection", connected: false }); this.renewWill(); });
    this.mqtt.on("error", (e) => this.log(`broker: ${e.message || e}`));
    this.mqtt.on("message", (topic, payload) => { this.queue = this.queue.then(() => this.handle(topic, new Uint8Array(payload))); });
    if (this.heartbeatS > 0) this.beat = setInterval(() => { if (this.mqtt.connected) this.announce(); }, this.heartbeatS * 1000);
  }

  /** Our signed status; the last will is sealed per connection with seq = the session later statuses carry. */
  async status(state, will = false) {
    let seq = null;
    if (will) seq = this.session = this.seal.nextSeq();
    const meta = { state, num_examples: this.data.y.length, device: this.cfg.device || "browser", heartbeat_s: this.heartbeatS,
      session: this.session, connection: this.connects, digests: DIGESTS };
    return (await this.seal.seal({ kind: "status", run: this.cfg.run, round: 0, sender: this.cfg.clientId, meta, tensors: {} }, { seq })).data;
  }

  async renewWill() {
    if (this.stopped) return;
    const payload = await this.status("offline", true);
    this.mqtt.options.will = { ...this.mqtt.options.will, payload };
  }

  onConnect() {
    this.connects++;
    this.onEvent({ type: "connection", connected: true, connects: this.connects });
    const subs = [this.t.task, this.t.taskFor(this.cfg.clientId), this.t.control, this.t.coordinator, this.t.status(this.cfg.clientId)];
    this.mqtt.subscribe(Object.fromEntries(subs.map((s) => [s, { qos: 1 }])));
    this.announce();
  }

  async announce() {
    this.lastStatus = await this.status("online");
    this.mqtt.publish(this.t.status(this.cfg.clientId), this.lastStatus, { qos: 1, retain: true });
  }

  publishAll(topic, frames, timeoutS) {
    return new Promise((resolve) => {
      let left = frames.length, done = false;
      const timer = setTimeout(() => { done = true; resolve(false); }, timeoutS * 1000);
      for (const f of frames) {
        this.mqtt.publish(topic, f, { qos: 1 }, (err) => {
          if (done) return;
          if (err) { done = true; clearTimeout(timer); resolve(false); return; }
          if (--left === 0) { done = true; clearTimeout(timer); resolve(true); }
        });
      }
    });
  }

  async handle(topic, payload) {
    try {
      await this.handleOne(topic, payload);
    } catch (e) {
      if (e instanceof AuthError) this.count(e.reason);
      else if (e instanceof WireError) this.count("malformed");
      else this.count("error");
      this.log(`refused a message on ${topic}: ${e.message}`);
    }
  }

  async handleOne(topic, payload) {
    const me = this.cfg.clientId;
    if (topic === this.t.status(me)) {  // our retained status was cleared or replaced: say it again
      if (this.lastStatus && !this.stopped && (payload.length !== this.lastStatus.length || payload.some((b, i) => b !== this.lastStatus[i]))) {
        this.count("status_reasserted"); this.announce();
      }
      return;
    }
    if (topic === this.t.coordinator) {
      if (!payload.length) return;
      const msg = await this.opener.open(payload, { sender: "coordinator" });
      if (msg.kind === "status" && msg.run === this.cfg.run) {
        this.onEvent({ type: "coordinator", state: msg.meta.state });
        if (msg.meta.state === "online") this.saw(msg.seq, msg.meta.coordinator_session || "");
      }
      return;
    }
    if (topic === this.t.control) {
      const msg = await this.opener.open(payload, { sender: "coordinator" });
      if (msg.kind !== "control" || msg.run !== this.cfg.run || msg.meta.action !== "finish") return;
      if (this.opener.signed) {
        const why = !this.watch.live ? "no status of the current coordinator was seen yet"
          : (msg.meta.session || "") !== this.watch.session ? "it names another coordinator session"
            : msg.seq <= this.watch.seq ? "it is older than the coordinator's newest message (a replay)" : "";
        if (why) { this.count("stale_control"); this.log(`ignored a finish: ${why}`); return; }
        this.saw(msg.seq, null);
      }
      this.log(`run finished (${msg.meta.status || ""})`);
      this.finishMeta = msg.meta;
      await this.stop();
      this._finish(msg.meta);
      return;
    }
    if (topic !== this.t.task && topic !== this.t.taskFor(me)) { this.count("unexpected_topic"); return; }
    const chunk = parseChunk(payload, 256 * 2 ** 20);
    const [first, framed] = this.incoming.get(chunk.key) || [performance.now(), 0];
    this.incoming.set(chunk.key, [first, framed + framedBytes([payload.length], topic)]);
    while (this.incoming.size > 64) this.incoming.delete(this.incoming.keys().next().value);
    const data = await this.reasm.add(payload);
    if (!data) return;
    const transfer = { task_payload_bytes: data.length, task_mqtt_bytes: this.incoming.get(chunk.key)[1],
      download_s: (performance.now() - first) / 1000 };
    this.incoming.delete(chunk.key);
    const t0 = performance.now();
    const msg = await this.opener.open(data, { sender: "coordinator", digestChecked: true });
    if (msg.kind !== "task" || msg.run !== this.cfg.run) throw new WireError(`expected a task for run ${this.cfg.run}, got ${msg.kind}`);
    if (!Array.isArray(msg.meta.selected) || !msg.meta.selected.includes(me)) { this.count("not_selected"); return; }
    const task = parseTask(msg.meta);
    if (this.seen.has(task.task_id)) {  // QoS 1 redelivery, or the coordinator asking again
      this.count("duplicate");
      if (this.lastUpdate && this.lastUpdate.taskId === task.task_id) {
        this.count("update_resent");
        for (const f of this.lastUpdate.frames) this.mqtt.publish(this.lastUpdate.topic, f, { qos: 1 });
      }
      return;
    }
    this.seen.add(task.task_id);
    this.saw(msg.seq, null);
    transfer.decode_s = (performance.now() - t0) / 1000;
    if (this.pending) this.count("superseded");
    this.pending = { round: msg.round, task, tensors: msg.tensors, transfer };
    this.onEvent({ type: "task", round: msg.round, task_id: task.task_id });
    if (!this.training) this.trainLoop();
  }

  saw(seq, session) {
    if (seq === null || seq <= this.watch.seq) return;
    this.watch.seq = seq;
    if (session) { this.watch.session = session; this.watch.live = true; }
  }

  async trainLoop() {
    this.training = true;
    try {
      while (this.pending && !this.stopped) {
        const item = this.pending;
        this.pending = null;
        try {
          await this.runTask(item);
        } catch (e) {
          this.count("bad_task");
          this.log(`could not run round ${item.round}: ${e.message}`);
          await this.sendFailure(item, e);
        }
      }
    } finally { this.training = false; }
  }

  async sendFailure(item, e) {
    const meta = { task_id: item.task.task_id, failure: { reason: String(e.message || e.name).slice(0, 500), error: String(e.name || "Error").slice(0, 64) } };
    const enc = await this.seal.seal({ kind: "update", run: this.cfg.run, round: item.round, sender: this.cfg.clientId, meta, tensors: {} });
    const topic = this.t.update(this.cfg.clientId);
    const frames = await split(enc.data, item.task.max_packet, topic, { sign: enc.chunkSign, nowNs });
    await this.publishAll(topic, frames, 30);
  }

  async runTask({ round, task, tensors, transfer }) {
    const me = this.cfg.clientId;
    if (task.dp) throw new Error("the browser client does not take part in differentially private runs (no local clipping yet)");
    if (!this.model || JSON.stringify(this.model.spec) !== JSON.stringify(task.spec)) {
      if (this.model) this.model.dispose();
      this.model = null;
      this.model = new Model(task.spec, tensors);
    } else this.model.load(tensors);
    this.onEvent({ type: "training", round });
    const res = await trainEpochs(this.model, this.data, task.train, { onStep: (s) => this.onEvent({ type: "step", round, step: s }) });
    const metrics = { loss: res.loss, train_s: res.seconds, steps: res.steps, ...transfer };
    if (this.testData) metrics.report_follows = true;
    if (this.carry.prev_upload) metrics.prev_upload = this.carry.prev_upload;
    const meta = { num_examples: res.num_examples, task_id: task.task_id, metrics };
    const enc = await this.seal.seal({ kind: "update", run: this.cfg.run, round, sender: me, meta, tensors: this.model.state() },
      { codecFor: uplinkPolicy(task.uplink), digest: task.digest });
    const topic = this.t.update(me);
    const frames = await split(enc.data, task.max_packet, topic, { sign: enc.chunkSign, nowNs });
    const mqttBytes = framedBytes(frames.map((f) => f.length), topic);
    const t0 = performance.now();
    const ok = await this.publishAll(topic, frames, task.deadline_s);
    this.lastUpdate = { taskId: task.task_id, topic, frames };
    this.carry.prev_upload = { round, payload_bytes: enc.stats.payload_bytes, mqtt_bytes: mqttBytes, upload_s: (performance.now() - t0) / 1000, acked: ok };
    if (ok) this.rounds.push(round);
    this.log(`round ${round} done (loss ${res.loss.toFixed(4)}, ${mqttBytes} bytes up${ok ? "" : ", publish incomplete"})`);
    this.onEvent({ type: "round", round, loss: res.loss, seconds: res.seconds, bytes: mqttBytes, acked: ok });
    if (this.testData) {
      const ev = await evaluate(this.model, this.testData);
      this.lastAccuracy = ev.accuracy;
      const report = await this.seal.seal({ kind: "update", run: this.cfg.run, round, sender: me, tensors: {},
        meta: { task_id: task.task_id, report: { local_accuracy: ev.accuracy, local_loss: ev.loss } } });
      const rf = await split(report.data, task.max_packet, topic, { sign: report.chunkSign, nowNs });
      if (!(await this.publishAll(topic, rf, 30))) this.log(`round ${round} local evaluation not reported`);
      this.onEvent({ type: "report", round, accuracy: ev.accuracy });
    }
  }

  async stop() {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.beat);
    if (this.mqtt && this.mqtt.connected) {
      const off = await this.status("offline");
      await new Promise((r) => this.mqtt.publish(this.t.status(this.cfg.clientId), off, { qos: 1, retain: true }, () => r()));
    }
    if (this.mqtt) await new Promise((r) => this.mqtt.end(false, {}, () => r()));
  }
}
