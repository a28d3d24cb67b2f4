"""Learning rates per scheme: measured defaults, and the initial "movement" of composed weights.

One SGD lr does not suit every scheme. A FedPara weight is a product of four factors (six with
the tensor form's cores); at the He-composed initialisation (:func:`fedpara.kernels.factor_std`)
one SGD step moves the composed weight less per unit lr than it moves a low-rank one, so the best
lr differs by scheme (docs/fidelity.md). :data:`DEFAULT_LR` holds the lrs chosen per (model,
scheme) on a validation split by ``benchmarks/bench_repro.py`` (batch 32 except where noted, 1
local epoch, plain SGD, 10 clients); :func:`default_lr` is what the coordinator uses when no lr
is given (``lr = 0`` in its config).

:func:`movement` measures, for a model, how far the composed weights of its factorised layers
move per unit lr relative to a dense layer (which moves exactly ``lr * grad``): for a random
gradient direction G on each composed weight W, the factors get the chain-rule gradient
``J^T G`` and, to first order, W moves by ``J J^T G``; the result is
``sqrt(sum ||J J^T G||^2 / sum ||G||^2)`` over the factorised layers (1 for a dense model).
Its inverse is a candidate lr multiplier; docs/fidelity.md compares it with the measured lrs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .layers import FactorisedLayer

# (model, scheme) -> lr, chosen on a validation split by benchmarks/bench_repro.py (docs/fidelity.md).
# The sweeps are short (docs/results/repro.md: 10 clients x 300-500 examples, 6-10 rounds, seed 0, 1,000-3,000
# validation examples), so these are "best of 2-3 candidates", not tuned optima: mlp2 dense and
# FedPara chose the largest lr they were offered.
DEFAULT_LR: dict[tuple[str, str], float] = {
    ("mlp2", "dense"): 0.2, ("mlp2", "lowrank"): 0.1, ("mlp2", "fedpara"): 0.4,
    ("cnn28", "dense"): 0.1, ("cnn28", "lowrank"): 0.05, ("cnn28", "fedpara"): 0.3,
    # mlp: the personalisation setting (shards:2, docs/fidelity.md); pFedPara: see default_lr
    ("mlp", "dense"): 0.2, ("mlp", "fedper"): 0.2, ("mlp", "pfedpara"): 0.05,
}
# What the sweep did not cover (mlp FedPara and low-rank, vgg16, char_lstm) keeps the previous
# single default, 0.1 (not measured; VGG16/CIFAR-10 cannot be downloaded here). mlp2's FedPara lr
# 0.4 is not carried over to mlp: on a 2-client, 300-example demo it diverged in round 1.
# Delta-coded wires (``wire = "delta"`` / ``"lean"``, docs/compression.md): on cnn28 every compressed
# configuration with error feedback chose half FedPara's lr on the validation split of
# benchmarks/bench_compress.py (at 0.3, 4-bit deltas ended 5 pp lower); on mlp2 they chose FedPara's own.
DELTA_LR: dict[tuple[str, str], float] = {("cnn28", "fedpara"): 0.15}
SCHEME_LR: dict[str, float] = {"dense": 0.1, "lowrank": 0.1, "fedpara": 0.1, "pfedpara": 0.1, "fedper": 0.1}
NEAREST: dict[str, str] = {}


def default_lr(model: str, scheme: str, wire: str = "plain") -> float:
    """The lr the coordinator uses for ``model``/``scheme`` (and its ``wire``) when none is given."""
    if wire in ("delta", "lean") and (model, scheme) in DELTA_LR:
        return DELTA_LR[(model, scheme)]
    if scheme not in SCHEME_LR:
        raise ValueError(f"no default lr for scheme {scheme!r}; known: {', '.join(SCHEME_LR)}")
    for m in (model, NEAREST.get(model)):
        if (m, scheme) in DEFAULT_LR:
            return DEFAULT_LR[(m, scheme)]
        # FedPer is the dense model with a personal head
        if scheme == "fedper" and (m, "dense") in DEFAULT_LR:
            return DEFAULT_LR[(m, "dense")]
        # pFedPara's W1 * (W2 + 1) starts with a small local half and moves like a low-rank weight
        # (movement on mlp: 1.72, low-rank 1.78, FedPara 0.67). On mlp with 2-class shards
        # (docs/fidelity.md) FedPara's lr 0.4 and low-rank's 0.1 both diverged in round 1 and half
        # of low-rank's (0.05) trained: that is the rule.
        if scheme == "pfedpara" and (m, "lowrank") in DEFAULT_LR:
            return DEFAULT_LR[(m, "lowrank")] / 2
    return SCHEME_LR[scheme]


def lr_table(delta: bool = False) -> str:
    """One line per measured default (``delta``: those for delta-coded wires), for help texts and docs."""
    return "; ".join(f"{m}/{s} {lr:g}" for (m, s), lr in sorted((DELTA_LR if delta else DEFAULT_LR).items()))


def _layer_movement(layer: FactorisedLayer, gen: torch.Generator) -> tuple[float, float]:
    names = layer.factor_names
    factors = tuple(getattr(layer, n).detach().double() for n in names)

    def weight(*fs):
        return kernels.compose_weight(layer.scheme, dict(zip(names, fs)), layer.tanh)

    w = weight(*factors)
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    params = tuple(f.clone().requires_grad_(True) for f in factors)
    grads = torch.autograd.grad((weight(*params) * g).sum(), params)  # J^T G
    _, dw = torch.func.jvp(weight, factors, grads)  # J J^T G
    return float((dw ** 2).sum()), float((g ** 2).sum())


def movement(model: nn.Module, seed: int = 0, probes: int = 3) -> float:
    """Composed-weight movement per unit lr relative to dense, at the model's current factors
    (random Gaussian gradient directions, ``probes`` of them averaged); 1.0 without factorised layers."""
    gen = torch.Generator().manual_seed(seed)
    num = den = 0.0
    for _ in range(probes):
        for m in model.modules():
            if isinstance(m, FactorisedLayer):
                a, b = _layer_movement(m, gen)
                num, den = num + a, den + b
    return math.sqrt(num / den) if den else 1.0
