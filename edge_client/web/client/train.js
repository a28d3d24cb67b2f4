// Local training as fedpara/training.py: minibatch SGD (plain, or with momentum and weight decay in
// torch.optim.SGD's order), mean cross-entropy, E epochs; and evaluation (accuracy, mean loss).
// The order of the examples: a seeded shuffle per epoch, or an explicit ``order`` (epochs x N
// indices) when a test reproduces the Python client's torch DataLoader order.
import * as tf from "tfjs";

export function shuffled(n, seed, epoch) {
  let a = (seed * 0x9e3779b1 + epoch * 0x85ebca6b + 1) >>> 0;
  const rand = () => { a = (a + 0x6d2b79f5) >>> 0; let t = Math.imul(a ^ (a >>> 15), a | 1); t ^= t + Math.imul(t ^ (t >>> 7), t | 61); return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
  const idx = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) { const j = Math.floor(rand() * (i + 1)); [idx[i], idx[j]] = [idx[j], idx[i]]; }
  return idx;
}

/** data: {x: Float32Array (N * 784, normalised), y: Int32Array (N)}; rows -> (B, 28, 28, 1), (B). */
function batch(data, rows) {
  const per = 784, x = new Float32Array(rows.length * per), y = new Int32Array(rows.length);
  rows.forEach((r, i) => { x.set(data.x.subarray(r * per, (r + 1) * per), i * per); y[i] = data.y[r]; });
  return [tf.tensor4d(x, [rows.length, 28, 28, 1]), tf.tensor1d(y, "int32")];
}

function meanCrossEntropy(logits, labels) {
  const logp = tf.logSoftmax(logits);
  return tf.neg(tf.mean(tf.sum(tf.mul(tf.oneHot(labels, logits.shape[1]), logp), 1)));
}

// Training runs on the page's thread: give the event loop (MQTT keep-alives, heartbeats, the page)
// a turn at least every 50 ms.
let lastYield = 0;
async function breathe() {
  if (performance.now() - lastYield < 50) return;
  await new Promise((r) => setTimeout(r, 0));
  lastYield = performance.now();
}

/** E epochs of SGD on ``model``; {loss, num_examples, steps, seconds}. */
export async function trainEpochs(model, data, { epochs, batch_size: batchSize, lr, momentum = 0, weight_decay: wd = 0, seed = 0 },
  { order = null, onStep = null } = {}) {
  const n = data.y.length, vars = model.variables(), bufs = new Map();
  let total = 0, count = 0, steps = 0;
  const t0 = performance.now();
  for (let e = 0; e < epochs; e++) {
    const idx = order ? order[e] : shuffled(n, seed, e);
    if (idx.length !== n) throw new Error(`order for epoch ${e} has ${idx.length} indices, the data ${n}`);
    for (let b = 0; b < n; b += batchSize) {
      const rows = idx.slice(b, b + batchSize);
      const [x, y] = batch(data, rows);
      const { value, grads } = tf.variableGrads(() => meanCrossEntropy(model.forward(x), y), vars);
      tf.tidy(() => {
        for (const v of vars) {
          let d = grads[v.name];
          if (wd !== 0) d = tf.add(d, tf.mul(v, wd));
          if (momentum !== 0) {
            const old = bufs.get(v.name);
            const buf = old ? tf.add(tf.mul(old, momentum), d) : tf.clone(d);
            if (old) old.dispose();
            bufs.set(v.name, tf.keep(buf));
            d = buf;
          }
          v.assign(tf.sub(v, tf.mul(d, lr)));
        }
      });
      total += (await value.data())[0] * rows.length;
      count += rows.length;
      steps++;
      tf.dispose([x, y, value, ...Object.values(grads)]);
      if (onStep) onStep(steps);
      await breathe();
    }
  }
  for (const b of bufs.values()) b.dispose();
  return { loss: total / Math.max(count, 1), num_examples: n, steps, seconds: (performance.now() - t0) / 1000 };
}

/** {accuracy, loss, num_examples} of the model on data. */
export async function evaluate(model, data, batchSize = 256) {
  const n = data.y.length;
  let correct = 0, loss = 0;
  for (let b = 0; b < n; b += batchSize) {
    const rows = Array.from({ length: Math.min(batchSize, n - b) }, (_, i) => b + i);
    const [x, y] = batch(data, rows);
    const [c, l] = tf.tidy(() => {
      const logits = model.forward(x);
      return [tf.sum(tf.cast(tf.equal(tf.argMax(logits, 1), y), "int32")), tf.mul(meanCrossEntropy(logits, y), rows.length)];
    });
    correct += (await c.data())[0];
    loss += (await l.data())[0];
    tf.dispose([x, y, c, l]);
    await breathe();
  }
  return { accuracy: correct / Math.max(n, 1), loss: loss / Math.max(n, 1), num_examples: n };
}

/** Fashion-MNIST pixels (uint8) -> model inputs, as export/datafiles.py's PIXEL_LUT (float32 steps). */
export const MEAN = 0.2860, STD = 0.3530;
const LUT = Float32Array.from({ length: 256 }, (_, u) => Math.fround(Math.fround(Math.fround(u / 255) - Math.fround(MEAN)) / Math.fround(STD)));
export function normalise(pixels) { return Float32Array.from(pixels, (p) => LUT[p]); }
