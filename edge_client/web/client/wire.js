// The envelope (docs/wire.md 1-3): a versioned, digested header + safetensors sections, as
// fedpara/wire/envelope.py, blob.py and codecs.py write and check it. Float tensors decode to
// Float32Array; raw tensors keep their dtype. Encoding writes one uncompressed section (the
// browser has no zstd compressor: its uplink codec drops "+zstd"), codecs fp32/fp16/bf16/int8.
import { decompress as zstdDecompress } from "fzstd";
import { WireError, newHash, equalBytes, utf8, FLAG_BLAKE3 } from "./hash.js";

export const KINDS = { task: 1, update: 2, status: 3, control: 4 };
const KIND_NAMES = Object.fromEntries(Object.entries(KINDS).map(([k, v]) => [v, k]));
export const PREFIX_BYTES = 52;
const MAGIC = [0x46, 0x50, 0x57, 0x45]; // "FPWE"
export const LIMITS = { maxTensors: 4096, maxElements: 2 ** 26, maxDecodedBytes: 512 * 2 ** 20,
  maxMessageBytes: 256 * 2 ** 20, maxMetaBytes: 2 ** 20, maxNdim: 8, maxNameLen: 256, maxSections: 32 };

// safetensors dtype code -> [bytes per item, typed array]; torch dtype name -> code
const ST = { F64: [8, Float64Array], F32: [4, Float32Array], F16: [2, Uint16Array], BF16: [2, Uint16Array],
  I64: [8, BigInt64Array], I32: [4, Int32Array], I16: [2, Int16Array], I8: [1, Int8Array], U64: [8, BigUint64Array],
  U32: [4, Uint32Array], U16: [2, Uint16Array], U8: [1, Uint8Array], BOOL: [1, Uint8Array] };
const TORCH = { float64: "F64", float32: "F32", float16: "F16", bfloat16: "BF16", int64: "I64", int32: "I32",
  int16: "I16", int8: "I8", uint64: "U64", uint32: "U32", uint16: "U16", uint8: "U8", bool: "BOOL" };
const FLOATS = new Set(["float64", "float32", "float16", "bfloat16"]);
const MAIN_CODE = { fp32: "F32", fp16: "F16", bf16: "BF16", int8: "U8" };
const INT8_MIN_ROW = 16;

// --- codecs ----------------------------------------------------------------------------------
/** "fp16+zstd:3" -> {dtype: "fp16", sr: false, zstd: 3}; null zstd when absent. */
export function parseCodec(text) {
  const parts = String(text).trim().split("+");
  const dtype = parts[0];
  if (!["fp32", "fp16", "bf16", "int8", "raw"].includes(dtype)) throw new WireError(`unknown codec ${text}`);
  let sr = false, zstd = null;
  for (const p of parts.slice(1)) {
    if (p === "sr" && dtype === "int8") sr = true;
    else if (/^zstd(:\d{1,2})?$/.test(p)) {
      zstd = p.includes(":") ? Number(p.split(":")[1]) : 3;
      if (zstd < 1 || zstd > 22) throw new WireError(`bad zstd level in ${text}`);
    } else throw new WireError(`unknown codec part ${p} in ${text}`);
  }
  return { dtype, sr, zstd };
}

export function codecString(c) {
  return c.dtype + (c.sr ? "+sr" : "") + (c.zstd == null ? "" : `+zstd:${c.zstd}`);
}

function globToRegExp(glob) {
  return new RegExp("^" + glob.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
}

/** A task's uplink policy "fp16+zstd:3; *.bias=fp32" -> name -> codec, without zstd (see top). */
export function uplinkPolicy(text) {
  const items = String(text).split(";").map((s) => s.trim()).filter(Boolean);
  const base = parseCodec(items[0] || "fp32");
  const rules = items.slice(1).map((item) => {
    const [pat, codec] = item.split("=").map((s) => s.trim());
    return [globToRegExp(pat), parseCodec(codec)];
  });
  return (name) => {
    const hit = rules.find(([re]) => re.test(name));
    return { ...(hit ? hit[1] : base), zstd: null };
  };
}

const f32 = new Float32Array(1), u32 = new Uint32Array(f32.buffer);
/** float32 -> IEEE half bits, round to nearest even (as torch's .to(float16)). */
export function toHalf(x) {
  f32[0] = x;
  const b = u32[0], sign = (b >>> 16) & 0x8000, exp = (b >>> 23) & 0xff, man = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (man ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    const m = man | 0x800000, shift = 14 - e;
    let h = m >>> shift;
    const rem = m & ((1 << shift) - 1), half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  let h = (e << 10) | (man >>> 13);
  const rem = man & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++;
  return sign | h;
}

export function fromHalf(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >>> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 0x1f) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

function toBf16(x) {
  f32[0] = x;
  const b = u32[0];
  if ((b & 0x7f800000) === 0x7f800000 && (b & 0x7fffff)) return (b >>> 16) | 0x40;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

/** One float32 tensor -> [codec used, {suffix: [code, shape, typed array]}] (codecs.py rules). */
function encodeTensor(data, shape, codec) {
  const finite = data.every(Number.isFinite);
  if (codec.dtype === "fp16" && finite && data.every((v) => Math.abs(v) <= 65504)) {
    return [codec, { "": ["F16", shape, Uint16Array.from(data, toHalf)] }];
  }
  if (codec.dtype === "bf16") return [codec, { "": ["BF16", shape, Uint16Array.from(data, toBf16)] }];
  if (codec.dtype === "int8" && finite && shape.length >= 2 && shape[0] > 0 && data.length / shape[0] >= INT8_MIN_ROW) {
    const c = shape[0], k = data.length / c, q = new Uint8Array(data.length), aff = new Float32Array(2 * c);
    for (let r = 0; r < c; r++) {
      let lo = Infinity, hi = -Infinity;
      for (let j = 0; j < k; j++) { const v = data[r * k + j]; if (v < lo) lo = v; if (v > hi) hi = v; }
      const scale = Math.fround(Math.fround(hi - lo) / 255), safe = scale > 0 ? scale : 1;
      for (let j = 0; j < k; j++) {
        const v = Math.fround(Math.fround(data[r * k + j] - lo) / safe);
        const code = codec.sr ? Math.floor(v + Math.random()) : Math.round(v) - ((v % 1 === 0.5 && Math.round(v) % 2) ? 1 : 0);
        q[r * k + j] = Math.max(0, Math.min(255, code));
      }
      aff[2 * r] = scale; aff[2 * r + 1] = lo;
    }
    return [codec, { "": ["U8", shape, q], ":affine": ["F32", [c, 2], aff] }];
  }
  return [{ dtype: "fp32", sr: false, zstd: codec.zstd }, { "": ["F32", shape, Float32Array.from(data)] }];
}

// --- safetensors ------------------------------------------------------------------------------
function writeSafetensors(entries) {
  const order = entries.map((e, i) => i).sort((a, b) => ST[entries[b][1]][0] - ST[entries[a][1]][0] || a - b);
  const header = {};
  let offset = 0;
  for (const i of order) {
    const [name, code, shape, arr] = entries[i];
    header[name] = { dtype: code, shape, data_offsets: [offset, offset + arr.byteLength] };
    offset += arr.byteLength;
  }
  let head = utf8.encode(JSON.stringify(header));
  const pad = (8 - (head.length % 8)) % 8;
  if (pad) { const h = new Uint8Array(head.length + pad).fill(0x20); h.set(head); head = h; }
  const out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let pos = 8 + head.length;
  for (const i of order) {
    const arr = entries[i][3];
    out.set(new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength), pos);
    pos += arr.byteLength;
  }
  return out;
}

function readSafetensors(buf, expected, where) {
  if (buf.length < 8) throw new WireError(`${where}: safetensors buffer too short`);
  const hlen = Number(new DataView(buf.buffer, buf.byteOffset, 8).getBigUint64(0, true));
  if (hlen > LIMITS.maxMetaBytes || hlen > buf.length - 8) throw new WireError(`${where}: safetensors header too long`);
  let header;
  try { header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(buf.subarray(8, 8 + hlen))); } catch (e) {
    throw new WireError(`${where}: safetensors header is not valid JSON`);
  }
  if (!header || typeof header !== "object" || Array.isArray(header)) throw new WireError(`${where}: bad safetensors header`);
  delete header.__metadata__;
  const names = Object.keys(header);
  if (names.length !== expected.size || names.some((n) => !expected.has(n))) {
    throw new WireError(`${where}: safetensors tensors disagree with the manifest`);
  }
  const data = buf.subarray(8 + hlen);
  const spans = [];
  for (const name of names) {
    const [code, shape] = expected.get(name), info = header[name];
    if (info.dtype !== code || JSON.stringify(info.shape) !== JSON.stringify(shape)) {
      throw new WireError(`${where}: tensor ${name}: safetensors says ${info.dtype} ${JSON.stringify(info.shape)}`);
    }
    const [b, e] = info.data_offsets || [];
    if (!Number.isInteger(b) || !Number.isInteger(e) || b < 0 || e < b || e > data.length ||
        e - b !== ST[code][0] * shape.reduce((x, y) => x * y, 1)) {
      throw new WireError(`${where}: tensor ${name}: bad data_offsets`);
    }
    spans.push([b, e, name]);
  }
  spans.sort((x, y) => x[0] - y[0]);
  let pos = 0;
  const out = new Map();
  for (const [b, e, name] of spans) {
    if (b !== pos) throw new WireError(`${where}: tensor ${name}: data overlaps or leaves a gap`);
    pos = e;
    const [size, T] = ST[expected.get(name)[0]];
    out.set(name, new T(data.slice(b, e).buffer, 0, (e - b) / size));  // a copy, aligned
  }
  if (pos !== data.length) throw new WireError(`${where}: trailing bytes after the tensor data`);
  return out;
}

function decodeTensor(codec, dtypeName, parts) {
  const main = parts.get("");
  if (codec.dtype === "raw") return main;
  if (codec.dtype === "fp32") return main;
  if (codec.dtype === "fp16") return Float32Array.from(main, fromHalf);
  if (codec.dtype === "bf16") return new Float32Array(Uint32Array.from(main, (v) => v << 16).buffer);
  const aff = parts.get(":affine"), c = aff.length / 2, k = main.length / Math.max(c, 1), out = new Float32Array(main.length);
  for (let r = 0; r < c; r++) for (let j = 0; j < k; j++) out[r * k + j] = Math.fround(aff[2 * r + 1] + main[r * k + j] * aff[2 * r]);
  return out;
}

// --- envelope ---------------------------------------------------------------------------------
/**
 * Encode {kind, run, round, sender, meta, tensors: {name: {data: Float32Array, shape}}} with
 * ``codecFor(name)``; ``seq`` (a BigInt) goes into meta as an exact integer. ``digest``:
 * "sha256" or "blake3". ``reserve`` zero bytes follow the envelope (the signature trailer).
 * Returns {data, stats}.
 */
export function encode(msg, { codecFor = () => parseCodec("fp32"), digest = "sha256", seq = null, reserve = 0 } = {}) {
  const entries = [], manifest = [];
  let rawBytes = 0, tensorBytes = 0;
  for (const [name, t] of Object.entries(msg.tensors || {})) {
    const [used, parts] = encodeTensor(t.data, t.shape, codecFor(name));
    for (const [suffix, [code, shape, arr]] of Object.entries(parts)) {
      entries.push([name + suffix, code, shape, arr]);
      tensorBytes += arr.byteLength;
    }
    manifest.push([name, "float32", t.shape, codecString(used), 0]);
    rawBytes += 4 * t.data.length;
  }
  const body = entries.length ? writeSafetensors(entries) : new Uint8Array(0);
  const meta = seq === null ? msg.meta : { ...msg.meta, seq };
  // BigInts (seq, session: ns clocks past 2^53) are written as exact JSON integers
  const json = JSON.stringify({ run: msg.run, round: msg.round, sender: msg.sender, meta,
    sections: entries.length ? [[null, body.length, body.length]] : [], tensors: manifest },
  (k, v) => (typeof v === "bigint" ? `\u0000BIG${v}\u0000` : v)).replace(/"\\u0000BIG(\d+)\\u0000"/g, "$1");
  let header = utf8.encode(json);
  const pad = (8 - ((PREFIX_BYTES + header.length) % 8)) % 8;
  if (pad) { const h = new Uint8Array(header.length + pad).fill(0x20); h.set(header); header = h; }
  const size = PREFIX_BYTES + header.length + body.length;
  const data = new Uint8Array(size + reserve);
  data.set(MAGIC, 0);
  data[4] = 1; data[5] = 0; data[6] = KINDS[msg.kind]; data[7] = digest === "blake3" ? FLAG_BLAKE3 : 0;
  const dv = new DataView(data.buffer);
  dv.setUint32(8, header.length, true);
  dv.setBigUint64(12, BigInt(body.length), true);
  data.set(header, PREFIX_BYTES);
  data.set(body, PREFIX_BYTES + header.length);
  const h = newHash(data[7]);
  h.update(data.subarray(0, 20));
  h.update(data.subarray(PREFIX_BYTES, size));
  data.set(h.digest(), 20);
  return { data, stats: { raw_bytes: rawBytes, tensor_bytes: tensorBytes, payload_bytes: size,
    header_bytes: PREFIX_BYTES + header.length } };
}

/** The header's meta.seq as an exact BigInt (JSON numbers lose digits past 2^53), or null. */
function exactSeq(headerText) {
  const m = /"seq":\s*(\d{1,20})\s*[,}]/.exec(headerText);
  return m ? BigInt(m[1]) : null;
}

/** Decode one envelope (no signature trailer). WireError for anything malformed. */
export function decode(data, { digestChecked = false } = {}) {
  if (data.length > LIMITS.maxMessageBytes) throw new WireError("message too large");
  if (data.length < PREFIX_BYTES) throw new WireError(`message too short (${data.length} bytes)`);
  if (!MAGIC.every((b, i) => data[i] === b)) throw new WireError("bad magic");
  if (data[4] !== 1) throw new WireError(`unsupported wire version ${data[4]}.${data[5]}`);
  const kind = KIND_NAMES[data[6]];
  if (!kind) throw new WireError(`unknown message kind ${data[6]}`);
  const flags = data[7];
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const hlen = dv.getUint32(8, true), blen = Number(dv.getBigUint64(12, true));
  if (hlen > LIMITS.maxMetaBytes) throw new WireError("header too long");
  if (PREFIX_BYTES + hlen + blen !== data.length) throw new WireError("length mismatch");
  const h = newHash(flags);
  if (!digestChecked) {
    h.update(data.subarray(0, 20));
    h.update(data.subarray(PREFIX_BYTES));
    if (!equalBytes(h.digest(), data.subarray(20, 52))) throw new WireError("digest mismatch: message corrupted or tampered with");
  }
  const text = new TextDecoder("utf-8", { fatal: true }).decode(data.subarray(PREFIX_BYTES, PREFIX_BYTES + hlen));
  let header;
  try { header = JSON.parse(text); } catch (e) { throw new WireError("header is not valid JSON"); }
  for (const k of ["run", "sender"]) if (typeof header[k] !== "string" || header[k].length > LIMITS.maxNameLen) throw new WireError(`bad header field ${k}`);
  if (!Number.isInteger(header.round)) throw new WireError("bad header field round");
  if (!header.meta || typeof header.meta !== "object") throw new WireError("header meta must be an object");
  const sections = header.sections, tensors = header.tensors;
  if (!Array.isArray(sections) || sections.length > LIMITS.maxSections) throw new WireError("bad sections");
  if (!Array.isArray(tensors) || tensors.length > LIMITS.maxTensors) throw new WireError("bad tensors");
  let total = 0;
  for (const s of sections) {
    if (!Array.isArray(s) || s.length !== 3 || !Number.isInteger(s[1]) || !Number.isInteger(s[2]) || s[2] < 0) throw new WireError("bad section");
    if (s[0] === null ? s[1] !== s[2] : !(Number.isInteger(s[0]) && s[0] >= 1 && s[0] <= 22)) throw new WireError("bad section");
    if (s[1] > LIMITS.maxDecodedBytes + 8 + LIMITS.maxMetaBytes) throw new WireError("section too large");
    total += s[2];
  }
  if (total !== blen) throw new WireError("sections do not add up to the body");
  const expected = sections.map(() => new Map()), entries = [];
  let decoded = 0;
  const names = new Set();
  for (const e of tensors) {
    if (!Array.isArray(e) || e.length !== 5) throw new WireError("bad tensor entry");
    const [name, dtypeName, shape, codecText, section] = e;
    if (typeof name !== "string" || !name || name.length > LIMITS.maxNameLen || names.has(name)) throw new WireError("bad tensor name");
    names.add(name);
    if (!(dtypeName in TORCH)) throw new WireError(`tensor ${name}: unknown dtype`);
    if (!Array.isArray(shape) || shape.length > LIMITS.maxNdim || !shape.every((d) => Number.isInteger(d) && d >= 0)) throw new WireError(`tensor ${name}: bad shape`);
    const numel = shape.reduce((a, b) => a * b, 1);
    if (numel > LIMITS.maxElements) throw new WireError(`tensor ${name}: too many elements`);
    const codec = parseCodec(codecText);
    if (!Number.isInteger(section) || section < 0 || section >= sections.length || codec.zstd !== sections[section][0]) throw new WireError(`tensor ${name}: bad section`);
    const isFloat = FLOATS.has(dtypeName);
    if (codec.dtype !== "raw" && !isFloat) throw new WireError(`tensor ${name}: codec ${codecText} cannot carry ${dtypeName}`);
    decoded += numel * (isFloat && codec.dtype !== "raw" ? 4 : ST[TORCH[dtypeName]][0]);
    if (decoded > LIMITS.maxDecodedBytes) throw new WireError("tensors decode to too many bytes");
    if (codec.dtype === "raw") expected[section].set(name, [TORCH[dtypeName], shape]);
    else if (codec.dtype === "int8") { expected[section].set(name, ["U8", shape]); expected[section].set(name + ":affine", ["F32", [shape[0], 2]]); }
    else expected[section].set(name, [MAIN_CODE[codec.dtype], shape]);
    entries.push([name, dtypeName, shape, codec, section]);
  }
  const arrays = [];
  let pos = PREFIX_BYTES + hlen;
  sections.forEach(([level, rawLen, stored], i) => {
    let buf = data.subarray(pos, pos + stored);
    pos += stored;
    if (level !== null) {
      const out = new Uint8Array(rawLen);
      let got;
      try { got = zstdDecompress(buf, out); } catch (e) { throw new WireError(`section ${i}: zstd data is corrupt (${e.message})`); }
      if (got.length !== rawLen) throw new WireError(`section ${i}: decompressed to ${got.length} bytes, expected ${rawLen}`);
      buf = got;
    }
    arrays.push(readSafetensors(buf, expected[i], `section ${i}`));
  });
  const out = {};
  for (const [name, dtypeName, shape, codec, section] of entries) {
    const parts = new Map([["", arrays[section].get(name)]]);
    if (codec.dtype === "int8") parts.set(":affine", arrays[section].get(name + ":affine"));
    const t = decodeTensor(codec, dtypeName, parts);
    if (codec.dtype !== "raw" && !t.every(Number.isFinite)) throw new WireError(`tensor ${name}: NaN or Inf`);
    out[name] = { data: t, shape, dtype: codec.dtype === "raw" ? dtypeName : "float32" };
  }
  return { kind, run: header.run, round: header.round, sender: header.sender, meta: header.meta,
    seq: exactSeq(text), tensors: out, flags };
}
