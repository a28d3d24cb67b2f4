// Chunk frames (docs/wire.md 4): version 2 (an envelope's own digest) and version 3 (its header
// signed by the sender), split canonically, and reassembled with the checks chunking.py makes.
import { WireError, AuthError, concat, equalBytes, newHash, utf8 } from "./hash.js";

export const CHUNK_HEADER_BYTES = 70;
export const CHUNK_AUTH_BYTES = 72;
const MAGIC = [0x46, 0x50, 0x57, 0x43]; // "FPWC"
const CONTEXT = utf8.encode("fedpara/v1 chunk\0");

function varintLen(n) { let k = 1; while (n >= 128) { n = Math.floor(n / 128); k++; } return k; }

/** Bytes of one MQTT 3.1.1 PUBLISH packet (fixed header, topic, packet id, payload). */
export function mqttPublishBytes(topic, payloadLen, qos = 1) {
  const r = 2 + utf8.encode(topic).length + (qos > 0 ? 2 : 0) + payloadLen;
  return 1 + varintLen(r) + r;
}

export function framedBytes(lengths, topic, qos = 1) {
  return lengths.reduce((s, n) => s + mqttPublishBytes(topic, n, qos), 0);
}

function piece(total, count, index) {
  const per = Math.ceil(total / count), start = index * per;
  return [start, Math.min(total, start + per) - start];
}

function header(version, mid, index, count, total, digest) {
  const h = new Uint8Array(CHUNK_HEADER_BYTES), dv = new DataView(h.buffer);
  h.set(MAGIC, 0); h[4] = version; h[5] = 0; h.set(mid, 6);
  dv.setUint32(22, index, true); dv.setUint32(26, count, true); dv.setBigUint64(30, BigInt(total), true);
  h.set(digest, 38);
  return h;
}

function signedBytes(mid, count, total, digest, signedNs) {
  const ns = new Uint8Array(8);
  new DataView(ns.buffer).setBigUint64(0, signedNs, true);
  return concat(CONTEXT, header(3, mid, 0, count, total, digest).subarray(6), ns);
}

/** Frames of an envelope for ``topic`` so every PUBLISH is at most ``maxPacket`` bytes; with
 *  ``sign`` (bytes -> Promise<64-byte signature>) and ``nowNs`` the frames are version 3. */
export async function split(data, maxPacket, topic, { sign = null, nowNs = null } = {}) {
  const head = CHUNK_HEADER_BYTES + (sign ? CHUNK_AUTH_BYTES : 0);
  let per = maxPacket - mqttPublishBytes(topic, head);
  while (per > 0 && mqttPublishBytes(topic, head + per) > maxPacket) per--;
  if (per <= 0) throw new Error(`max_packet ${maxPacket} leaves no room for payload on ${topic}`);
  const total = data.length, count = Math.max(1, Math.ceil(total / per));
  const mid = crypto.getRandomValues(new Uint8Array(16));
  const digest = data.subarray(20, 52);
  let auth = new Uint8Array(0), version = 2;
  if (sign) {
    version = 3;
    const ns = nowNs();
    const sig = await sign(signedBytes(mid, count, total, digest, ns));
    auth = new Uint8Array(CHUNK_AUTH_BYTES);
    new DataView(auth.buffer).setBigUint64(0, ns, true);
    auth.set(sig, 8);
  }
  const frames = [];
  for (let i = 0; i < count; i++) {
    const [start, len] = piece(total, count, i);
    frames.push(concat(header(version, mid, i, count, total, digest), auth, data.subarray(start, start + len)));
  }
  return frames;
}

export function parseChunk(frame, maxMessageBytes) {
  if (frame.length < CHUNK_HEADER_BYTES) throw new WireError(`chunk frame too short (${frame.length} bytes)`);
  if (!MAGIC.every((b, i) => frame[i] === b)) throw new WireError("bad chunk magic");
  const version = frame[4];
  if (![2, 3].includes(version) || frame[5]) throw new WireError(`unsupported chunk version ${version}`);
  const dv = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  const index = dv.getUint32(22, true), count = dv.getUint32(26, true), total = Number(dv.getBigUint64(30, true));
  if (total > maxMessageBytes) throw new WireError(`chunked message declares ${total} bytes, the limit is ${maxMessageBytes}`);
  if (count < 1 || index >= count) throw new WireError(`bad chunk index ${index} / count ${count}`);
  if (piece(total, count, count - 1)[1] <= 0) throw new WireError(`chunk count ${count} impossible for ${total} bytes`);
  let head = CHUNK_HEADER_BYTES, signedNs = 0n, signature = null;
  if (version === 3) {
    head += CHUNK_AUTH_BYTES;
    if (frame.length < head) throw new WireError("signed chunk frame too short");
    signedNs = dv.getBigUint64(70, true);
    signature = frame.slice(78, 142);
  }
  const [, len] = piece(total, count, index);
  if (frame.length - head !== len) throw new WireError(`chunk ${index}/${count}: payload is ${frame.length - head} bytes, expected ${len}`);
  const mid = frame.slice(6, 22);
  return { mid, key: Array.from(mid, (b) => b.toString(16).padStart(2, "0")).join(""), index, count, total, version,
    digest: frame.slice(38, 70), signedNs, signature, payload: frame.subarray(head) };
}

/**
 * Puts messages back together. ``authenticate(chunk) -> Promise<bool>`` (signed runs): a frame
 * takes a slot only when its message's signed header verifies (checked once per message id).
 * ``add(frame)`` resolves to the whole envelope once (digest verified), else null.
 */
export class Reassembler {
  constructor({ timeoutMs = 300_000, maxPartialBytes = 64 * 2 ** 20, maxMessages = 16, authenticate = null } = {}) {
    Object.assign(this, { timeoutMs, maxPartialBytes, maxMessages, authenticate });
    this.partial = new Map();
    this.done = new Map();  // completed ids -> time (QoS 1 redeliveries are dropped)
    this.counters = { completed: 0, duplicates: 0, expired: 0, evicted: 0, unauthenticated: 0 };
  }

  async add(frame) {
    const c = parseChunk(frame, this.maxPartialBytes);
    const now = Date.now();
    for (const [k, p] of this.partial) if (now - p.seen > this.timeoutMs) { this.partial.delete(k); this.counters.expired++; }
    for (const [k, t] of this.done) if (now - t > this.timeoutMs) this.done.delete(k);
    if (this.done.has(c.key)) { this.counters.duplicates++; return null; }
    let p = this.partial.get(c.key);
    if (!p) {
      if (this.authenticate) {
        if (c.version !== 3 || !(await this.authenticate(c))) {
          this.counters.unauthenticated++;
          throw new AuthError("unauthenticated", "chunk without a valid signed header");
        }
      }
      p = { count: c.count, total: c.total, digest: c.digest, sig: c.signature, buf: new Uint8Array(c.total), have: new Set(), seen: now };
      this.partial.set(c.key, p);
      while (this.partial.size > this.maxMessages) { this.partial.delete(this.partial.keys().next().value); this.counters.evicted++; }
    } else if (p.count !== c.count || p.total !== c.total || !equalBytes(p.digest, c.digest) ||
               (p.sig && !(c.signature && equalBytes(p.sig, c.signature)))) {
      throw new WireError("chunk disagrees with earlier frames of its message");
    }
    p.seen = now;
    if (p.have.has(c.index)) { this.counters.duplicates++; return null; }
    p.buf.set(c.payload, piece(c.total, c.count, c.index)[0]);
    p.have.add(c.index);
    if (p.have.size < p.count) return null;
    this.partial.delete(c.key);
    this.done.set(c.key, now);
    const data = p.buf;
    if (data.length < 52) throw new WireError("chunked message too short for an envelope");
    const dv = new DataView(data.buffer);
    const envLen = 52 + dv.getUint32(8, true) + Number(dv.getBigUint64(12, true));
    if (envLen > data.length) throw new WireError("envelope longer than its message");
    const h = newHash(data[7]);
    h.update(data.subarray(0, 20));
    h.update(data.subarray(52, envLen));
    if (!equalBytes(h.digest(), p.digest) || !equalBytes(p.digest, data.subarray(20, 52))) {
      throw new WireError("digest mismatch: message corrupted or tampered with");
    }
    this.counters.completed++;
    return data;
  }
}

export { signedBytes as chunkSignedBytes };
