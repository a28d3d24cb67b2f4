// Signed envelopes (docs/wire.md 3a, fedpara/runtime/signing.py): envelope | "FPSG" | Ed25519
// signature over a context + the envelope's digest; meta.seq is the sender's clock in ns,
// strictly increasing, and a receiver accepts a sender's message only when it is fresh and newer.
import { AuthError, concat, equalBytes, utf8 } from "./hash.js";
import { encode, decode, PREFIX_BYTES } from "./wire.js";

const TRAILER_MAGIC = utf8.encode("FPSG");
const TRAILER_BYTES = 68;
const CONTEXT = utf8.encode("fedpara/v1 signature\0");
const CONTEXT_BLAKE3 = utf8.encode("fedpara/v1 signature blake3\0");

function signedBytes(envelope) {
  return concat(envelope[7] & 1 ? CONTEXT_BLAKE3 : CONTEXT, envelope.subarray(20, 52));
}

let lastNs = 0n;
/** This device's clock in ns (Date.now() has ms; the sub-ms part comes from performance.now()). */
export function nowNs() {
  const ns = BigInt(Date.now()) * 1_000_000n + BigInt(Math.floor((performance.now() % 1) * 1e6));
  lastNs = ns > lastNs ? ns : lastNs + 1n;
  return lastNs;
}

export class Signer {
  constructor(signer, sender) { this.signer = signer; this.sender = sender; this.seq = 0n; this.signed = true; }

  nextSeq() { const n = nowNs(); this.seq = n > this.seq ? n : this.seq + 1n; return this.seq; }

  /** {data, stats, chunkSign}: the signed message and the signer of its frames' headers. */
  async seal(msg, { codecFor, digest = "sha256", seq = null } = {}) {
    if (msg.sender !== this.sender) throw new Error(`signer of ${this.sender} cannot sign for ${msg.sender}`);
    const s = seq === null ? this.nextSeq() : seq;
    const enc = encode(msg, { codecFor, digest, seq: s, reserve: TRAILER_BYTES });
    const env = enc.data.subarray(0, enc.data.length - TRAILER_BYTES);
    const sig = await this.signer.sign(signedBytes(env));
    enc.data.set(TRAILER_MAGIC, env.length);
    enc.data.set(sig, env.length + 4);
    return { ...enc, chunkSign: (bytes) => this.signer.sign(bytes) };
  }
}

export class Plain {  // --insecure: unsigned envelopes, no checks (the page says what this gives up)
  constructor(sender = "") { this.sender = sender; this.signed = false; }
  nextSeq() { return 0n; }
  async seal(msg, { codecFor, digest = "sha256" } = {}) { return { ...encode(msg, { codecFor, digest }), chunkSign: null }; }
  async open(data, { digestChecked = false } = {}) { return decode(data, { digestChecked }); }
  async authenticateChunk() { return true; }
}

export class Verifier {
  /** keys: {sender: verifier}; maxAgeS bounds how far a seq may be from our clock. */
  constructor(keys, { maxAgeS = 600 } = {}) { this.keys = keys; this.maxAgeNs = BigInt(Math.round(maxAgeS * 1e9)); this.last = new Map(); this.signed = true; }

  async open(data, { sender, ordered = true, digestChecked = false } = {}) {
    if (data.length < PREFIX_BYTES + TRAILER_BYTES || !equalBytes(data.subarray(data.length - 68, data.length - 64), TRAILER_MAGIC)) {
      throw new AuthError("unsigned", `no signature trailer on a message from ${sender}`);
    }
    const key = this.keys[sender];
    if (!key) throw new AuthError("unknown_sender", `no trusted key for ${sender}`);
    const env = data.subarray(0, data.length - TRAILER_BYTES);
    if (!(await key.verify(data.subarray(data.length - 64), signedBytes(env)))) {
      throw new AuthError("bad_signature", `signature of ${sender} does not verify`);
    }
    return this.admit(decode(env, { digestChecked }), { sender, ordered });
  }

  admit(msg, { sender, ordered = true }) {
    if (msg.sender !== sender) throw new AuthError("bad_signature", `${sender} signed a message naming ${msg.sender}`);
    if (msg.seq === null) throw new AuthError("bad_signature", "signed message without an int seq");
    if (!ordered) return msg;
    const now = nowNs(), age = now - msg.seq;
    if (age > this.maxAgeNs || -age > this.maxAgeNs) throw new AuthError("stale", `${sender}'s message is ${Number(age) / 1e9} s old (clocks: NTP?)`);
    const slot = `${sender}/${msg.kind}`;
    if (msg.seq <= (this.last.get(slot) ?? 0n)) throw new AuthError("replayed", `${msg.kind} seq of ${sender} is not newer than the last accepted`);
    this.last.set(slot, msg.seq);
    return msg;
  }

  fresh(seq) { const d = nowNs() - seq; return d <= this.maxAgeNs && -d <= this.maxAgeNs; }

  /** For Reassembler: a frame's signed header verifies with the sender's key and is fresh. */
  chunkAuthenticator(sender, signedBytesOf) {
    const key = this.keys[sender];
    return async (c) => {
      if (!key || !this.fresh(c.signedNs)) return false;
      return key.verify(c.signature, signedBytesOf(c.mid, c.count, c.total, c.digest, c.signedNs));
    };
  }
}
