// Which TensorFlow.js backend trains: "wasm" (XNNPACK, SIMD where the browser has it), "webgl"
// (the phone's GPU) or "cpu" (plain JavaScript). "auto" takes wasm, the fastest measured on CPUs
// here (docs/mobile.md), and falls back to cpu where WebAssembly is missing.
import * as tf from "tfjs";

let wasmLoaded = null;

export async function useBackend(name = "auto", { wasmPath = new URL("../vendor/", import.meta.url).href } = {}) {
  const want = name === "auto" ? ["wasm", "cpu"] : [name];
  for (const b of want) {
    try {
      if (b === "wasm") {
        if (!wasmLoaded) {
          wasmLoaded = import("tfjs-wasm").then((m) => { m.setWasmPaths(wasmPath); return m; });
        }
        await wasmLoaded;
      }
      if (await tf.setBackend(b)) { await tf.ready(); return tf.getBackend(); }
    } catch (e) {
      console.warn(`backend ${b}: ${e.message || e}`);
    }
  }
  throw new Error(`no TensorFlow.js backend of ${want.join(", ")} works in this browser`);
}
