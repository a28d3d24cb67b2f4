"""Clipping and Gaussian noise on factor deltas: the two steps of user-level DP-FedAvg
(McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018) that
both ends share (docs/privacy.md).

An update is the client's factors after local training; its *delta* is their difference to the
global factors the client started from, over every floating-point tensor that travels (for
pFedPara only the global half travels: the local half is never clipped, noised or released).
Clipping scales the whole delta so that its L2 norm (over all tensors together) is at most
``clip``; noise adds N(0, std^2) to every coordinate. Norms are taken in float64.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def delta_norm(new: Mapping[str, Tensor], ref: Mapping[str, Tensor]) -> float:
    """L2 norm of ``new - ref`` over every floating-point tensor of ``ref`` (float64)."""
    return clip_delta(new, ref, None)[1]


@torch.no_grad()
def clip_delta(new: Mapping[str, Tensor], ref: Mapping[str, Tensor],
               clip: float | None) -> tuple[dict[str, Tensor], float]:
    """(the delta ``new - ref`` scaled to L2 norm <= ``clip`` (None: not scaled), as float64
    tensors; its norm before clipping). Non-float tensors are left out (they carry no gradient)."""
    if clip is not None and not clip > 0:
        raise ValueError(f"clip norm must be > 0, got {clip}")
    delta = {k: new[k].double() - r.double() for k, r in ref.items() if r.is_floating_point()}
    norm = sum(float(torch.linalg.vector_norm(d)) ** 2 for d in delta.values()) ** 0.5
    if norm != norm or norm == float("inf"):
        raise ValueError("the update is not finite")
    scale = min(1.0, clip / norm) if norm > 0 and clip is not None else 1.0
    if scale < 1.0:
        for d in delta.values():
            d.mul_(scale)
    return delta, norm


@torch.no_grad()
def add_gaussian(delta: Mapping[str, Tensor], std: float, generator: torch.Generator | None) -> None:
    """Add N(0, std^2) to every coordinate of the float64 ``delta``, in place."""
    if std <= 0:
        return
    for d in delta.values():
        d.add_(torch.randn(d.shape, dtype=torch.float64, generator=generator), alpha=std)


def privatize(new: Mapping[str, Tensor], ref: Mapping[str, Tensor], clip: float, noise_multiplier: float = 0.0
              ) -> dict[str, Tensor]:
    """A client's update for a DP run: ``ref`` + its delta clipped to ``clip`` (+, local DP, noise
    N(0, (noise_multiplier x clip)^2) from the OS's randomness), in ``ref``'s dtypes."""
    delta, _ = clip_delta(new, ref, clip)
    if noise_multiplier > 0:
        import secrets
        add_gaussian(delta, noise_multiplier * clip, torch.Generator().manual_seed(secrets.randbits(63)))
    return apply_delta(ref, delta)


def apply_delta(ref: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``ref + delta`` in ``ref``'s dtypes (tensors without a delta are copied unchanged)."""
    return {k: (r.double() + delta[k]).to(r.dtype) if k in delta else r.clone() for k, r in ref.items()}
