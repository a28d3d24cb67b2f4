"""``convert`` (dense -> factorised, in place) and ``compose`` (factorised -> plain torch layers).

Conversion is a dispatch table from dense module types to factorised builders (peft's
``layers_mapping`` habit). Modules marked with :func:`keep_dense` (the VGG classifier, as in the
paper) and names matching ``skip`` stay dense. Composing is merging: the factors are baked into
ordinary ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LSTM`` weights, checked finite, and the result holds
no factor tensors (docs/method.md, pitfall 4: compose once for inference and export).
"""
from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import kernels
from .layers import CONV_BY_SCHEME, LINEAR_BY_SCHEME, FactorisedLayer
from .lstm import FactorisedLSTM
from .rank import layer_dims, rank_for_ratio_dims
from .validate import check_int, check_number

log = logging.getLogger(__name__)

KEEP_DENSE_ATTR = "fedpara_keep_dense"


def keep_dense(module: nn.Module) -> nn.Module:
    """Mark a module (and everything below it) to be left dense by :func:`convert`."""
    setattr(module, KEEP_DENSE_ATTR, True)
    return module


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _choose_rank(name, dims, ratio, rank, scheme, form) -> int:
    out_dim, in_dim, kernel = dims
    r = None
    if isinstance(rank, Mapping):
        for pattern, value in rank.items():
            if name == pattern or fnmatch.fnmatchcase(name, pattern):
                r = value
                break
    elif rank is not None:
        r = rank
    if r is None:
        if ratio is None:
            raise ValueError(f"no rank for layer {name!r}: give ratio=, rank=<int>, or a rank map entry")
        return rank_for_ratio_dims(out_dim, in_dim, kernel, ratio, scheme=scheme, form=form)
    check_int(f"rank for layer {name!r}", r, min=1)
    matrix = form == "matrix" or kernel == (1, 1)
    cap = min(out_dim, in_dim * (kernel[0] * kernel[1] if matrix else 1))
    if r > cap:
        log.debug("rank %d capped to %d for layer %s", r, cap, name)
    return min(r, cap)


def _linear(m: nn.Linear, name, ratio, rank, scheme, form, tanh):
    r = _choose_rank(name, layer_dims(m), ratio, rank, scheme, "matrix")
    return LINEAR_BY_SCHEME[scheme](m.in_features, m.out_features, r, m.bias is not None,
                                    tanh=tanh, device=m.weight.device, dtype=m.weight.dtype)


def _conv(m: nn.Conv2d, name, ratio, rank, scheme, form, tanh):
    r = _choose_rank(name, layer_dims(m), ratio, rank, scheme, form)
    return CONV_BY_SCHEME[scheme](m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                  m.dilation, m.groups, m.bias is not None, m.padding_mode, rank=r,
                                  form=form, tanh=tanh, device=m.weight.device, dtype=m.weight.dtype)


def _lstm(m: nn.LSTM, name, ratio, rank, scheme, form, tanh):
    if m.bidirectional or m.proj_size:
        raise TypeError(f"{name}: bidirectional or projected LSTMs are not supported")
    ranks = {}
    for k in range(m.num_layers):
        for kind in ("ih", "hh"):
            w = getattr(m, f"weight_{kind}_l{k}")
            ranks[f"weight_{kind}_l{k}"] = _choose_rank(f"{name}.weight_{kind}_l{k}",
                                                        (w.shape[0], w.shape[1], (1, 1)),
                                                        ratio, rank, scheme, "matrix")
    return FactorisedLSTM(m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.dropout,
                          rank=ranks, scheme=scheme, tanh=tanh, device=m.weight_ih_l0.device,
                          dtype=m.weight_ih_l0.dtype)


# dense type -> builder; order matters only for subclasses
CONVERTERS = {nn.Linear: _linear, nn.Conv2d: _conv, nn.LSTM: _lstm}


def _converter(module: nn.Module):
    for cls, fn in CONVERTERS.items():
        if type(module) is cls:
            return fn
    return None


def _plan(model: nn.Module, skip: Iterable[str] = (), targets: Iterable[str] | None = None):
    """``[(name, builder)]``: the modules :func:`convert` replaces (same rules for :func:`match_init`).
    Returns None when the whole model is marked :func:`keep_dense`."""
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    targets = None if targets is None else ((targets,) if isinstance(targets, str) else tuple(targets))
    supported = ", ".join(c.__name__ for c in CONVERTERS)
    kept: set[str] = set()
    plan = []
    for name, module in model.named_modules():
        if not name:
            if getattr(module, KEEP_DENSE_ATTR, False):
                return None
            continue
        if any(name.startswith(k + ".") for k in kept):
            continue
        if getattr(module, KEEP_DENSE_ATTR, False) or _matches(name, skip):
            kept.add(name)
            continue
        if isinstance(module, (FactorisedLayer, FactorisedLSTM)):
            kept.add(name)
            continue
        fn = _converter(module)
        if targets is not None:
            if not _matches(name, targets):
                continue
            if fn is None and not any(_converter(sub) for sub in module.modules()):
                raise TypeError(f"cannot convert {name!r} of type {type(module).__name__}; "
                                f"supported: {supported}")
        if fn is not None:
            plan.append((name, fn))
            kept.add(name)
    if targets is not None:
        for t in targets:
            if not any(_matches(n, (t,)) for n, _ in model.named_modules() if n):
                raise ValueError(f"target {t!r} matches no module in the model")
    return plan


def convert(model: nn.Module, ratio: float | None = None, *, rank: int | Mapping[str, int] | None = None,
            scheme: str = "fedpara", skip: Iterable[str] = (), form: str = "tensor", tanh: bool = False,
            targets: Iterable[str] | None = None) -> nn.Module:
    """Replace nn.Linear / nn.Conv2d / nn.LSTM in ``model`` by factorised layers, in place.

    ratio   the paper's gamma in [0, 1] (rank rule of :mod:`fedpara.rank`), or
    rank    one rank for every layer, or a map {layer name or fnmatch pattern: rank} that overrides
            the ratio for the layers it names.
    scheme  "fedpara" | "lowrank" | "pfedpara".   form  "tensor" (Prop. 3) | "matrix" (Prop. 1) for convs.
    skip    layer names/patterns to leave dense; modules marked with :func:`keep_dense` stay dense.
    targets if given, only these names/patterns are converted, and each must be a supported type.
    """
    kernels.halves(scheme)
    if form not in kernels.FORMS:
        raise ValueError(f"form must be one of {kernels.FORMS}, got {form!r}")
    if ratio is None and rank is None:
        raise ValueError("convert needs ratio= or rank=")
    if ratio is not None:
        check_number("ratio", ratio, min=0.0, max=1.0)
    plan = _plan(model, skip, targets)
    if plan is None:
        return model
    for name, fn in plan:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, fn(getattr(parent, child), name, ratio, rank, scheme, form, tanh))
    log.debug("converted %d layers to %s", len(plan), scheme)
    return model


@torch.no_grad()
def match_init(model: nn.Module, *, skip: Iterable[str] = (), targets: Iterable[str] | None = None) -> nn.Module:
    """Give a *dense* model the initial weight std its factorised twin's composed weights get, in place.

    Every nn.Linear / nn.Conv2d that :func:`convert` would replace gets N(0, He std) weights
    (``kernels.he_std(fan_in)``, what the factor stds are chosen to compose to) instead of torch's
    default (std 1/sqrt(3 fan_in), sqrt(6) = 2.45x smaller); biases keep torch's default, as in the
    factorised layers. LSTMs keep torch's init, which is the std FactorisedLSTM composes to. Layers
    that stay dense in the factorised model (:func:`keep_dense`) are left alone in both, so the dense
    baseline and the factorised model start from the same weight scale everywhere.
    """
    plan = _plan(model, skip, targets)
    for name, _ in plan or ():
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            fan_in = m.in_features
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            continue
        m.weight.normal_(0.0, kernels.he_std(fan_in))
    return model


def _dense_copy(name: str, layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        dense = layer.to_dense()
    for pname, p in dense.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"compose: non-finite values in {name or 'model'}.{pname}")
    return dense.train(layer.training)


def compose(model: nn.Module) -> nn.Module:
    """A new model of plain torch layers computing the same function; no factor tensors remain."""
    factorised = (FactorisedLayer, FactorisedLSTM)
    if isinstance(model, factorised):
        return _dense_copy("", model)
    out = copy.deepcopy(model)
    names: list[str] = []
    for name, module in out.named_modules():
        if isinstance(module, factorised) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, _dense_copy(name, getattr(parent, child)))
    return out
