"""Stage the browser client: one directory with its pages, its ES modules and the npm packages it
imports (resolved by the import map in each page), served as static files.

    OUT/app.html, app.js, style.css           the client page (edge_client/web/app/)
    OUT/client/*.js                            the protocol, wire format, models and training
    OUT/vendor/...                             TensorFlow.js, mqtt.js, fzstd, @noble/ed25519, @noble/hashes

The npm packages come from ``edge_client/web/node_modules`` (``npm ci`` there; ``.ci/setup`` runs
it) or ``$FEDPARA_WEB_MODULES``; :class:`fedpara.runtime.webassets.WebAssetsMissing` names the fix when absent.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from fedpara.runtime.webassets import WEB_ROOT, node_modules, require

# npm package file -> where the import map expects it under vendor/
VENDOR = {
    "@tensorflow/tfjs/dist/tf.fesm.min.js": "tf.fesm.min.js",
    "mqtt/dist/mqtt.esm.js": "mqtt.esm.js",
    "fzstd/esm/index.mjs": "fzstd.mjs",
    "@noble/ed25519/index.js": "noble-ed25519.js",
    "qrcode-generator/dist/qrcode.mjs": "qrcode.mjs",  # the operator's QR code of an enrolment link
    # TensorFlow.js's WebAssembly backend (XNNPACK): its ES module and its three binaries
    "@tensorflow/tfjs-backend-wasm/dist/tf-backend-wasm.fesm.min.js": "tf-backend-wasm.fesm.min.js",
    "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm": "tfjs-backend-wasm.wasm",
    "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm": "tfjs-backend-wasm-simd.wasm",
    "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm": "tfjs-backend-wasm-threaded-simd.wasm",
}
# the wasm backend's ES module imports node's fs/path/os/perf_hooks (used under node only): the
# import map points them at an empty module
NODE_STUB = "export default {};\n"
VENDOR_DIRS = {"@noble/hashes": "noble-hashes"}  # every .js file of the package (relative imports)


def vendor_files(modules: Path | None = None) -> dict[Path, str]:
    """{source file: path under vendor/}, or WebAssetsMissing naming the fix."""
    modules = node_modules() if modules is None else modules
    out = {modules / src: dst for src, dst in VENDOR.items()}
    for src, dst in VENDOR_DIRS.items():
        out.update({p: f"{dst}/{p.name}" for p in sorted((modules / src).glob("*.js"))})
    if not any(dst.startswith("noble-hashes/") for dst in out.values()):
        out[modules / "@noble/hashes/sha2.js"] = "noble-hashes/sha2.js"  # (absent: named as missing)
    require(list(out), "the browser client")
    return out


def stage_client(out: str | Path) -> Path:
    """Copy the client page, its modules and the vendored npm files into ``out``; returns ``out``."""
    out = Path(out)
    files = vendor_files()
    (out / "client").mkdir(parents=True, exist_ok=True)
    for p in sorted((WEB_ROOT / "app").iterdir()):
        if p.is_file():
            shutil.copyfile(p, out / p.name)
    for p in sorted((WEB_ROOT / "client").glob("*.js")):
        shutil.copyfile(p, out / "client" / p.name)
    for src, dst in files.items():
        (out / "vendor" / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / "vendor" / dst)
    (out / "vendor" / "node-stub.js").write_text(NODE_STUB)
    return out
