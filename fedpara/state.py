"""Factor state: what travels (global) and what stays on the device (local), and sizes.

For FedPara, low-rank and dense models everything is global. For pFedPara (paper Sec. 2.3) the
second half of every layer (t2, x2, y2) and, our choice, its bias never leave the device. For
FedPer (Arivazhagan et al., 2019; the paper's personalisation baseline) every tensor of a module
marked with :func:`mark_personal` (the classifier head) stays on the device.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .layers import FactorisedLayer
from .lstm import FactorisedLSTM


PERSONAL_ATTR = "fedpara_personal"


def mark_personal(module: nn.Module) -> nn.Module:
    """Mark a module: all of its parameters and buffers stay on the device (FedPer's head)."""
    setattr(module, PERSONAL_ATTR, True)
    return module


def local_names(model: nn.Module) -> set[str]:
    """Fully qualified state-dict keys that stay on the device."""
    out: set[str] = set()
    for prefix, module in model.named_modules():
        if getattr(module, PERSONAL_ATTR, False):
            out.update(f"{prefix}.{n}" if prefix else n for n in module.state_dict())
        elif isinstance(module, (FactorisedLayer, FactorisedLSTM)):
            out.update(f"{prefix}.{n}" if prefix else n for n in module.local_names)
    return out


def global_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors that travel to and from the coordinator (detached, in state-dict order)."""
    local = local_names(model)
    return {k: v for k, v in model.state_dict().items() if k not in local}


def local_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors that stay on the device (empty unless the model is pFedPara or FedPer)."""
    local = local_names(model)
    return {k: v for k, v in model.state_dict().items() if k in local}


def load_state(model: nn.Module, state: Mapping[str, Tensor], part: str = "global") -> None:
    """Load a global or local state, checking the key set and every shape before touching the model.

    A mismatched state raises ValueError naming the offending keys and leaves the model unchanged.
    """
    expected = global_state(model) if part == "global" else local_state(model) if part == "local" else None
    if expected is None:
        raise ValueError(f"part must be 'global' or 'local', got {part!r}")
    missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or extra:
        raise ValueError(f"{part} state keys differ: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    bad = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{part} state shapes differ: {bad[:5]}")
    with torch.no_grad():  # the state-dict tensors share storage with the parameters and buffers
        for k, v in expected.items():
            v.copy_(state[k])


def count_params(model_or_state: nn.Module | Mapping[str, Tensor]) -> int:
    """Number of parameters (every tensor in a state dict; every parameter of a module)."""
    if isinstance(model_or_state, nn.Module):
        return sum(p.numel() for p in model_or_state.parameters())
    return sum(t.numel() for t in model_or_state.values())


def state_bytes(state: Mapping[str, Tensor]) -> int:
    """Raw bytes of a state dict at its current dtypes."""
    return sum(t.numel() * t.element_size() for t in state.values())


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes, in sorted name order: a state's identity
    (checkpoints, the demo's final digest, delta coding's chained digests)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashed in place, not copied first
    return h.hexdigest()
