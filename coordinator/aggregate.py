"""Pure aggregation functions (paper Alg. 1: FedAvg over the *factors*, never composed weights).

They take state dicts and weights and return a state dict; no I/O (flower's aggregate.py habit).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def check_compatible(reference: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
    """ValueError unless ``state`` has exactly the reference's keys and shapes."""
    missing, extra = reference.keys() - state.keys(), state.keys() - reference.keys()
    if missing or extra:
        raise ValueError(f"key sets differ: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for k, ref in reference.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch for {k}: {tuple(state[k].shape)} vs {tuple(ref.shape)}")


@torch.no_grad()
def fedavg(states: list[Mapping[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """Average of factor states weighted by local example counts (FedAvg, paper Alg. 1).

    Every state must have the same keys and shapes; weights must be positive.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {weights}")
    keys = list(states[0].keys())
    for s in states[1:]:
        check_compatible(states[0], s)
    total = float(sum(weights))
    out = {}
    for k in keys:
        ref = states[0][k]
        if not ref.is_floating_point():  # integer buffers (e.g. num_batches_tracked): take the first
            out[k] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[k].to(torch.float64) * (w / total)
        out[k] = acc.to(ref.dtype)
    return out
