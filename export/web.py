"""``fedpara export RUN --web DIR``: a static page that runs the composed model in a phone's browser.

DIR receives, all in one directory (served by any static web server; nothing is fetched from
elsewhere):

    index.html, page.js, sw.js, style.css   the page (edge_client/web/page/), its service worker
    model.onnx                               the composed model (parity-checked like ``fedpara export``)
    model.json                               spec, classes, input shape, normalisation, samples, files
    samples.f32                              bundled test samples: float32 model inputs, back to back
    vendor/ort.wasm.min.mjs, vendor/ort-wasm-simd-threaded.{mjs,wasm}   onnxruntime-web (wasm build)

The onnxruntime-web files come from ``edge_client/web/node_modules`` (``npm ci`` there, which
``.ci/setup`` runs); this module never needs node. When they are missing the export stops with
:class:`WebAssetsMissing` naming the command that fetches them. ``FEDPARA_WEB_MODULES`` points at
another ``node_modules`` directory. Offline: ``sw.js`` precaches every file listed in
``model.json`` (a cache named by their digest) on the first visit from a secure origin (https or
localhost); docs/mobile.md says which browsers do what.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpara.runtime.webassets import MODULES_ENV, WEB_ROOT, WebAssetsMissing, node_modules, require

__all__ = ["MODULES_ENV", "WebAssetsMissing", "WebReport", "check_assets", "write_web"]

log = logging.getLogger(__name__)

PAGE_DIR = WEB_ROOT / "page"
PAGE_FILES = ("index.html", "page.js", "sw.js", "style.css")
# onnxruntime-web's wasm-only build: the ES module, its loader and the SIMD (+threads) binary
ORT_FILES = ("onnxruntime-web/dist/ort.wasm.min.mjs", "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs",
             "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")
IMAGE_MODELS = {"cnn28", "mlp", "mlp2"}  # 1x28x28 inputs: the page can turn a photo into one
MAX_SAMPLES = 10_000


def check_assets(modules: Path | None = None) -> list[Path]:
    """The onnxruntime-web files the page needs, or WebAssetsMissing saying how to get them."""
    modules = node_modules() if modules is None else modules
    return require([modules / rel for rel in ORT_FILES], "the model page (onnxruntime-web)")


@dataclass
class WebReport:
    """What :func:`write_web` wrote."""
    out: Path
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    samples: int = 0
    python_correct: int | None = None  # onnxruntime (Python) on the bundled samples

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_web(onnx_path: Path, spec, out: str | os.PathLike, *, samples: tuple | None = None,
              info: dict | None = None, title: str | None = None) -> WebReport:
    """Write the page for an exported ``onnx_path`` into ``out``.

    samples  (x float32 (N, ...) model inputs, y int (N,)) bundled for ``?selftest``; None: none
    """
    if spec.model == "char_lstm":
        raise ValueError("--web: the page classifies images; char_lstm takes character ids")
    out = Path(out)
    assets = check_assets()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vendor").mkdir(exist_ok=True)
    for name in PAGE_FILES:
        shutil.copyfile(PAGE_DIR / name, out / name)
    for src in assets:
        shutil.copyfile(src, out / "vendor" / src.name)
    if onnx_path.resolve() != (out / "model.onnx").resolve():
        shutil.copyfile(onnx_path, out / "model.onnx")
    report = WebReport(out)
    sample_meta = None
    if samples is not None:
        x, y = (np.asarray(a) for a in samples)
        if len(x) > MAX_SAMPLES:
            raise ValueError(f"--web-samples: at most {MAX_SAMPLES} samples, got {len(x)}")
        x = np.ascontiguousarray(x, dtype="<f4")
        (out / "samples.f32").write_bytes(x.tobytes())
        sample_meta = {"file": "samples.f32", "count": int(len(x)), "shape": list(x.shape[1:]),
                       "labels": [int(v) for v in y]}
        report.samples = int(len(x))
        from export import OnnxModel
        logits = OnnxModel(out / "model.onnx").predict_all(x)
        report.python_correct = int((logits.argmax(1) == np.asarray(y)).sum())
    from fedpara.data.fashion_mnist import CLASSES, MEAN, STD
    from fedpara.models import INPUT_SHAPES
    image = spec.model in IMAGE_MODELS
    meta = {
        "format": "fedpara-web/1",
        "title": title or f"{spec.model} ({spec.scheme}, ratio {spec.ratio})",
        "spec": spec.to_dict(),
        "input_shape": list(INPUT_SHAPES[spec.model]),
        "classes": list(CLASSES) if image and spec.num_classes == len(CLASSES)
        else [str(i) for i in range(spec.num_classes)],
        # how the page turns a photo into an input (Fashion-MNIST's: light object on black, 28x28)
        "camera": {"size": 28, "mean": MEAN, "std": STD} if image else None,
        "round": (info or {}).get("round"),
        "accuracy": (info or {}).get("accuracy"),
        "samples": sample_meta,
        "python_correct": report.python_correct,
    }
    files = sorted([*PAGE_FILES, "model.onnx", *(f"vendor/{src.name}" for src in assets),
                    *(["samples.f32"] if sample_meta else [])])
    meta["files"] = {name: _digest(out / name) for name in files}
    # the service worker's cache is named by this digest: a new export replaces the old cache
    meta["version"] = hashlib.sha256(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()[:16]
    (out / "model.json").write_text(json.dumps(meta, indent=1, default=str))
    report.files = {name: (out / name).stat().st_size for name in files + ["model.json"]}
    log.info("web page %s: %d files, %.1f MB, %d samples", out, len(report.files),
             report.total_bytes / 1e6, report.samples)
    return report
