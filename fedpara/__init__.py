"""FedPara: low-rank Hadamard product parameterisation for communication-efficient FL.

Hyeon-Woo, Ye-Bin, Oh, ICLR 2022 (arXiv 2108.06098). See docs/method.md and the README for what is the
paper's and what is ours.

Names are imported lazily (PEP 562): ``import fedpara`` loads nothing, ``fedpara.convert`` or
``fedpara.models`` loads torch. So the numpy-only parts of the method (``fedpara.data.idx``,
``fedpara.data.fashion_mnist``, ``fedpara.data.spec``, ``fedpara.schemes``) import on a device
without PyTorch (the ``infer`` install profile).
"""
from __future__ import annotations

from .lazy_exports import lazy_exports

__version__ = "0.1.0"

# public name -> the submodule that defines it
_NAMES = {
    "FedParaLinear": "layers", "FedParaConv2d": "layers", "LowRankLinear": "layers",
    "LowRankConv2d": "layers", "PFedParaLinear": "layers", "PFedParaConv2d": "layers",
    "FactorisedLayer": "layers", "FactorisedLSTM": "lstm", "FactorisedMatrix": "lstm",
    "rank_for_ratio": "rank", "convert": "conversion", "compose": "conversion", "keep_dense": "conversion",
    "global_state": "state", "local_state": "state", "load_state": "state", "count_params": "state",
}
# submodules reachable as attributes (``fedpara.models.build``) without an import statement
_SUBMODULES = ("conversion", "data", "dp", "kernels", "layers", "lr", "lstm", "models", "rank", "schemes",
               "state", "training", "validate")

__all__ = sorted(_NAMES) + ["models"]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _NAMES, _SUBMODULES)
