"""Run an exported model with onnxruntime: providers, batched prediction, accuracy, latency.

``OnnxModel(path, provider="cpu", threads=1)`` wraps one ``InferenceSession``. A provider that this
onnxruntime build does not have (``cuda`` / ``tensorrt`` need the ``onnxruntime-gpu`` wheel and
NVIDIA's libraries) raises :class:`ProviderUnavailable`, a ``ValueError`` whose message says what
is available and what to install -- never a silent fall-back to the CPU.

Needs only numpy and onnxruntime (no torch): this is what runs on a device with the ``infer``
install profile. (Named for what it holds; ``fedpara.runtime`` is the federated runtime.)
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

PREFIX = "fedpara."  # ONNX metadata keys written at export (see export.onnx_export)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
# what each choice runs on, most preferred first (nodes a provider cannot run fall back to the next)
PROVIDER_CHAIN = {"cpu": ["CPUExecutionProvider"],
                  "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                  "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64,
                "tensor(int32)": np.int32, "tensor(float16)": np.float16}


class ProviderUnavailable(ValueError):
    """The requested execution provider is not in this onnxruntime build."""


def check_provider(provider: str) -> list[str]:
    """onnxruntime provider names for ``provider`` (cpu|cuda|tensorrt), or ProviderUnavailable."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        have = ", ".join(k for k, v in PROVIDERS.items() if v in available) or "none"
        raise ProviderUnavailable(
            f"provider {provider!r} ({PROVIDERS[provider]}) is not available in this onnxruntime "
            f"{ort.__version__} build (available here: {have}); install onnxruntime-gpu with a "
            "matching CUDA" + (" and TensorRT" if provider == "tensorrt" else "") + " to use it")
    return [p for p in PROVIDER_CHAIN[provider] if p in available]


class OnnxModel:
    """An exported model in onnxruntime; ``predict(x) -> logits`` (numpy), ``metadata`` (dict)."""

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", threads: int = 1) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0: onnxruntime's default), got {threads!r}")
        providers = check_provider(provider)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"onnxruntime cannot load {path}: {exc}") from None
        if self.session.get_providers()[0] != providers[0]:
            raise ProviderUnavailable(f"provider {provider!r} failed to initialise for {path} "
                                      f"(onnxruntime fell back to {self.session.get_providers()}); "
                                      "check the CUDA/TensorRT libraries")
        self.path, self.provider, self.threads = path, provider, threads
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        self.input_dtype = _NUMPY_TYPES.get(inp.type, np.float32)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k[len(PREFIX):]: v for k, v in meta.items() if k.startswith(PREFIX)}

    @property
    def spec(self):
        """The ModelSpec recorded at export, if any (needs the ``fedpara`` package, hence torch)."""
        from fedpara.models import ModelSpec
        return ModelSpec.from_dict(json.loads(self.metadata["spec"])) if "spec" in self.metadata else None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for one batch (the batch dimension is dynamic)."""
        x = np.ascontiguousarray(np.asarray(x), dtype=self.input_dtype)
        return self.session.run(None, {self.input_name: x})[0]

    def predict_all(self, x: np.ndarray, batch_size: int = 256, transform=None) -> np.ndarray:
        """Logits for a whole array, in batches; ``transform(batch)`` (e.g. uint8 pixels -> float32
        normalised) is applied to each batch, so only one converted batch exists at a time."""
        x = np.asarray(x)
        if len(x) == 0:
            return np.zeros((0, 0), np.float32)
        out = None
        for i in range(0, len(x), batch_size):
            batch = x[i:i + batch_size]
            logits = self.predict(batch if transform is None else transform(batch))
            if out is None:
                out = np.empty((len(x), *logits.shape[1:]), dtype=logits.dtype)
            out[i:i + len(logits)] = logits
        return out

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, provider={self.provider!r}, threads={self.threads})"


@dataclass(frozen=True)
class Latency:
    """Latency of one batch size: percentiles in milliseconds and throughput in samples/s."""
    batch: int
    runs: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    throughput: float

    def to_dict(self) -> dict:
        return {"batch": self.batch, "runs": self.runs, "p50_ms": round(self.p50_ms, 4),
                "p95_ms": round(self.p95_ms, 4), "mean_ms": round(self.mean_ms, 4),
                "throughput_per_s": round(self.throughput, 1)}


def measure(fn, x, *, runs: int = 100, warmup: int = 5, max_seconds: float = 10.0) -> Latency:
    """Time ``fn(x)`` ``runs`` times (fewer if ``max_seconds`` runs out, at least 3) after warm-up."""
    for _ in range(warmup):
        fn(x)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < runs and (len(times) < 3 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    batch = len(x)
    return Latency(batch, len(ms), float(np.percentile(ms, 50)), float(np.percentile(ms, 95)),
                   float(ms.mean()), batch / (float(np.median(ms)) / 1e3))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    return float((np.asarray(logits).argmax(axis=1) == labels).mean()) if len(labels) else float("nan")
