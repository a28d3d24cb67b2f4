"""Compose FedPara factors into a plain model, export it to ONNX, quantise it, run it on the device.

    model, spec, info = load_source("runs/demo")                 # run dir, checkpoint or client state
    path = export_onnx(model, spec, "model.onnx", info=info)     # dynamo exporter, dynamic batch
    quantize_int8(path, "model.int8.onnx", calibration_inputs)   # static QDQ, per-channel weights
    OnnxModel("model.onnx").predict(x)                           # onnxruntime logits

:func:`export_model` does all of it with parity checks (what ``fedpara export`` and an edge client
after its final round call). See docs/export.md.

The names are imported lazily: the inference side (:mod:`export.onnx_model`, :mod:`export.infer`,
and the numpy-only readers of :mod:`fedpara.data` it uses) needs only numpy and onnxruntime, and
importing this package must not pull in torch on a device that has only the ``infer`` install
profile.
"""
from __future__ import annotations

from fedpara.lazy_exports import lazy_exports

_NAMES = {
    "export_onnx": "onnx_export", "read_metadata": "onnx_export",
    "ExportReport": "pipeline", "Parity": "pipeline", "check_parity": "pipeline",
    "export_model": "pipeline", "int8_path": "pipeline",
    "quantize_int8": "quantize",
    "OnnxModel": "onnx_model", "ProviderUnavailable": "onnx_model", "measure": "onnx_model",
    "latest_checkpoint": "source", "load_source": "source",
}

__all__ = sorted(_NAMES)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _NAMES)
