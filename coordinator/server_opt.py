"""Server optimisers over the global factors (Reddi et al., "Adaptive Federated Optimization",
ICLR 2021, Alg. 2; FedAvgM: Hsu et al., 2019).

A round's aggregate (FedAvg, a robust aggregator or DP-FedAvg's noised average) becomes the next
global state through one of these. With x the current global factors and the pseudo-gradient
``delta = aggregate - x`` (over the *factors*, what travels; pFedPara's local half never reaches
the coordinator):

- ``fedavg``:     x + eta delta                          (eta 1: the aggregate itself, bit for bit)
- ``fedavgm``:    m = beta m + delta;  x + eta m         (server momentum; m starts at 0)
- ``fedadagrad``: m = b1 m + (1-b1) delta;  v = v + delta^2;                         x + eta m / (sqrt v + tau)
- ``fedadam``:    m = b1 m + (1-b1) delta;  v = b2 v + (1-b2) delta^2;               x + eta m / (sqrt v + tau)
- ``fedyogi``:    m = b1 m + (1-b1) delta;  v = v - (1-b2) delta^2 sign(v - delta^2); x + eta m / (sqrt v + tau)

As in the paper's Alg. 2: no bias correction, m starts at 0 and v at tau^2 (its "v_{-1} >= tau^2").
The arithmetic runs in float64; m and v are kept (and checkpointed) as float32, the factors' dtype.
Tensors that are not floating point (counters) take the aggregate's value.

A step is a proposal: :meth:`ServerOptimizer.propose` returns the next state and the optimiser's
next moments without changing anything; :meth:`commit` makes them the optimiser's own once the
coordinator takes the step (its step guard may refuse it: the moments then stay where they were).
:meth:`state_dict` / :meth:`load_state_dict` round-trip the moments exactly; the coordinator writes
them beside each round's checkpoint (:func:`state_path`, safetensors, no pickle) so that
``--resume`` continues bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from fedpara.validate import check_choice, check_number

OPTIMISERS = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ADAPTIVE = ("fedadagrad", "fedadam", "fedyogi")
FORMAT = "fedpara-server-opt/1"


@dataclasses.dataclass(frozen=True)
class Moments:
    """The optimiser's state after some steps: ``m`` (momentum) and ``v`` (second moment) per
    floating-point tensor (empty where the optimiser has none), and the number of steps taken."""

    m: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)
    v: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)
    steps: int = 0


class ServerOptimizer:
    def __init__(self, name: str = "fedavg", lr: float = 1.0, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        check_params(name, lr, momentum, beta1, beta2, tau)
        self.name, self.lr, self.momentum = name, float(lr), float(momentum)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self.moments = Moments()

    @classmethod
    def from_config(cls, cfg) -> ServerOptimizer:
        return cls(cfg.server_opt, cfg.server_lr, cfg.server_momentum, cfg.server_beta1, cfg.server_beta2,
                   cfg.server_tau)

    @property
    def identity(self) -> bool:
        """Plain FedAvg: the next state is the aggregate itself (no arithmetic, no state)."""
        return self.name == "fedavg" and self.lr == 1.0

    @property
    def stateful(self) -> bool:
        """Whether it keeps moments (to checkpoint and resume)."""
        return self.name != "fedavg"

    def propose(self, current: Mapping[str, Tensor], aggregate: Mapping[str, Tensor]
                ) -> tuple[dict[str, Tensor], Moments]:
        """(next global state, the moments after this step); changes nothing (see :meth:`commit`)."""
        if current.keys() != aggregate.keys():
            raise ValueError(f"server optimiser: the aggregate's tensors differ from the model's: "
                             f"{sorted(current.keys() ^ aggregate.keys())[:5]}")
        if self.identity:
            return dict(aggregate), Moments(steps=self.moments.steps + 1)
        old, new, m_out, v_out = self.moments, {}, {}, {}
        for k, agg in aggregate.items():
            x = current[k]
            if not (x.is_floating_point() and agg.is_floating_point()):
                new[k] = agg  # counters and other integers: the aggregate's value
                continue
            x64 = x.detach().to(torch.float64)
            d = agg.detach().to(torch.float64) - x64
            if self.name == "fedavg":
                step = d
            elif self.name == "fedavgm":
                m = d if k not in old.m else old.m[k].to(torch.float64) * self.momentum + d
                m_out[k] = m.to(x.dtype)
                step = m
            else:
                m = (1 - self.beta1) * d + (self.beta1 * old.m[k].to(torch.float64) if k in old.m else 0.0)
                v0 = old.v[k].to(torch.float64) if k in old.v else torch.full_like(d, self.tau ** 2)
                d2 = d * d
                if self.name == "fedadagrad":
                    v = v0 + d2
                elif self.name == "fedadam":
                    v = self.beta2 * v0 + (1 - self.beta2) * d2
                else:  # fedyogi
                    v = v0 - (1 - self.beta2) * d2 * torch.sign(v0 - d2)
                m_out[k], v_out[k] = m.to(x.dtype), v.to(x.dtype)
                step = m / (v.sqrt() + self.tau)
            new[k] = (x64 + self.lr * step).to(x.dtype)
        return new, Moments(m_out, v_out, old.steps + 1)

    def commit(self, moments: Moments) -> None:
        """The coordinator took the proposed step: its moments are the optimiser's now."""
        self.moments = moments

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """(tensors, metadata) of the committed state: ``m/<name>``, ``v/<name>``; the metadata
        names the optimiser and its hyper-parameters (a resume with other ones is refused)."""
        mo = self.moments
        tensors = {**{f"m/{k}": t for k, t in mo.m.items()}, **{f"v/{k}": t for k, t in mo.v.items()}}
        meta = {"format": FORMAT, "steps": str(mo.steps), "params": json.dumps(self.params(), sort_keys=True)}
        return tensors, meta

    def params(self) -> dict:
        return {"server_opt": self.name, "server_lr": self.lr, "server_momentum": self.momentum,
                "server_beta1": self.beta1, "server_beta2": self.beta2, "server_tau": self.tau}

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
        if meta.get("format") != FORMAT:
            raise ValueError(f"server optimiser state: unknown format {meta.get('format')!r} (expected {FORMAT})")
        try:
            saved, steps = json.loads(meta["params"]), int(meta["steps"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"server optimiser state: bad metadata ({exc})") from None
        if saved != self.params():
            diff = sorted(k for k in saved.keys() | self.params().keys() if saved.get(k) != self.params().get(k))
            raise ValueError(f"resume: the run's server optimiser settings differ from the checkpoint's ({', '.join(diff)}: "
                             f"{ {k: saved.get(k) for k in diff} } before, { {k: self.params().get(k) for k in diff} } now)")
        m, v = {}, {}
        for key, t in tensors.items():
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise ValueError(f"server optimiser state: unexpected tensor {key!r}")
            (m if kind == "m" else v)[name] = t
        self.moments = Moments(m, v, steps)


def check_params(name: str, lr: float, momentum: float, beta1: float, beta2: float, tau: float) -> None:
    """ValueError naming the config field."""
    check_choice("server_opt", name, OPTIMISERS)
    check_number("server_lr", lr, min=0.0, max=1e3, min_open=True)
    for field, value in (("server_momentum", momentum), ("server_beta1", beta1), ("server_beta2", beta2)):
        check_number(field, value, min=0.0, max=1.0, max_open=True)
    check_number("server_tau", tau, min=0.0, max=1.0, min_open=True)


# --- files --------------------------------------------------------------------------------------
def state_path(checkpoints: Path, rnd: int) -> Path:
    """The optimiser's state after round ``rnd``: beside, not inside, the round's checkpoint (which
    ``fedpara export`` and the benches read as they are)."""
    return Path(checkpoints) / "server_opt" / f"round-{rnd:04d}.safetensors"


def save_state(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, str], **info) -> None:
    """Atomically write a :meth:`ServerOptimizer.state_dict` snapshot (safetensors)."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp),
              metadata={**meta, "info": json.dumps(info)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata); ValueError naming the file when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        raise ValueError(f"resume: the server optimiser's state {path} is missing (a run with a stateful "
                         "server optimiser writes it beside every round's checkpoint)")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"server optimiser state {path} is not a readable safetensors file: {exc}") from None
