"""Export with checks: compose -> ONNX -> parity against torch -> optional int8 -> sizes and latency.

This is what ``fedpara export`` runs and what an edge client calls after its final round
(:func:`export_model`, personalised for pFedPara because the client's model holds its local half).

Parity: onnxruntime's logits must match the torch model's (the factorised one, composing
on every call, i.e. the model that was trained) within ``atol`` max abs, and the predicted classes,
hence the accuracy, must be identical. Batch 1 and batch 64 are always checked on random inputs
(the batch dimension is dynamic); a labelled evaluation set adds accuracy.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpara import models
from fedpara.models import ModelSpec

from .onnx_export import export_onnx
from .quantize import quantize_int8
from .onnx_model import OnnxModel, accuracy, measure

log = logging.getLogger(__name__)

ATOL = 1e-4


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of a torch model in eval mode, batched, as numpy."""
    model.eval()
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    outs = [model(x[i:i + batch_size]).float().cpu().numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


@dataclass
class Parity:
    """onnxruntime vs torch on one input set."""
    samples: int
    max_abs: float
    same_predictions: bool
    torch_accuracy: float | None = None
    onnx_accuracy: float | None = None
    atol: float = ATOL

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.atol and self.same_predictions


def check_parity(model: nn.Module, onnx_model: OnnxModel, x, y=None, *, atol: float = ATOL) -> Parity:
    """Compare logits and predictions of ``model`` (torch) and ``onnx_model`` on inputs ``x``."""
    x_np = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    ref = torch_logits(model, x_np)
    got = onnx_model.predict_all(x_np)
    if ref.shape != got.shape:
        raise ValueError(f"onnxruntime logits have shape {got.shape}, torch {ref.shape}")
    parity = Parity(len(x_np), float(np.abs(ref - got).max()) if ref.size else 0.0,
                    bool((ref.argmax(1) == got.argmax(1)).all()), atol=atol)
    if y is not None:
        y_np = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        parity.torch_accuracy, parity.onnx_accuracy = accuracy(ref, y_np), accuracy(got, y_np)
    return parity


@dataclass
class ExportReport:
    """What :func:`export_model` produced and measured."""
    onnx: Path
    size_bytes: int
    parity_random: Parity
    parity_data: Parity | None = None
    int8: Path | None = None
    int8_size_bytes: int | None = None
    int8_accuracy: float | None = None
    int8_agreement: float | None = None  # fraction of predictions equal to fp32's
    latency: dict = field(default_factory=dict)  # "fp32"/"int8" -> Latency.to_dict() at batch 1

    @property
    def ok(self) -> bool:
        return self.parity_random.ok and (self.parity_data is None or self.parity_data.ok)

    @property
    def int8_drop_pp(self) -> float | None:
        """Accuracy drop of int8 vs fp32 onnxruntime, in percentage points."""
        if self.int8_accuracy is None or self.parity_data is None or self.parity_data.onnx_accuracy is None:
            return None
        return 100.0 * (self.parity_data.onnx_accuracy - self.int8_accuracy)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["onnx"], d["int8"] = str(self.onnx), None if self.int8 is None else str(self.int8)
        d["ok"], d["int8_drop_pp"] = self.ok, self.int8_drop_pp
        return d


def int8_path(out: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    out = Path(out)
    return out.with_name((out.name[:-5] if out.name.endswith(".onnx") else out.name) + ".int8.onnx")


def export_model(model: nn.Module, spec: ModelSpec, out: str | os.PathLike, *, info: dict | None = None,
                 opset: int | None = None, eval_data: tuple | None = None, calibration=None,
                 int8: bool = False, threads: int = 1, atol: float = ATOL,
                 latency_runs: int = 50) -> ExportReport:
    """Export ``model`` to ``out`` (and ``out``'s ``.int8.onnx`` sibling when ``int8``) and verify it.

    eval_data    (x, y) labelled inputs (e.g. the test split): parity and accuracy on them
    calibration  model inputs from local data for int8 (required when ``int8``)
    """
    if int8 and calibration is None:
        raise ValueError("int8 export needs calibration data (a batch of local inputs)")
    model = copy.deepcopy(model).cpu().eval()  # the reference; the caller's model is left alone
    path = export_onnx(model, spec, out, info=info, opset=opset)
    fp32 = OnnxModel(path, threads=threads)
    with torch.random.fork_rng():  # seeded inputs, without disturbing the caller's RNG
        torch.manual_seed(0)
        rand = models.example_input(spec.model, 64, spec.num_classes, spec.input_shape)
    parities = [check_parity(model, fp32, rand[:1], atol=atol), check_parity(model, fp32, rand, atol=atol)]
    worst = max(parities, key=lambda p: p.max_abs)
    report = ExportReport(path, path.stat().st_size, Parity(65, worst.max_abs,
                                                            all(p.same_predictions for p in parities),
                                                            atol=atol))
    if eval_data is not None:
        report.parity_data = check_parity(model, fp32, *eval_data, atol=atol)
    one = rand[:1].numpy()
    report.latency["fp32"] = measure(fp32.predict, one, runs=latency_runs).to_dict()
    if int8:
        q = quantize_int8(path, int8_path(path), calibration)
        qm = OnnxModel(q, threads=threads)
        report.int8, report.int8_size_bytes = q, q.stat().st_size
        report.latency["int8"] = measure(qm.predict, one, runs=latency_runs).to_dict()
        if eval_data is not None:
            x = eval_data[0].numpy() if isinstance(eval_data[0], torch.Tensor) else np.asarray(eval_data[0])
            y = eval_data[1].numpy() if isinstance(eval_data[1], torch.Tensor) else np.asarray(eval_data[1])
            qlogits = qm.predict_all(x)
            report.int8_accuracy = accuracy(qlogits, y)
            report.int8_agreement = float((qlogits.argmax(1) == fp32.predict_all(x).argmax(1)).mean())
    log.info("export %s: parity %s (max abs %.2e)%s", path, "ok" if report.ok else "FAILED",
             max(report.parity_random.max_abs, report.parity_data.max_abs if report.parity_data else 0),
             "" if report.int8 is None else f", int8 {report.int8} ({report.int8_size_bytes / 1e6:.2f} MB)")
    return report
