// Digests and signatures for the wire format (docs/wire.md 3a, 3b): SHA-256 and BLAKE3 from
// @noble/hashes, Ed25519 from WebCrypto where the browser has it, else from @noble/ed25519.
import { sha256, sha512 } from "@noble/hashes/sha2.js";
import { blake3 } from "@noble/hashes/blake3.js";
import * as ed from "@noble/ed25519";

ed.hashes.sha512 = sha512;

export const DIGESTS = ["sha256", "blake3"];
export const FLAG_BLAKE3 = 0x01;

export function newHash(flags) {
  if (flags & ~FLAG_BLAKE3) throw new WireError(`unknown envelope flags 0x${flags.toString(16)}`);
  return flags & FLAG_BLAKE3 ? blake3.create() : sha256.create();
}

export class WireError extends Error {
  constructor(msg) { super(msg); this.name = "WireError"; }
}

export class AuthError extends Error {
  constructor(reason, detail) { super(`${reason}: ${detail}`); this.name = "AuthError"; this.reason = reason; }
}

export function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

export function concat(...parts) {
  const n = parts.reduce((s, p) => s + p.length, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { out.set(p, o); o += p.length; }
  return out;
}

export const utf8 = new TextEncoder();

// --- keys: the operator's PEM files (fedpara keys new), or raw 32-byte keys --------------------
const PKCS8_PREFIX = Uint8Array.from([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70,
  0x04, 0x22, 0x04, 0x20]);
const SPKI_PREFIX = Uint8Array.from([0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00]);

export function b64decode(text) {
  const s = atob(text.replace(/-/g, "+").replace(/_/g, "/").replace(/\s+/g, ""));
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

export function b64encode(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function pemBody(pem, label) {
  const m = new RegExp(`-----BEGIN ${label}-----([^-]+)-----END ${label}-----`).exec(pem);
  if (!m) throw new Error(`not a PEM ${label.toLowerCase()}`);
  return b64decode(m[1]);
}

/** The 32-byte Ed25519 seed of a PKCS#8 PEM private key (what `fedpara keys new` writes). */
export function seedFromPem(pem) {
  const der = pemBody(pem, "PRIVATE KEY");
  if (der.length !== 48 || !equalBytes(der.subarray(0, 16), PKCS8_PREFIX)) throw new Error("not an Ed25519 private key");
  return der.slice(16);
}

/** The 32 raw bytes of an SPKI PEM Ed25519 public key (a `.pub` file). */
export function publicFromPem(pem) {
  const der = pemBody(pem, "PUBLIC KEY");
  if (der.length !== 44 || !equalBytes(der.subarray(0, 12), SPKI_PREFIX)) throw new Error("not an Ed25519 public key");
  return der.slice(12);
}

let webCryptoEd25519;  // probed once: Chrome 137+, Firefox 129+, Safari 17+ have it
export async function hasWebCryptoEd25519() {
  if (webCryptoEd25519 !== undefined) return webCryptoEd25519;
  try {
    const k = await crypto.subtle.importKey("raw", new Uint8Array(32).fill(1), { name: "Ed25519" }, false, ["verify"]);
    webCryptoEd25519 = !!k;
  } catch (e) {
    webCryptoEd25519 = false;
  }
  return webCryptoEd25519;
}

/** An Ed25519 signer of a 32-byte seed: WebCrypto (the key not extractable) or @noble/ed25519. */
export async function makeSigner(seed, { prefer = "auto" } = {}) {
  const pub = ed.getPublicKey(seed);
  if (prefer !== "noble" && crypto.subtle && await hasWebCryptoEd25519()) {
    const key = await crypto.subtle.importKey("pkcs8", concat(PKCS8_PREFIX, seed), { name: "Ed25519" }, false, ["sign"]);
    return { publicKey: pub, impl: "webcrypto",
      sign: async (msg) => new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key, msg)) };
  }
  return { publicKey: pub, impl: "noble", sign: async (msg) => ed.sign(msg, seed) };
}

/** An Ed25519 verifier of a 32-byte public key. */
export async function makeVerifier(pub, { prefer = "auto" } = {}) {
  if (prefer !== "noble" && crypto.subtle && await hasWebCryptoEd25519()) {
    const key = await crypto.subtle.importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]);
    return { impl: "webcrypto", verify: async (sig, msg) => crypto.subtle.verify({ name: "Ed25519" }, key, sig, msg) };
  }
  return { impl: "noble", verify: async (sig, msg) => { try { return ed.verify(sig, msg, pub); } catch (e) { return false; } } };
}
