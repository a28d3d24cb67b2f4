"""Checkpoints of factor states: safetensors files with a JSON model description in the metadata.

A checkpoint holds one state dict (the global factors, a client's local factors, or both) and the
``ModelSpec`` that rebuilds the factorised model it belongs to, so that a checkpoint alone is
enough to resume, export or run inference. No pickle: safetensors only. Writes are atomic
(temporary file + rename), so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedpara.models import ModelSpec
from fedpara.state import state_digest  # noqa: F401  (checkpoints are named by it; importers use this path)

FORMAT = "fedpara-checkpoint/1"


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
