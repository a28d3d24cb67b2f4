"""User-level differential privacy for a run: DP-FedAvg over factor deltas and its accountant
(docs/privacy.md).

- **Central** (``dp_mode = "central"``, the default when ``dp_noise_multiplier > 0``): every client
  clips its delta to ``dp_clip_norm`` (C); the coordinator clips again (it cannot trust a client
  to), sums the clipped deltas, adds N(0, (z C)^2) per coordinate (z = ``dp_noise_multiplier``)
  and divides by a fixed denominator (the number sampled, or the expected number for Poisson
  sampling), not by example counts: every user weighs the same.
- **Local** (``dp_mode = "local"``): the client adds the noise to its own clipped delta before it
  leaves the device; the coordinator only averages. For a coordinator nobody should trust, at the
  cost of sqrt(m) times more noise in the average.
- **Adaptive clipping** (``dp_adaptive_clip``; Andrew et al., NeurIPS 2021): C follows the
  ``dp_target_quantile`` of the update norms, C <- C exp(-eta (b - gamma)), from a noised count b
  of the updates that needed no clipping; the count's noise (std m/20) is paid for out of z:
  the deltas get z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, so that the round is still z-private.

The accountant (Google's ``dp-accounting``, RDP) composes one event per released aggregate,
matched to the sampling used:

=====================  ==========================================  ==================
sampling               event                                       neighbouring users
=====================  ==========================================  ==================
all live clients       Gaussian(z / 2)                             replace one
K of N live clients    SampledWithoutReplacement(N, K, Gaussian(z/2))  replace one
Poisson rate q         PoissonSampled(q, Gaussian(z))              add or remove one
local DP               Gaussian(z / 2) per round (each client's)   replace one
=====================  ==========================================  ==================

(Replacing one user's data moves a sum of clipped deltas by up to 2C, hence z/2; adding or
removing one moves it by C.) A round whose release would push epsilon at ``dp_delta`` past
``max_epsilon`` is not run: the run stops cleanly and says so.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import secrets
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedpara.dp import add_gaussian, apply_delta, clip_delta

log = logging.getLogger(__name__)

ORDERS = (1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, *range(5, 64), 128, 256, 512)  # dp-accounting's
SAMPLINGS = ("all", "fixed", "poisson")


def accounting():
    """The dp-accounting package (the ``privacy`` extra), or a one-line error."""
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ValueError("dp_noise_multiplier: differential privacy needs the dp-accounting package "
                         "(pip install 'fedpara-edge[privacy]')") from None
    return dp_accounting, rdp


@dataclasses.dataclass(frozen=True)
class RoundEvent:
    """What one released aggregate cost: its sampling and its noise multiplier."""

    kind: str           # "gaussian" | "wor" | "poisson"
    z: float            # noise std / (clip norm), as added (before the /2 of replace-one)
    n: int = 0          # live clients (wor)
    k: int = 0          # sampled (wor)
    q: float = 0.0      # Poisson rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> RoundEvent:
        return cls(kind=str(d["kind"]), z=float(d["z"]), n=int(d.get("n", 0)), k=int(d.get("k", 0)),
                   q=float(d.get("q", 0.0)))


class Accountant:
    """Epsilon at ``delta`` after a list of :class:`RoundEvent` (RDP, dp-accounting)."""

    def __init__(self, delta: float, poisson: bool = False) -> None:
        self.delta, self.poisson = delta, poisson
        self.events: list[RoundEvent] = []

    def _epsilon(self, events: Sequence[RoundEvent]) -> float:
        if not events:
            return 0.0
        dp, rdp = accounting()
        relation = (dp.NeighboringRelation.ADD_OR_REMOVE_ONE if self.poisson
                    else dp.NeighboringRelation.REPLACE_ONE)
        acc = rdp.RdpAccountant(list(ORDERS), relation)
        for e, count in collections.Counter(events).items():  # equal rounds composed at once
            acc.compose(self.dp_event(e), count)
        return float(acc.get_epsilon(self.delta))

    @staticmethod
    def dp_event(e: RoundEvent):
        dp, _ = accounting()
        if e.kind == "poisson":
            return dp.PoissonSampledDpEvent(e.q, dp.GaussianDpEvent(e.z))
        if e.kind == "wor" and e.k < e.n:
            return dp.SampledWithoutReplacementDpEvent(e.n, e.k, dp.GaussianDpEvent(e.z / 2))
        return dp.GaussianDpEvent(e.z / 2)

    def epsilon(self) -> float:
        return self._epsilon(self.events)

    def epsilon_after(self, event: RoundEvent) -> float:
        """Epsilon if ``event`` were spent too."""
        return self._epsilon([*self.events, event])

    def spend(self, event: RoundEvent) -> float:
        self.events.append(event)
        return self.epsilon()


def noise_for_epsilon(target: float, rounds: int, delta: float, *, n: int = 0, k: int = 0, q: float = 0.0,
                      tol: float = 1e-3) -> float:
    """The smallest noise multiplier z whose ``rounds`` releases (all clients: n = k; K of N
    without replacement; or Poisson rate q) stay within epsilon ``target`` at ``delta``."""
    kind = "poisson" if q else ("wor" if k < n else "gaussian")
    acc = Accountant(delta, poisson=bool(q))

    def eps(z: float) -> float:
        acc.events = [RoundEvent(kind, z, n, k, q)] * rounds
        return acc.epsilon()

    lo, hi = 0.05, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target} in {rounds} rounds")
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


class DPFedAvg:
    """One round's DP-FedAvg: each update's delta clipped to ``clip`` (server side) and summed in
    float64 as it arrives (memory: one float64 copy of the model); :meth:`result` adds the
    noise and divides by the fixed ``denominator``. ``noise_std`` 0: local DP (the clients
    noised their own deltas: they are not clipped again here, only summed)."""

    def __init__(self, reference: Mapping[str, Tensor], clip: float, *, local: bool = False) -> None:
        self.reference, self.clip, self.local = reference, clip, local
        self.sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in reference.items()
                    if v.is_floating_point()}
        self.count = 0
        self.unclipped = 0  # updates whose norm was at most the clip norm (adaptive clipping's count)

    def add(self, tensors: Mapping[str, Tensor], num_examples: int | None = None) -> float:
        """Fold one client's factors in (every user weighs the same: ``num_examples`` is not used);
        returns its delta's norm before clipping."""
        # local DP: the device clipped and noised it; clipping the noise away here would undo it
        delta, norm = clip_delta(tensors, self.reference, None if self.local else self.clip)
        for k, d in delta.items():
            self.sum[k].add_(d)
        self.count += 1
        self.unclipped += norm <= self.clip
        return norm

    def result(self, denominator: float, noise_std: float, generator: torch.Generator | None = None
               ) -> dict[str, Tensor]:
        """The next global state: reference + (sum + N(0, noise_std^2)) / denominator."""
        if denominator <= 0:
            raise ValueError("DP-FedAvg needs a denominator > 0")
        total = {k: v.clone() for k, v in self.sum.items()}
        add_gaussian(total, noise_std, generator if generator is not None else secure_generator())
        for v in total.values():
            v.div_(denominator)
        return apply_delta(self.reference, total)


def secure_generator() -> torch.Generator:
    """A torch generator seeded from the OS: DP noise must not be predictable from the run's seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class AdaptiveClip:
    """Andrew et al.'s geometric clip-norm update from a noised count of unclipped updates."""

    def __init__(self, clip: float, quantile: float = 0.5, lr: float = 0.2) -> None:
        self.clip, self.quantile, self.lr = clip, quantile, lr

    @staticmethod
    def count_std(expected: float) -> float:
        return max(expected, 1.0) / 20.0

    @staticmethod
    def delta_multiplier(z: float, count_std: float) -> float:
        """The noise multiplier left for the deltas when the count takes its share of z."""
        rest = z ** -2 - (2 * count_std) ** -2
        if rest <= 0:
            raise ValueError(f"dp_adaptive_clip: dp_noise_multiplier {z} is too large for the count's noise "
                             f"(std {count_std:.3g}: expected clients / 20); it must be below {2 * count_std:.3g}")
        return rest ** -0.5

    def update(self, unclipped: int, expected: float, generator: torch.Generator | None = None) -> float:
        g = generator if generator is not None else secure_generator()
        noised = unclipped + float(torch.randn((), generator=g, dtype=torch.float64)) * self.count_std(expected)
        fraction = noised / max(expected, 1.0)
        self.clip *= math.exp(-self.lr * (fraction - self.quantile))
        return self.clip


class BudgetExhausted(Exception):
    """The next round would spend more than ``max_epsilon``: the run stops cleanly (not a failure)."""


class PrivacyLedger:
    """A run's differential privacy: what the clients are told, the accumulator of each round, the
    noise, the adaptive clip norm and the spent budget (rebuilt from metrics.jsonl on resume)."""

    def __init__(self, cfg) -> None:
        self.z, self.delta, self.max_epsilon = cfg.dp_noise_multiplier, cfg.dp_delta, cfg.max_epsilon
        self.local = cfg.dp_mode == "local"
        self.sampling, self.rate = cfg.sampling, cfg.sample_rate
        self.clip = AdaptiveClip(cfg.dp_clip_norm, cfg.dp_target_quantile, cfg.dp_clip_lr) \
            if cfg.dp_adaptive_clip else None
        self.clip_norm = cfg.dp_clip_norm
        self.accountant = Accountant(cfg.dp_delta, poisson=cfg.sampling == "poisson" and not self.local)

    @property
    def mode(self) -> str:
        return "local" if self.local else "central"

    def task_params(self):
        from fedpara.runtime.messages import DPParams
        return DPParams(clip=self.clip_norm, noise=self.z if self.local else 0.0, mode=self.mode)

    def plan(self, eligible: int, sampled: int) -> tuple[RoundEvent, float]:
        """(the event this round's release costs, the fixed denominator of its average)."""
        if self.local:  # each client's own release, worst case: it takes part in every round
            return RoundEvent("gaussian", self.z), float(max(sampled, 1))
        if self.sampling == "poisson":
            event, denominator = RoundEvent("poisson", self.z, q=self.rate), self.rate * eligible
        else:
            kind = "wor" if sampled < eligible else "gaussian"
            event, denominator = RoundEvent(kind, self.z, eligible, sampled), float(sampled)
        if self.clip is not None:  # ValueError now, not after training, when the count cannot pay its share
            AdaptiveClip.delta_multiplier(self.z, AdaptiveClip.count_std(denominator))
        return event, denominator

    def check(self, event: RoundEvent, rnd: int) -> None:
        """BudgetExhausted when spending ``event`` would pass ``max_epsilon``."""
        if self.max_epsilon <= 0:
            return
        after = self.accountant.epsilon_after(event)
        if after > self.max_epsilon:
            raise BudgetExhausted(
                f"privacy budget: round {rnd} would bring epsilon to {after:.3f} > max_epsilon "
                f"{self.max_epsilon:g} (delta {self.delta:g}); spent {self.accountant.epsilon():.3f} in "
                f"{len(self.accountant.events)} round(s)")

    def accumulator(self, state: Mapping[str, Tensor]) -> DPFedAvg:
        return DPFedAvg(state, self.clip_norm, local=self.local)

    def release(self, acc: DPFedAvg, event: RoundEvent, denominator: float) -> tuple[dict[str, Tensor], dict]:
        """The round's noised aggregate and its metrics.jsonl fields; the budget is spent here
        (whatever happens to the aggregate next is post-processing)."""
        z_delta = self.z
        if self.clip is not None:
            z_delta = AdaptiveClip.delta_multiplier(self.z, AdaptiveClip.count_std(denominator))
        clip = self.clip_norm
        new = acc.result(max(denominator, 1e-12), 0.0 if self.local else z_delta * clip)
        if self.clip is not None:
            self.clip_norm = self.clip.update(acc.unclipped, denominator)
        epsilon = self.accountant.spend(event)
        fields = {"epsilon": epsilon, "delta": self.delta,
                  "dp": {"mode": self.mode, "noise_multiplier": self.z, "clip": clip, "next_clip": self.clip_norm,
                         "clients": acc.count, "denominator": denominator, "event": event.to_dict()}}
        return new, fields

    def resume(self, rows: Sequence[dict]) -> None:
        """The spent budget and the clip norm of a run's earlier rounds (its metrics.jsonl rows)."""
        for row in rows:
            dp = row.get("dp")
            if not isinstance(dp, Mapping) or not isinstance(dp.get("event"), Mapping):
                raise ValueError(f"resume: round {row.get('round')} of this run has no privacy record; a run "
                                 "cannot become differentially private half-way (start a new run)")
            self.accountant.events.append(RoundEvent.from_dict(dp["event"]))
            if isinstance(dp.get("next_clip"), (int, float)) and dp["next_clip"] > 0:
                self.clip_norm = float(dp["next_clip"])
                if self.clip is not None:
                    self.clip.clip = self.clip_norm
