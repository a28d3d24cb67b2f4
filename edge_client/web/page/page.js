// The exported model's page: onnxruntime-web (wasm) on a photo, a picked file, or the bundled test
// samples. "?selftest" classifies the samples at load and writes "N/M correct" into #selftest.
import * as ort from "./vendor/ort.wasm.min.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let session, meta, inputName;

function setStatus(text) { $("status").textContent = text; }

async function load() {
  meta = await (await fetch("model.json")).json();
  document.title = $("title").textContent = meta.title;
  ort.env.wasm.wasmPaths = new URL("vendor/", location.href).href;
  // threads need a cross-origin-isolated page (COOP/COEP headers); one thread otherwise
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const bytes = new Uint8Array(await (await fetch("model.onnx")).arrayBuffer());
  session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  inputName = session.inputNames[0];
  const about = [`round ${meta.round ?? "-"}`, meta.accuracy != null ? `test accuracy ${(100 * meta.accuracy).toFixed(2)}%` : null,
    `${ort.env.wasm.numThreads} thread(s)`, self.crossOriginIsolated ? "isolated" : null].filter(Boolean);
  $("about").textContent = about.join(" · ");
  if (!meta.camera) for (const id of ["camera", "picker"]) $(id).disabled = true;
  if (!meta.samples) $("run-selftest").disabled = true;
  setStatus("ready");
}

async function logits(x, batch) {
  const shape = [batch, ...meta.input_shape];
  const out = await session.run({ [inputName]: new ort.Tensor("float32", x, shape) });
  return out[session.outputNames[0]].data;
}

function argmax(a, off, n) {
  let best = 0;
  for (let i = 1; i < n; i++) if (a[off + i] > a[off + best]) best = i;
  return best;
}

function percentile(sorted, q) { return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]; }

export async function selftest() {
  const s = meta.samples;
  const buf = await (await fetch(s.file)).arrayBuffer();
  const per = s.shape.reduce((a, b) => a * b, 1);
  const all = new Float32Array(buf);
  const classes = meta.classes.length;
  let correct = 0;
  const times = [];
  for (let i = 0; i < s.count; i++) {
    const t0 = performance.now();
    const out = await logits(all.subarray(i * per, (i + 1) * per), 1);
    times.push(performance.now() - t0);
    if (argmax(out, 0, classes) === s.labels[i]) correct++;
  }
  times.sort((a, b) => a - b);
  const result = { correct, total: s.count, p50_ms: percentile(times, 0.5), p95_ms: percentile(times, 0.95) };
  const el = $("selftest");
  el.textContent = `${correct}/${s.count} correct · ${result.p50_ms.toFixed(2)} ms per image (p50), ` +
    `${result.p95_ms.toFixed(2)} ms (p95)`;
  Object.assign(el.dataset, { correct, total: s.count, p50Ms: result.p50_ms });
  window.fedparaSelftest = result;
  return result;
}

// A photo -> the model's 28x28 input: centre square crop, grey, scaled; Fashion-MNIST has a light
// object on black, so a photo of a dark object on a light background is inverted (checkbox, or
// automatically when the border is brighter than the middle).
function toInput(img) {
  const size = meta.camera.size, c = $("preview"), ctx = c.getContext("2d", { willReadFrequently: true });
  const side = Math.min(img.width, img.height);
  const small = document.createElement("canvas");
  small.width = small.height = size;
  const sctx = small.getContext("2d", { willReadFrequently: true });
  sctx.drawImage(img, (img.width - side) / 2, (img.height - side) / 2, side, side, 0, 0, size, size);
  const px = sctx.getImageData(0, 0, size, size).data;
  const grey = new Float32Array(size * size);
  let border = 0, middle = 0, nb = 0, nm = 0;
  for (let i = 0; i < size * size; i++) {
    grey[i] = (0.299 * px[4 * i] + 0.587 * px[4 * i + 1] + 0.114 * px[4 * i + 2]) / 255;
    const x = i % size, y = Math.floor(i / size);
    if (x < 2 || y < 2 || x >= size - 2 || y >= size - 2) { border += grey[i]; nb++; } else { middle += grey[i]; nm++; }
  }
  const invert = $("invert").checked || border / nb > middle / nm;
  const x = new Float32Array(size * size);
  const view = ctx.createImageData(size, size);
  for (let i = 0; i < size * size; i++) {
    const g = invert ? 1 - grey[i] : grey[i];
    x[i] = (g - meta.camera.mean) / meta.camera.std;
    view.data.set([g * 255, g * 255, g * 255, 255], 4 * i);
  }
  sctx.putImageData(view, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, c.width, c.height);
  return x;
}

async function classifyFile(file) {
  if (!file) return;
  const img = await createImageBitmap(file);
  const x = toInput(img);
  const t0 = performance.now();
  const out = await logits(x, 1);
  const ms = performance.now() - t0;
  const exp = Array.from(out, (v) => Math.exp(v - Math.max(...out)));
  const sum = exp.reduce((a, b) => a + b, 0);
  const k = argmax(out, 0, out.length);
  $("result").textContent = `${meta.classes[k]} (${(100 * exp[k] / sum).toFixed(1)}%, ${ms.toFixed(1)} ms)`;
}

async function main() {
  if ("serviceWorker" in navigator && self.isSecureContext && !params.has("nosw")) {
    navigator.serviceWorker.register("sw.js").then(() => navigator.serviceWorker.ready)
      .then((reg) => reg.active && reg.active.postMessage("precache"))
      .catch((e) => console.warn("service worker:", e));
  }
  try {
    await load();
  } catch (e) {
    setStatus(`failed to load the model: ${e.message || e}`);
    $("selftest").textContent = `error: ${e.message || e}`;
    throw e;
  }
  for (const id of ["camera", "picker"]) {
    $(id).addEventListener("change", (ev) => classifyFile(ev.target.files[0]).catch((e) => {
      $("result").textContent = `could not read that picture: ${e.message || e}`;
    }));
  }
  $("run-selftest").addEventListener("click", () => selftest());
  if (params.has("selftest")) await selftest();
}

main();
