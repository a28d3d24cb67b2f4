"""FedPara: low-rank Hadamard product parameterisation for communication-efficient FL.

Hyeon-Woo, Ye-Bin, Oh, ICLR 2022 (arXiv 2108.06098). See docs/method.md and the README for what is the
paper's and what is ours.
"""
from . import models
from .convert import compose, convert, keep_dense
from .layers import (
                     FactorisedLayer,
                     FedParaConv2d,
                     FedParaLinear,
                     LowRankConv2d,
                     LowRankLinear,
                     PFedParaConv2d,
                     PFedParaLinear,
)
from .lstm import FactorisedLSTM, FactorisedMatrix
from .rank import rank_for_ratio
from .state import count_params, global_state, load_state, local_state

__version__ = "0.1.0"

__all__ = [
    "FedParaLinear", "FedParaConv2d", "LowRankLinear", "LowRankConv2d", "PFedParaLinear",
    "PFedParaConv2d", "FactorisedLayer", "FactorisedLSTM", "FactorisedMatrix", "rank_for_ratio",
    "convert", "compose", "keep_dense", "global_state", "local_state", "load_state", "count_params", "models",
]
