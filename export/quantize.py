"""int8 static quantisation of an exported model with onnxruntime (QDQ format).

Weights are int8, per output channel (symmetric); activations uint8 (the U8S8 pair onnxruntime's
CPU kernels prefer), with ranges calibrated (MinMax) on a few hundred samples of the device's own
data. The fp32 file's ``fedpara.*`` metadata is carried over, plus ``fedpara.quantization``.

LSTM: onnxruntime's static QDQ quantiser has no LSTM rule, so in ``char_lstm`` the LSTM stays fp32
and only the embedding-free parts (the head's Gemm/MatMul) are quantised; the size gain is small
there. Dynamic quantisation (``DynamicQuantizeLSTM``) is the tool for LSTMs, not done here.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from .onnx_export import PREFIX

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 32
# Ops quantised: the weight-carrying ones (where the size is) and the layout ops between them.
# Normalisation stays fp32: GroupNorm exports as InstanceNormalization + Mul/Add whose constant
# scale/bias tensors the exporter shares across layers, which the QDQ quantiser rejects.
OP_TYPES = ("Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Gather")


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, data: np.ndarray, batch: int) -> None:
        self._it = iter([{name: data[i:i + batch]} for i in range(0, len(data), batch)])

    def get_next(self):
        return next(self._it, None)


def _as_array(calibration, dtype) -> np.ndarray:
    if isinstance(calibration, torch.Tensor):
        calibration = calibration.detach().cpu().numpy()
    data = np.ascontiguousarray(np.asarray(calibration), dtype=dtype)
    if data.ndim < 2 or len(data) == 0:
        raise ValueError(f"calibration must be a non-empty batch (N, ...), got shape {data.shape}")
    return data


def quantize_int8(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                  calibration: torch.Tensor | np.ndarray, *, per_channel: bool = True) -> Path:
    """Statically quantise ``onnx_path`` to int8 (QDQ) into ``out_path``, calibrated on ``calibration``.

    ``calibration`` is a batch of model inputs (N, ...) from local data; a few hundred suffice.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")
    if onnx_path.resolve() == out_path.resolve():
        raise ValueError(f"quantize_int8 would overwrite its input {onnx_path}")
    model = onnx.load(str(onnx_path))
    inp = model.graph.input[0]
    elem = inp.type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    data = _as_array(calibration, dtype)
    meta = {p.key: p.value for p in model.metadata_props}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as tmp:
        pre, raw = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # symbolic shape inference + onnx optimisation: better fusion before quantising
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=False)
        quantize_static(str(pre), str(raw), _Batches(inp.name, data, CALIBRATION_BATCH),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=list(OP_TYPES),
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        quant = onnx.load(str(raw))
        del quant.metadata_props[:]
        meta[PREFIX + "quantization"] = (f"int8 static QDQ, weights int8 per-"
                                         f"{'channel' if per_channel else 'tensor'}, activations "
                                         f"uint8, MinMax on {len(data)} samples")
        for key, value in meta.items():
            entry = quant.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(quant, full_check=True)
        onnx.save_model(quant, str(raw), save_as_external_data=False)
        os.replace(raw, out_path)
    log.info("quantised %s -> %s: %.2f MB -> %.2f MB", onnx_path, out_path,
             onnx_path.stat().st_size / 1e6, out_path.stat().st_size / 1e6)
    return out_path
