"""Compose the factors and export the plain model to ONNX with torch's dynamo exporter (onnxscript).

docs/method.md, pitfall 4: compose once for inference. The factorised model is merged into ordinary
``nn.Conv2d`` / ``nn.Linear`` / ``nn.LSTM`` layers by :func:`fedpara.compose`, traced with
``torch.export`` (dynamic batch dimension), written as one self-contained file (no external data),
checked with ``onnx.checker`` (``full_check=True``, which runs strict shape inference), and stamped
with metadata properties so that a file on a device says what it is:

    fedpara.format          "fedpara-onnx/1"
    fedpara.spec            the ModelSpec as JSON (model, num_classes, scheme, ratio, form, tanh)
    fedpara.model / .scheme / .ratio / .num_classes
    fedpara.round           federated round of the factors ("" when unknown)
    fedpara.accuracy        test accuracy recorded with them ("" when unknown)
    fedpara.factor_digest   sha256 (fedpara.runtime.checkpoint.state_digest) of the factor state that was
                            composed -- equal to the checkpoint's digest for a full state
    fedpara.digest_of       "factors" or, for a model handed over already composed, "composed"
    fedpara.info            every JSON-serialisable entry of ``info`` (client id, source, ...)
"""
from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from fedpara import FactorisedLayer, FactorisedLSTM, compose, models
from fedpara.models import ModelSpec
from fedpara.runtime.checkpoint import state_digest

from .onnx_model import PREFIX  # metadata key prefix, defined on the torch-free side

log = logging.getLogger(__name__)
_EXPORT_LOCK = threading.Lock()
# the exporter warns once per missing torchvision op; nothing here uses torchvision
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

FORMAT = "fedpara-onnx/1"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MAX_BATCH = 4096


def is_factorised(model: nn.Module) -> bool:
    return any(isinstance(m, (FactorisedLayer, FactorisedLSTM)) for m in model.modules())


def _check_spec(model: nn.Module, spec: ModelSpec) -> None:
    """The model must be the one ``spec`` describes (factorised, or its composition)."""
    reference = spec.build()
    if not is_factorised(model) and is_factorised(reference):
        reference = compose(reference)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != got:
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        shapes = [f"{k}: {got[k]} != {want[k]}" for k in want.keys() & got.keys() if got[k] != want[k]]
        raise ValueError(f"model does not match spec {spec.to_dict()}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}, shapes {sorted(shapes)[:5]}")


def _json_safe(info: dict) -> dict:
    out = {}
    for k, v in info.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = str(v)
        out[str(k)] = v
    return out


def metadata_for(model: nn.Module, spec: ModelSpec, info: dict | None = None) -> dict[str, str]:
    """The metadata properties written into the ONNX file (all values strings)."""
    info = _json_safe(dict(info or {}))
    factorised = is_factorised(model) or spec.scheme == "dense"
    meta = {
        "format": FORMAT,
        "spec": json.dumps(spec.to_dict(), sort_keys=True),
        "model": spec.model,
        "scheme": spec.scheme,
        "ratio": repr(float(spec.ratio)),
        "num_classes": str(spec.num_classes),
        "round": "" if info.get("round") is None else str(info["round"]),
        "accuracy": "" if info.get("accuracy") is None else repr(info["accuracy"]),
        "factor_digest": state_digest(model.state_dict()),
        "digest_of": "factors" if factorised else "composed",
        "info": json.dumps(info, sort_keys=True),
    }
    return {PREFIX + k: v for k, v in meta.items()}


def _trace(plain: nn.Module, example: torch.Tensor, opset: int | None):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # torch.export keeps global mode stacks: two threads exporting at once (a client pool) corrupt them
    with _EXPORT_LOCK, warnings.catch_warnings():  # and the exporter's deprecation chatter is not the user's concern
        warnings.simplefilter("ignore")
        program = torch.onnx.export(plain, (example,), dynamo=True, external_data=False,
                                    dynamic_shapes=({0: batch},), input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], opset_version=opset,
                                    optimize=True, verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def export_onnx(model: nn.Module, spec: ModelSpec, out: str | os.PathLike, *,
                info: dict | None = None, opset: int | None = None) -> Path:
    """Compose ``model`` (factorised or already composed), export it to ``out``; returns the path.

    One self-contained ONNX file with a dynamic batch dimension (input ``input``, output
    ``logits``), checked with ``onnx.checker.check_model(full_check=True)``, metadata as in the
    module docstring. The write is atomic. ``info`` carries round / accuracy / client id.
    """
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset must be an int >= 18 (the dynamo exporter's minimum), got {opset!r}")
    out = Path(out)
    _check_spec(model, spec)
    meta = metadata_for(model, spec, info)
    t0 = time.perf_counter()
    # a composed copy on the CPU: the caller's model keeps its device and train/eval mode
    plain = compose(model) if is_factorised(model) else copy.deepcopy(model)
    plain = plain.cpu().float().eval()
    example = models.example_input(spec.model, 2, spec.num_classes, spec.input_shape)
    proto = _trace(plain, example, opset)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "fedpara-edge"
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save_model(proto, str(tmp), save_as_external_data=False)
    os.replace(tmp, out)
    log.info("exported %s (%s, scheme=%s, ratio=%s) to %s: %.2f MB in %.1f s", spec.model,
             meta[PREFIX + "digest_of"], spec.scheme, spec.ratio, out, out.stat().st_size / 1e6,
             time.perf_counter() - t0)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``fedpara.*`` metadata properties of an ONNX file, without the prefix."""
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key[len(PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(PREFIX)}
