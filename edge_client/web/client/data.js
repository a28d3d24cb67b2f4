// The coordinator's data bundle for a browser client (edge_client/web/data.py) and the phone's
// own labelled photos (kept in IndexedDB, turned into 28x28 inputs as the model page does).
import { normalise } from "./train.js";

export async function loadBundle(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`data bundle ${url}: HTTP ${r.status}`);
  const buf = new Uint8Array(await r.arrayBuffer());
  if (String.fromCharCode(...buf.subarray(0, 4)) !== "FPWD") throw new Error(`${url} is not a fedpara-web-data file`);
  const hlen = new DataView(buf.buffer).getUint32(4, true);
  const h = JSON.parse(new TextDecoder().decode(buf.subarray(8, 8 + hlen)));
  const per = 784, item = h.encoding === "u8" ? 1 : 4;
  let pos = 8 + hlen;
  const take = (n) => { const out = buf.slice(pos, pos + n); pos += n; return out; };
  const xs = [take(h.train * per * item), take(h.test * per * item)];
  const ys = [take(h.train), take(h.test)];
  const input = (b) => (h.encoding === "u8" ? normalise(b) : new Float32Array(b.buffer));
  return { header: h, train: { x: input(xs[0]), y: Int32Array.from(ys[0]) }, test: h.test ? { x: input(xs[1]), y: Int32Array.from(ys[1]) } : null };
}

/** Merge datasets {x, y} (the bundle and the phone's own photos). */
export function concatData(...sets) {
  const s = sets.filter((d) => d && d.y.length);
  const n = s.reduce((a, d) => a + d.y.length, 0), x = new Float32Array(n * 784), y = new Int32Array(n);
  let o = 0;
  for (const d of s) { x.set(d.x, o * 784); y.set(d.y, o); o += d.y.length; }
  return { x, y };
}

// --- the phone's own labelled photos -----------------------------------------------------------
const DB = "fedpara-own-data", STORE = "images";

function db() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE, { autoIncrement: true });
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** Keep one labelled 28x28 input (Float32Array, already normalised) on this phone. */
export async function addOwnImage(x, label) {
  const d = await db();
  await new Promise((resolve, reject) => {
    const tx = d.transaction(STORE, "readwrite");
    tx.objectStore(STORE).add({ x: Array.from(x), label, at: Date.now() });
    tx.oncomplete = resolve; tx.onerror = () => reject(tx.error);
  });
}

export async function ownImages() {
  const d = await db();
  const rows = await new Promise((resolve, reject) => {
    const req = d.transaction(STORE).objectStore(STORE).getAll();
    req.onsuccess = () => resolve(req.result); req.onerror = () => reject(req.error);
  });
  const x = new Float32Array(rows.length * 784), y = new Int32Array(rows.length);
  rows.forEach((r, i) => { x.set(r.x, i * 784); y[i] = r.label; });
  return { x, y };
}

export async function clearOwnImages() {
  const d = await db();
  await new Promise((resolve) => { const tx = d.transaction(STORE, "readwrite"); tx.objectStore(STORE).clear(); tx.oncomplete = resolve; });
}

/** A photo -> a normalised 28x28 input: centre crop, grey, inverted when the border is lighter
 *  (Fashion-MNIST: a light object on black), as the model page does. */
export function photoToInput(img, mean = 0.2860, std = 0.3530) {
  const size = 28, c = document.createElement("canvas");
  c.width = c.height = size;
  const ctx = c.getContext("2d", { willReadFrequently: true }), side = Math.min(img.width, img.height);
  ctx.drawImage(img, (img.width - side) / 2, (img.height - side) / 2, side, side, 0, 0, size, size);
  const px = ctx.getImageData(0, 0, size, size).data, g = new Float32Array(size * size);
  let border = 0, middle = 0, nb = 0, nm = 0;
  for (let i = 0; i < size * size; i++) {
    g[i] = (0.299 * px[4 * i] + 0.587 * px[4 * i + 1] + 0.114 * px[4 * i + 2]) / 255;
    const X = i % size, Y = Math.floor(i / size);
    if (X < 2 || Y < 2 || X >= size - 2 || Y >= size - 2) { border += g[i]; nb++; } else { middle += g[i]; nm++; }
  }
  const inv = border / nb > middle / nm;
  return Float32Array.from(g, (v) => ((inv ? 1 - v : v) - mean) / std);
}
