"""Compose FedPara factors into a plain model, export it to ONNX, quantise it, run it on the device.

    model, spec, info = load_source("runs/demo")                 # run dir, checkpoint or client state
    path = export_onnx(model, spec, "model.onnx", info=info)     # dynamo exporter, dynamic batch
    quantize_int8(path, "model.int8.onnx", calibration_inputs)   # static QDQ, per-channel weights
    OnnxModel("model.onnx").predict(x)                           # onnxruntime logits

:func:`export_model` does all of it with parity checks (what ``fedpara export`` and an edge client
after its final round call). See docs/export.md.
"""
from .onnx_export import export_onnx, read_metadata
from .pipeline import ExportReport, Parity, check_parity, export_model, int8_path
from .quantize import quantize_int8
from .runtime import OnnxModel, ProviderUnavailable, measure
from .source import latest_checkpoint, load_source

__all__ = ["export_onnx", "read_metadata", "quantize_int8", "load_source", "latest_checkpoint",
           "OnnxModel", "ProviderUnavailable", "measure", "export_model", "check_parity",
           "ExportReport", "Parity", "int8_path"]
