"""The paper's rank rule (FedPara Sec. 3.1, "one gamma for all layers"), as in docs/method.md, Sec. 2.

    r = round((1 - gamma) * r_min + gamma * r_max),   capped to [1, min(O, I)]
    r_min = min(ceil(sqrt(O)), ceil(sqrt(I)))          smallest r whose r^2 can reach full rank
    r_max = largest r whose FedPara parameter count <= the dense layer's
            FC / matrix form: floor(m n / (2 (m + n)))       (2 r (m + n) <= m n)
            conv tensor form: floor(positive root of 2 (k^2 r^2 + (O + I) r) = O I k^2)

For grouped convs I is in_channels / groups; for rectangular kernels k^2 is kh * kw. This rule
reproduces the paper's Table 5 VGG16 sizes; the authors' notebook and the Flower baseline use other
rules that do not. The low-rank baseline gets the largest rank whose size fits FedPara's budget at
the same gamma (the paper compares the two at equal size).
"""
from __future__ import annotations

import math

from torch import nn

from . import kernels
from .validate import check_number


def layer_dims(module: nn.Module) -> tuple[int, int, tuple[int, int]]:
    """(out, in-per-group, (kh, kw)) of an nn.Linear / nn.Conv2d; FC layers have kernel (1, 1)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, (1, 1)
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
    raise TypeError(f"rank_for_ratio supports nn.Linear and nn.Conv2d, got {type(module).__name__}")


def fedpara_rank_bounds(out_dim: int, in_dim: int, kernel: tuple[int, int] = (1, 1),
                        form: str = "tensor") -> tuple[int, int]:
    """(r_min, r_max) of the rule above for one layer."""
    k2 = kernel[0] * kernel[1]
    r_min = min(math.ceil(math.sqrt(out_dim)), math.ceil(math.sqrt(in_dim)))
    if k2 == 1 or form == "matrix":
        cols = in_dim * k2
        r_max = (out_dim * cols) // (2 * (out_dim + cols))
    else:  # k2 r^2 + (O + I) r - O I k2 / 2 = 0
        b = out_dim + in_dim
        r_max = math.floor((-b + math.sqrt(b * b + 2 * k2 * k2 * out_dim * in_dim)) / (2 * k2))
    return r_min, max(r_max, 1)


def rank_for_ratio_dims(out_dim: int, in_dim: int, kernel: tuple[int, int], ratio: float, *,
                        scheme: str = "fedpara", form: str = "tensor") -> int:
    """The rule on raw dimensions (used for LSTM gate matrices too)."""
    check_number("ratio", ratio, min=0.0, max=1.0)
    kernels.halves(scheme)
    r_min, r_max = fedpara_rank_bounds(out_dim, in_dim, kernel, form)
    cap = min(out_dim, in_dim)
    r = max(1, min(round((1 - ratio) * r_min + ratio * r_max), cap))
    if scheme != "lowrank":
        return r
    # the low-rank baseline at FedPara's size: the largest rank that fits the same budget
    matrix = kernel == (1, 1) or form == "matrix"
    f_form = "matrix" if matrix else "tensor"
    cols = in_dim * kernel[0] * kernel[1] if matrix else in_dim
    ker = () if matrix else kernel
    budget = kernels.param_count("fedpara", f_form, out_dim, cols, r, ker)
    lr_cap = min(out_dim, cols)
    lr = 1
    while lr < lr_cap and kernels.param_count("lowrank", f_form, out_dim, cols, lr + 1, ker) <= budget:
        lr += 1
    return lr


def rank_for_ratio(module: nn.Module, ratio: float, *, scheme: str = "fedpara", form: str = "tensor") -> int:
    """The paper's rank for one nn.Linear / nn.Conv2d at parameter ratio ``ratio`` (gamma)."""
    out_dim, in_dim, kernel = layer_dims(module)
    return rank_for_ratio_dims(out_dim, in_dim, kernel, ratio, scheme=scheme, form=form)
