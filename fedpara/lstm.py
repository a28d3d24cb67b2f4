"""Factorised LSTM for the paper's character model (Shakespeare, paper Sec. 3 / Table 4).

Each gate matrix of every layer, ``weight_ih_l{k}`` (4H, in) and ``weight_hh_l{k}`` (4H, H), is a
factorised matrix (FedPara, low-rank or pFedPara) in the matrix form of Prop. 1. The forward pass
composes all gate matrices once and then calls torch's fused LSTM kernel (``torch._VF.lstm``,
what ``nn.LSTM`` itself calls), so there is no Python loop over time steps.

Initialisation (ours): the composed gate matrices get the std of torch's own LSTM initialisation,
U(-1/sqrt(H), 1/sqrt(H)), i.e. 1/sqrt(3H) -- the std the dense layer would have.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import kernels
from .layers import FactorisedLayer, _positive_int


class FactorisedMatrix(FactorisedLayer):
    """A bare factorised (m, n) matrix with no bias; ``scheme`` is chosen per instance."""

    def __init__(self, out_dim: int, in_dim: int, rank: int, *, scheme: str = "fedpara",
                 tanh: bool = False, target_std: float | None = None, device=None, dtype=None) -> None:
        super().__init__()
        kernels.halves(scheme)  # validates
        self.scheme = scheme
        self.out_dim, self.in_dim = _positive_int("out_dim", out_dim), _positive_int("in_dim", in_dim)
        rank = _positive_int("rank", rank)
        if rank > min(out_dim, in_dim):
            raise ValueError(f"rank must be <= min{(out_dim, in_dim)} = {min(out_dim, in_dim)}, got {rank}")
        self._init_factors("matrix", out_dim, in_dim, rank, (), in_dim, tanh, False, 0, device, dtype,
                           target_std)

    @property
    def weight(self) -> Tensor:  # (out_dim, in_dim)
        return self._composed()

    def extra_repr(self) -> str:
        return f"{self.out_dim}, {self.in_dim}, rank={self.rank}, scheme={self.scheme!r}, tanh={self.tanh}"


class FactorisedLSTM(nn.Module):
    """Drop-in for ``nn.LSTM`` (unidirectional, no projections) with factorised gate matrices."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, *, rank: int | dict[str, int],
                 scheme: str = "fedpara", tanh: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.scheme = scheme
        std = 1.0 / math.sqrt(3 * hidden_size)
        gate = 4 * hidden_size
        for k in range(num_layers):
            for kind, cols in (("ih", input_size if k == 0 else hidden_size), ("hh", hidden_size)):
                name = f"weight_{kind}_l{k}"
                r = rank[name] if isinstance(rank, dict) else rank
                self.add_module(name, FactorisedMatrix(gate, cols, r, scheme=scheme, tanh=tanh,
                                                       target_std=std, device=device, dtype=dtype))
                if bias:
                    b = torch.empty(gate, device=device, dtype=dtype).uniform_(-math.sqrt(3) * std,
                                                                              math.sqrt(3) * std)
                    self.register_parameter(f"bias_{kind}_l{k}", nn.Parameter(b))

    @property
    def local_names(self) -> tuple[str, ...]:
        """Parameters that stay on the device for pFedPara (second halves and biases)."""
        if self.scheme != "pfedpara":
            return ()
        names = [f"{m}.{n}" for m, sub in self.named_children() for n in sub.local_names]
        return tuple(names) + tuple(n for n, _ in self.named_parameters(recurse=False))

    def flat_weights(self) -> list[Tensor]:
        """Composed weights in nn.LSTM's order: w_ih, w_hh, b_ih, b_hh per layer."""
        out = []
        for k in range(self.num_layers):
            out += [getattr(self, f"weight_ih_l{k}").weight, getattr(self, f"weight_hh_l{k}").weight]
            if self.bias:
                out += [getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")]
        return out

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if not isinstance(input, Tensor):
            raise TypeError("FactorisedLSTM takes a padded tensor; PackedSequence is not supported")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(1 if not self.batch_first else 0)
        batch = input.size(0 if self.batch_first else 1)
        if hx is None:
            z = input.new_zeros(self.num_layers, batch, self.hidden_size)
            hx = (z, z)
        elif not batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        out, h, c = torch._VF.lstm(input, hx, self.flat_weights(), self.bias, self.num_layers,
                                   self.dropout, self.training, False, self.batch_first)
        if not batched:
            out, h, c = out.squeeze(1 if not self.batch_first else 0), h.squeeze(1), c.squeeze(1)
        return out, (h, c)

    def to_dense(self) -> nn.LSTM:
        weights = [w.detach() for w in self.flat_weights()]
        dense = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias,
                        self.batch_first, self.dropout, device=weights[0].device, dtype=weights[0].dtype)
        with torch.no_grad():
            for dst, src in zip(dense._flat_weights, weights, strict=True):
                dst.copy_(src)
        return dense

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"scheme={self.scheme!r}, batch_first={self.batch_first}")
