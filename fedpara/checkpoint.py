"""Checkpoints of factor states: safetensors files with a JSON model description in the metadata.

A checkpoint holds one state dict (the global factors, a client's local factors, or both) and the
``ModelSpec`` that rebuilds the factorised model it belongs to, so that a checkpoint alone is
enough to resume, export or run inference. No pickle: safetensors only. Writes are atomic
(temporary file + rename), so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import kernels
from .convert import convert
from .models import MODELS, build

FORMAT = "fedpara-checkpoint/1"
SCHEMES = ("dense",) + kernels.SCHEMES


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the (factorised) model."""
    model: str = dataclasses.field(default="cnn28", metadata={"help": "reference model name"})
    num_classes: int = dataclasses.field(default=10, metadata={"help": "number of classes"})
    scheme: str = dataclasses.field(default="fedpara", metadata={"help": "dense|fedpara|lowrank|pfedpara"})
    ratio: float = dataclasses.field(default=0.1, metadata={"help": "the paper's gamma in [0, 1]"})
    form: str = dataclasses.field(default="tensor", metadata={"help": "conv form: tensor|matrix"})
    tanh: bool = dataclasses.field(default=False, metadata={"help": "tanh on the halves (App. B)"})

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: unknown {self.model!r}; available: {', '.join(MODELS)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes: must be an int >= 2, got {self.num_classes!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme: must be one of {SCHEMES}, got {self.scheme!r}")
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not 0 <= self.ratio <= 1:
            raise ValueError(f"ratio: must be a number in [0, 1], got {self.ratio!r}")
        if self.form not in kernels.FORMS:
            raise ValueError(f"form: must be one of {kernels.FORMS}, got {self.form!r}")

    def build(self) -> nn.Module:
        model = build(self.model, num_classes=self.num_classes)
        if self.scheme != "dense":
            convert(model, ratio=self.ratio, scheme=self.scheme, form=self.form, tanh=self.tanh)
        return model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model spec: unknown fields {sorted(unknown)}")
        return cls(**d)


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Tensor], spec: ModelSpec,
                    **info) -> Path:
    """Atomically write ``state`` with the model spec and JSON-serialisable ``info`` (round, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {"format": FORMAT, "spec": json.dumps(spec.to_dict()), "info": json.dumps(info),
            "digest": state_digest(tensors)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], ModelSpec, dict]:
    """(state, spec, info) from a checkpoint; ValueError naming the problem on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: unknown format {meta.get('format')!r} (expected {FORMAT})")
    try:
        spec = ModelSpec.from_dict(json.loads(meta["spec"]))
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"checkpoint {path}: bad metadata ({exc})") from exc
    if meta.get("digest") != state_digest(state):
        raise ValueError(f"checkpoint {path}: digest mismatch, the file is corrupt")
    return state, spec, info
