"""The browser client's wire format against the Python one, in a real headless chromium: envelopes
(every codec, zstd, SHA-256 and BLAKE3), chunk frames (versions 2 and 3), Ed25519 signatures made
by the operator's PEM keys, both directions, and the refusals (tampered, forged, replayed)."""
from __future__ import annotations

import base64
import json

import pytest
import torch
from web_support import harness_page

from fedpara.runtime.signing import Signer, Verifier, load_private_key, load_public_key, new_key
from fedpara.wire import Message, Reassembler, decode, encode, framed_bytes

b64 = lambda b: base64.b64encode(bytes(b)).decode()  # noqa: E731
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with harness_page(tmp_path_factory.mktemp("webwire")) as driver:
        yield driver


def js(driver, body: str, *args):
    """Run ``body`` (an async function body with ``args`` and the modules w, c, h, s) in the page."""
    script = ("const done = arguments[arguments.length - 1]; const args = Array.from(arguments).slice(0, -1);"
              "Promise.all(['wire', 'chunks', 'hash', 'seal'].map(n => import(`./client/${n}.js`)))"
              ".then(async ([w, c, h, s]) => { " + body + " })"
              ".then(r => done({ok: r}), e => done({error: String(e && e.stack || e)}));")
    out = driver.execute_async_script(script, *args)
    assert "error" not in out, out.get("error")
    return out["ok"]


TENSORS = {"l.x1": torch.randn(8, 3), "l.y1": torch.randn(40, 3), "l.t1": torch.randn(3, 3, 3, 3),
           "l.bias": torch.randn(8), "big": torch.randn(4, 64) * 3}

DECODE = """const m = w.decode(h.b64decode(args[0]));
  return {kind: m.kind, run: m.run, round: m.round, sender: m.sender, meta: m.meta, seq: m.seq === null ? null : m.seq.toString(),
          tensors: Object.fromEntries(Object.entries(m.tensors).map(([k, t]) => [k, {shape: t.shape, data: Array.from(t.data)}]))};"""


@pytest.mark.parametrize("policy, digest", [("fp32", "sha256"), ("fp16+zstd:3", "blake3"), ("bf16", "sha256"),
                                            ("int8+zstd:1; *.bias=fp32", "sha256"), ("fp16; l.*=fp32", "blake3")])
def test_browser_decodes_python_envelopes(page, policy, digest):
    data = encode(Message("task", "run-1", 3, "coordinator", TENSORS, {"task_id": "t-1", "x": [1, 2]}),
                  policy, digest=digest).data
    got = js(page, DECODE, b64(data))
    ref = decode(bytes(data))
    assert (got["kind"], got["run"], got["round"], got["sender"]) == ("task", "run-1", 3, "coordinator")
    assert got["meta"] == {"task_id": "t-1", "x": [1, 2]}
    for name, t in ref.tensors.items():  # the same float32 values as Python's decoder, bit for bit
        assert got["tensors"][name]["shape"] == list(t.shape)
        assert torch.equal(torch.tensor(got["tensors"][name]["data"], dtype=torch.float32), t.flatten()), name


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
def test_python_decodes_browser_envelopes(page, codec):
    tensors = {k: v.flatten().tolist() for k, v in TENSORS.items()}
    shapes = {k: list(v.shape) for k, v in TENSORS.items()}
    data = js(page, """const tensors = {};
      for (const [k, v] of Object.entries(args[0])) tensors[k] = {data: Float32Array.from(v), shape: args[1][k]};
      const enc = w.encode({kind: 'update', run: 'run-1', round: 4, sender: 'phone-1', meta: {num_examples: 7}, tensors},
                           {codecFor: () => w.parseCodec(args[2]), seq: 1234567890123456789n});
      return h.b64encode(enc.data);""", tensors, shapes, codec)
    msg = decode(base64.b64decode(data))
    assert msg.meta == {"num_examples": 7, "seq": 1234567890123456789}  # the ns seq, exact past 2^53
    ref = decode(bytes(encode(Message("update", "run-1", 4, "phone-1", TENSORS, {}), codec).data))
    for name, t in ref.tensors.items():  # encoded as torch encodes it (round to nearest even)
        assert torch.equal(msg.tensors[name], t), name


def test_signed_chunked_both_ways(page, tmp_path):
    new_key("coordinator", tmp_path)
    new_key("phone-1", tmp_path)
    coord = Signer(load_private_key(tmp_path / "coordinator.key"), "coordinator")
    enc = coord.seal(Message("task", "run-1", 2, "coordinator", TENSORS, {"task_id": "t-2"}), "fp16+zstd:3")
    topic = "fedpara/v1/run-1/task"
    frames, stats = enc.split(600, topic)  # small packets: several frames, version 3
    assert len(frames) > 1 and frames[0][4] == 3
    keys = {n: (tmp_path / f"{n}.{ext}").read_text() for n, ext in (("coordinator", "pub"), ("phone-1", "key"))}
    out = js(page, """
      const coordPub = h.publicFromPem(args[0]);
      const v = new s.Verifier({coordinator: await h.makeVerifier(coordPub)});
      const r = new c.Reassembler({authenticate: v.chunkAuthenticator('coordinator', c.chunkSignedBytes)});
      let data = null;
      for (const f of args[2].slice().reverse()) data = (await r.add(h.b64decode(f))) || data;  // out of order
      const m = await v.open(data, {sender: 'coordinator', digestChecked: true});
      let replay = '';
      try { await v.open(data, {sender: 'coordinator'}); } catch (e) { replay = e.reason; }
      const bad = [];
      for (const at of [25, data.length - 100]) {  // in the signed digest; in the body (the digest catches it)
        const tampered = data.slice(); tampered[at] ^= 1;
        try { await v.open(tampered, {sender: 'coordinator'}); bad.push('accepted'); } catch (e) { bad.push(e.reason || e.name); }
      }
      const signer = new s.Signer(await h.makeSigner(h.seedFromPem(args[1])), 'phone-1');
      const up = await signer.seal({kind: 'update', run: 'run-1', round: 2, sender: 'phone-1', meta: {task_id: 't-2', num_examples: 5},
                                    tensors: {w: {data: m.tensors['l.x1'].data, shape: m.tensors['l.x1'].shape}}},
                                   {codecFor: () => w.parseCodec('fp16'), digest: 'blake3'});
      const frames = await c.split(up.data, 300, 'fedpara/v1/run-1/update/phone-1', {sign: up.chunkSign, nowNs: s.nowNs});
      return {task_id: m.meta.task_id, replay, bad, impl: signer.signer.impl, frames: frames.map(h.b64encode),
              framed: c.framedBytes(frames.map(f => f.length), 'fedpara/v1/run-1/update/phone-1')};
    """, keys["coordinator"], keys["phone-1"], [b64(f) for f in frames])
    assert out["task_id"] == "t-2" and out["replay"] == "replayed" and out["bad"] == ["bad_signature", "WireError"]
    verifier = Verifier({"phone-1": load_public_key(tmp_path / "phone-1.pub")})
    reasm = Reassembler(authenticate=verifier.chunk_authenticator("phone-1"))
    got = [reasm.add(base64.b64decode(f)) for f in out["frames"]]
    data = got[-1]
    assert data is not None and reasm.checked(data) and len(out["frames"]) > 1
    msg = verifier.open(data, sender="phone-1", digest_checked=True)
    assert msg.meta["task_id"] == "t-2" and msg.tensors["w"].shape == (8, 3)
    assert torch.allclose(msg.tensors["w"], TENSORS["l.x1"], rtol=1e-3, atol=1e-3)
    assert out["framed"] == framed_bytes([len(base64.b64decode(f)) for f in out["frames"]],
                                         "fedpara/v1/run-1/update/phone-1")
    json.dumps(out)  # plain data came back


def test_noble_and_webcrypto_signatures_agree(page, tmp_path):
    new_key("phone-2", tmp_path)
    pem = (tmp_path / "phone-2.key").read_text()
    out = js(page, """const seed = h.seedFromPem(args[0]); const msg = h.utf8.encode('fedpara');
      const a = await h.makeSigner(seed, {prefer: 'noble'}), b = await h.makeSigner(seed);
      const sa = await a.sign(msg), sb = await b.sign(msg);
      const v = await h.makeVerifier(a.publicKey, {prefer: 'noble'});
      return {same: h.equalBytes(sa, sb), ok: await v.verify(sb, msg), webcrypto: await h.hasWebCryptoEd25519(), b: b.impl};""", pem)
    assert out["same"] and out["ok"]  # Ed25519 is deterministic: both libraries give the same bytes
    assert out["b"] == ("webcrypto" if out["webcrypto"] else "noble")


def test_own_labelled_pictures_are_kept_and_normalised(page):
    """A phone's own picture: centre-cropped to 28x28, inverted when its border is lighter (a dark
    object on a light background, as photos are), normalised, kept in IndexedDB across reloads."""
    out = page.execute_async_script("""const done = arguments[arguments.length - 1];
      import('./client/data.js').then(async (d) => {
        await d.clearOwnImages();
        const c = new OffscreenCanvas(100, 60), ctx = c.getContext('2d');
        ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, 100, 60); ctx.fillStyle = '#000'; ctx.fillRect(40, 20, 20, 20);
        const x = d.photoToInput(await createImageBitmap(c));
        await d.addOwnImage(x, 7);
        const back = await d.ownImages();
        return {n: back.y.length, label: back.y[0], corner: back.x[0], middle: back.x[14 * 28 + 14], len: x.length};
      }).then(done, e => done({error: String(e)}));""")
    assert "error" not in out, out
    assert out["n"] == 1 and out["label"] == 7 and out["len"] == 784
    # inverted: the light border becomes black (pixel 0), the dark square light (pixel 1)
    assert out["corner"] == pytest.approx((0 - 0.2860) / 0.3530, abs=1e-3)
    assert out["middle"] == pytest.approx((1 - 0.2860) / 0.3530, abs=1e-3)
    page.refresh()
    n = page.execute_async_script("""const done = arguments[arguments.length - 1];
      import('./client/data.js').then(d => d.ownImages()).then(r => done(r.y.length));""")
    assert n == 1
