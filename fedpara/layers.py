"""Factorised Linear and Conv2d layers: FedPara, the low-rank baseline and pFedPara.

Paper: Hyeon-Woo et al., "FedPara", ICLR 2022. Sec. 2.1 / Prop. 1 (matrix form, used for FC layers
and 1x1 kernels), Prop. 3 (tensor form, every conv in the paper), Sec. 2.3 (pFedPara) and
App. B (tanh on the halves). The composition maths lives in :mod:`fedpara.kernels`.

The dense weight is never stored: ``layer.weight`` composes it from the factors on every access,
so autograd reaches every factor. Use :func:`fedpara.compose` to bake a model into plain layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .validate import check_int


def _positive_int(name: str, value) -> int:
    return check_int(name, value, min=1)


def _pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


class FactorisedLayer(nn.Module):
    """Common machinery: factor creation, initialisation and the global/local split.

    Subclasses set ``scheme``. ``local_names`` lists the parameter names that stay on the device
    (pFedPara's second half and, our choice, its bias); everything else is global and travels.
    """

    scheme: str = "fedpara"

    def _init_factors(self, form: str, out_dim: int, in_dim: int, rank: int, kernel: tuple[int, ...],
                      fan_in: int, tanh: bool, bias: bool, bias_dim: int, device, dtype,
                      target_std: float | None = None) -> None:
        if tanh and self.scheme == "lowrank":
            raise ValueError("tanh applies to the Hadamard halves; the low-rank baseline has one half")
        self.rank, self.form, self.tanh = rank, form, bool(tanh)
        shapes = kernels.factor_shapes(self.scheme, form, out_dim, in_dim, rank, kernel)
        target = kernels.he_std(fan_in) if target_std is None else target_std
        stds = kernels.factor_std(self.scheme, form, rank, target, tanh)
        gen_kw = {"device": device, "dtype": dtype}
        for name, shape in shapes.items():
            p = nn.Parameter(torch.empty(shape, **gen_kw))
            nn.init.normal_(p, 0.0, stds[int(name[1])])
            self.register_parameter(name, p)
        if bias:
            bound = 1.0 / math.sqrt(fan_in)  # torch's default for nn.Linear / nn.Conv2d biases
            self.bias = nn.Parameter(torch.empty(bias_dim, **gen_kw).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @property
    def factor_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.named_parameters(recurse=False) if n != "bias")

    @property
    def local_names(self) -> tuple[str, ...]:
        """Parameters that never leave the device (pFedPara: t2, x2, y2 and bias)."""
        if self.scheme != "pfedpara":
            return ()
        names = tuple(n for n in self.factor_names if n.endswith("2"))
        return names + (("bias",) if self.bias is not None else ())

    def factors(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in self.factor_names}

    def _composed(self) -> Tensor:
        return kernels.compose_weight(self.scheme, self.factors(), self.tanh)

    def _baked(self, dense: nn.Module) -> nn.Module:
        """``dense`` (a plain layer of the same shape) with the composed weight and bias copied in."""
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense


class _FactorisedLinear(FactorisedLayer):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 tanh: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        rank = _positive_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be <= min(in_features, out_features) = "
                             f"{min(in_features, out_features)}, got {rank}")
        self._init_factors("matrix", out_features, in_features, rank, (), in_features, tanh, bias,
                           out_features, device, dtype)

    @property
    def weight(self) -> Tensor:  # (out, in)
        return self._composed()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_dense(self) -> nn.Linear:
        p = self.x1
        return self._baked(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                     device=p.device, dtype=p.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, tanh={self.tanh}")


class FedParaLinear(_FactorisedLinear):
    """W = (x1 @ y1.T) * (x2 @ y2.T); 2r(m+n) parameters, rank up to r^2 (Prop. 1)."""
    scheme = "fedpara"


class LowRankLinear(_FactorisedLinear):
    """Conventional low-rank baseline W = x1 @ y1.T; r(m+n) parameters, rank up to r."""
    scheme = "lowrank"


class PFedParaLinear(_FactorisedLinear):
    """pFedPara W = W1 * (W2 + 1): x1, y1 global (averaged), x2, y2 and bias local (Sec. 2.3)."""
    scheme = "pfedpara"


class _FactorisedConv2d(FactorisedLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 rank: int, form: str = "tensor", tanh: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.groups = _positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.stride = _pair("stride", stride)
        self.dilation = _pair("dilation", dilation)
        for name, pair in (("kernel_size", self.kernel_size), ("stride", self.stride),
                           ("dilation", self.dilation)):
            for v in pair:
                _positive_int(name, v)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or ints, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair("padding", padding)
            if min(self.padding) < 0:
                raise ValueError(f"padding must be >= 0, got {padding!r}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros/reflect/replicate/circular, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if form not in kernels.FORMS:
            raise ValueError(f"form must be one of {kernels.FORMS}, got {form!r}")
        kh, kw = self.kernel_size
        if kh == kw == 1:
            form = "matrix"  # a 1x1 kernel is a matrix; Prop. 1 is the natural (and smaller) form
        in_per_group = in_channels // groups
        rank = _positive_int("rank", rank)
        cols = in_per_group if form == "tensor" else in_per_group * kh * kw
        if rank > min(out_channels, cols):
            raise ValueError(f"rank must be <= min(out_channels, {'in_channels/groups' if form == 'tensor' else 'in_channels/groups*kh*kw'})"
                             f" = {min(out_channels, cols)} for the {form} form, got {rank}")
        self._init_factors(form, out_channels, cols, rank, (kh, kw) if form == "tensor" else (),
                           in_per_group * kh * kw, tanh, bias, out_channels, device, dtype)

    @property
    def weight(self) -> Tensor:  # (O, I/groups, kh, kw)
        w = self._composed()
        if self.form == "matrix":
            w = w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        return w

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) for F.pad, as nn.Conv2d computes it for non-zero modes."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            out = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def to_dense(self) -> nn.Conv2d:
        p = self.x1
        return self._baked(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                     self.padding, self.dilation, self.groups, self.bias is not None,
                                     self.padding_mode, device=p.device, dtype=p.dtype))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}, rank={self.rank}, "
                f"form={self.form!r}, tanh={self.tanh}")


class FedParaConv2d(_FactorisedConv2d):
    """FedPara conv. Tensor form (Prop. 3): 2r(O + I + r kh kw) parameters; matrix form (Prop. 1):
    2r(O + I kh kw). 1x1 kernels always use the matrix form."""
    scheme = "fedpara"


class LowRankConv2d(_FactorisedConv2d):
    """Conventional low-rank conv: one Tucker-2 product (tensor form) or x1 @ y1.T (matrix form)."""
    scheme = "lowrank"


class PFedParaConv2d(_FactorisedConv2d):
    """pFedPara conv: first half (t1, x1, y1) global, second half (t2, x2, y2) and bias local."""
    scheme = "pfedpara"


LINEAR_BY_SCHEME = {"fedpara": FedParaLinear, "lowrank": LowRankLinear, "pfedpara": PFedParaLinear}
CONV_BY_SCHEME = {"fedpara": FedParaConv2d, "lowrank": LowRankConv2d, "pfedpara": PFedParaConv2d}
