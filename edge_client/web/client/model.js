// FedPara / low-rank / dense layers and the mlp and cnn28 models in TensorFlow.js, composed as
// fedpara/kernels.py and fedpara/layers.py compose them, with the same tensor names and shapes as
// fedpara.global_state (the wire contract), the paper's rank rule (fedpara/rank.py) and the same
// initial distributions (fedpara/kernels.py::factor_std; torch's default for dense layers and biases).
// The draws differ from torch's RNG: in a federation the task carries every global tensor, so the
// initial factors are the coordinator's; local initialisation serves training without one.
import * as tf from "tfjs";

export const SCHEMES = ["fedpara", "lowrank", "dense"];
export const MODELS = ["mlp", "cnn28"];

function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function paramCount(scheme, form, out, cols, r, k2) {
  const halves = scheme === "lowrank" ? 1 : 2;
  return halves * ((form === "tensor" ? r * r * k2 : 0) + out * r + cols * r);
}

/** fedpara/rank.py rank_for_ratio_dims for Linear (k=1) and tensor-form Conv2d layers. */
export function rankFor(out, inDim, k, ratio, scheme) {
  const k2 = k * k;
  const rMin = Math.min(Math.ceil(Math.sqrt(out)), Math.ceil(Math.sqrt(inDim)));
  let rMax;
  if (k2 === 1) rMax = Math.floor((out * inDim) / (2 * (out + inDim)));
  else { const b = out + inDim; rMax = Math.floor((-b + Math.sqrt(b * b + 2 * k2 * k2 * out * inDim)) / (2 * k2)); }
  rMax = Math.max(rMax, 1);
  const r = Math.max(1, Math.min(roundHalfEven((1 - ratio) * rMin + ratio * rMax), Math.min(out, inDim)));
  if (scheme !== "lowrank") return r;
  const form = k2 === 1 ? "matrix" : "tensor", budget = paramCount("fedpara", form, out, inDim, r, k2);
  let lr = 1;
  while (lr < Math.min(out, inDim) && paramCount("lowrank", form, out, inDim, lr + 1, k2) <= budget) lr++;
  return lr;
}

/** The layers of a model: name, kind, dims, whether it stays dense (keep_dense). */
export function layersOf(model, numClasses) {
  if (model === "mlp") {
    return [{ name: "fc1", kind: "linear", out: 256, in: 784, k: 1 }, { name: "fc2", kind: "linear", out: numClasses, in: 256, k: 1 }];
  }
  if (model === "cnn28") {
    return [{ name: "features.0", kind: "conv", out: 16, in: 1, k: 3, keepDense: true },
      { name: "features.3", kind: "conv", out: 32, in: 16, k: 3 },
      { name: "classifier.0", kind: "linear", out: 256, in: 1568, k: 1 },
      { name: "classifier.2", kind: "linear", out: numClasses, in: 256, k: 1 }];
  }
  throw new Error(`the browser client runs the models ${MODELS.join(", ")}; the task asks for ${model}`);
}

/** {name: shape} of every tensor, in fedpara.global_state's order. */
export function stateShapes(spec) {
  if (!SCHEMES.includes(spec.scheme)) throw new Error(`the browser client trains the schemes ${SCHEMES.join(", ")}; the task asks for ${spec.scheme}`);
  if (spec.tanh) throw new Error("the browser client does not run tanh halves (App. B)");
  if (spec.form !== "tensor") throw new Error("the browser client runs the tensor form of convolutions");
  if (spec.input_shape && JSON.stringify(spec.input_shape) !== "[1,28,28]") {
    throw new Error(`the browser client takes 1x28x28 inputs; the task asks for ${JSON.stringify(spec.input_shape)}`);
  }
  const out = {};
  for (const l of layersOf(spec.model, spec.num_classes)) {
    if (l.keepDense || spec.scheme === "dense") {
      out[`${l.name}.weight`] = l.kind === "conv" ? [l.out, l.in, l.k, l.k] : [l.out, l.in];
    } else {
      const r = rankFor(l.out, l.in, l.k, spec.ratio, spec.scheme);
      for (let i = 1; i <= (spec.scheme === "lowrank" ? 1 : 2); i++) {
        if (l.kind === "conv") out[`${l.name}.t${i}`] = [r, r, l.k, l.k];
        out[`${l.name}.x${i}`] = [l.out, r];
        out[`${l.name}.y${i}`] = [l.in, r];
      }
    }
    out[`${l.name}.bias`] = [l.out];
  }
  return out;
}

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Initial tensors from a seed: factor stds as fedpara/kernels.py::factor_std (no tanh). */
export function initialState(spec, seed = 0) {
  const rand = mulberry32(seed), shapes = stateShapes(spec), out = {};
  const normal = () => Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
  for (const l of layersOf(spec.model, spec.num_classes)) {
    const fanIn = l.in * l.k * l.k, he = Math.sqrt(2 / fanIn), bound = 1 / Math.sqrt(fanIn);
    const r = shapes[`${l.name}.x1`] ? shapes[`${l.name}.x1`][1] : 0;
    const [K, p] = l.kind === "conv" ? [r * r, 3] : [r, 2];
    const h = spec.scheme === "lowrank" ? he : Math.sqrt(he);
    for (const [name, shape] of Object.entries(shapes)) {
      if (!name.startsWith(`${l.name}.`)) continue;
      const n = shape.reduce((a, b) => a * b, 1), data = new Float32Array(n), leaf = name.slice(l.name.length + 1);
      if (leaf === "bias" || (leaf === "weight" && l.keepDense)) for (let i = 0; i < n; i++) data[i] = (2 * rand() - 1) * bound;
      else if (leaf === "weight") for (let i = 0; i < n; i++) data[i] = normal() * he;
      else { const std = (h / Math.sqrt(K)) ** (1 / p); for (let i = 0; i < n; i++) data[i] = normal() * std; }
      out[name] = { data, shape };
    }
  }
  return out;
}

/** One half: x @ y.T (m, n), or the Tucker-2 product (O, I, kh, kw) (fedpara/kernels.py::half). */
function half(v, name, i) {
  const x = v[`${name}.x${i}`], y = v[`${name}.y${i}`], t = v[`${name}.t${i}`];
  if (!t) return tf.matMul(x, y, false, true);
  const [r1, r2, kh, kw] = t.shape, I = y.shape[0], O = x.shape[0];
  let u = tf.matMul(y, tf.reshape(tf.transpose(t, [1, 0, 2, 3]), [r2, r1 * kh * kw]));   // (I, a*k)
  u = tf.reshape(tf.transpose(tf.reshape(u, [I, r1, kh * kw]), [1, 0, 2]), [r1, I * kh * kw]); // (a, I*k)
  return tf.reshape(tf.matMul(x, u), [O, I, kh, kw]);
}

/** How convolutions run: "native" (tf.conv2d), "im2col" (patches by pad + slices, then one matMul,
 *  whose gradient is two matMuls: the wasm backend has no Conv2DBackpropFilter kernel), or "auto":
 *  im2col on wasm, native elsewhere (on the cpu backend im2col is no faster, and one parity case,
 *  cnn28 low-rank, strayed from torch by ~500x float32 rounding there: docs/mobile.md).
 *  Stride 1, odd kernels, "same" padding (cnn28's). */
export const CONV = { impl: "auto" };

function conv2dSame(x, w) {  // x (B, H, W, C), w (kh, kw, C, O) -> (B, H, W, O)
  const [kh, kw, C, O] = w.shape, [B, H, W] = x.shape, ph = (kh - 1) / 2, pw = (kw - 1) / 2;
  const xp = tf.pad(x, [[0, 0], [ph, ph], [pw, pw], [0, 0]]);
  const cols = [];
  for (let dh = 0; dh < kh; dh++) for (let dw = 0; dw < kw; dw++) cols.push(tf.slice(xp, [0, dh, dw, 0], [B, H, W, C]));
  const patches = tf.reshape(tf.concat(cols, 3), [B * H * W, kh * kw * C]);  // column (dh, dw, c): w's order
  return tf.reshape(tf.matMul(patches, tf.reshape(w, [kh * kw * C, O])), [B, H, W, O]);
}

let models = 0;  // tfjs variable names are global: each model's carry its own prefix

export class Model {
  /** spec: the task's ModelSpec dict; state: {name: {data, shape}} (a task's tensors, or initialState). */
  constructor(spec, state) {
    this.spec = spec;
    this.layers = layersOf(spec.model, spec.num_classes);
    this.shapes = stateShapes(spec);
    this.vars = {};
    this.uid = `m${++models}`;
    for (const [name, shape] of Object.entries(this.shapes)) this.vars[name] = tf.variable(tf.zeros(shape), true, `${this.uid}/${name}`);
    this.load(state);
  }

  /** Load tensors: exactly this model's names and shapes, else an Error naming the first difference. */
  load(state) {
    const names = Object.keys(this.shapes), got = Object.keys(state);
    const missing = names.filter((n) => !(n in state)), extra = got.filter((n) => !(n in this.shapes));
    if (missing.length || extra.length) throw new Error(`task tensors do not fit ${this.spec.model}/${this.spec.scheme}: missing ${missing.slice(0, 3)}, unexpected ${extra.slice(0, 3)}`);
    for (const n of names) {
      if (JSON.stringify(state[n].shape) !== JSON.stringify(this.shapes[n])) throw new Error(`tensor ${n}: shape ${JSON.stringify(state[n].shape)}, model expects ${JSON.stringify(this.shapes[n])}`);
      this.vars[n].assign(tf.tensor(state[n].data, this.shapes[n], "float32"));
    }
  }

  /** The composed dense weight of a layer, (O, I, kh, kw) or (O, I). */
  weight(l) {
    const v = this.vars;
    if (v[`${l.name}.weight`]) return v[`${l.name}.weight`];
    const w1 = half(v, l.name, 1);
    return this.spec.scheme === "lowrank" ? w1 : tf.mul(w1, half(v, l.name, 2));
  }

  /** logits (B, C) of inputs (B, 28, 28, 1) (NHWC: one channel, so the same bytes as NCHW). */
  forward(x) {
    const n = x.shape[0];
    let h = x;
    const act = (l, z) => (l === this.layers[this.layers.length - 1] ? z : tf.relu(z));
    for (const l of this.layers) {
      if (l.kind === "conv") {
        const w = tf.transpose(this.weight(l), [2, 3, 1, 0]);  // (O, I, kh, kw) -> (kh, kw, I, O)
        const im2col = CONV.impl === "im2col" || (CONV.impl === "auto" && tf.getBackend() === "wasm");
        const z = im2col ? conv2dSame(h, w) : tf.conv2d(h, w, 1, "same");
        h = tf.maxPool(tf.relu(tf.add(z, this.vars[`${l.name}.bias`])), 2, 2, "valid");
      } else {
        if (h.rank !== 2) h = tf.reshape(tf.transpose(h, [0, 3, 1, 2]), [n, -1]);  // flatten as torch (C, H, W)
        h = act(l, tf.add(tf.matMul(h, this.weight(l), false, true), this.vars[`${l.name}.bias`]));
      }
    }
    return h;
  }

  variables() { return Object.keys(this.shapes).map((n) => this.vars[n]); }

  /** {name: {data: Float32Array, shape}}: what an update sends (every tensor is global here). */
  state() {
    const out = {};
    for (const [n, shape] of Object.entries(this.shapes)) out[n] = { data: this.vars[n].dataSync().slice(), shape };
    return out;
  }

  dispose() { for (const v of Object.values(this.vars)) v.dispose(); }
}
