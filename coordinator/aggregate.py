"""Pure aggregation functions (paper Alg. 1: FedAvg over the *factors*, never composed weights).

They take state dicts and weights and return a state dict; no I/O (flower's aggregate.py habit).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from fedpara.wire.codecs import finite


def check_compatible(reference: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
    """ValueError unless ``state`` has exactly the reference's keys and shapes."""
    missing, extra = reference.keys() - state.keys(), state.keys() - reference.keys()
    if missing or extra:
        raise ValueError(f"key sets differ: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    for k, ref in reference.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch for {k}: {tuple(state[k].shape)} vs {tuple(ref.shape)}")


@torch.no_grad()
def fedavg(states: list[Mapping[str, Tensor]], weights: list[float], *,
           workers: int | None = None) -> dict[str, Tensor]:
    """Average of factor states weighted by local example counts (FedAvg, paper Alg. 1).

    Every state must have the same keys and shapes; weights must be positive. ``workers``
    threads sum the blocks (default :func:`aggregation_workers`); each element is summed in the
    same order whatever their number, so the result is the same bit for bit.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {weights}")
    keys = list(states[0].keys())
    for s in states[1:]:
        check_compatible(states[0], s)
    total = float(sum(weights))
    alphas = [w / total for w in weights]
    out, blocks = {}, []
    for k in keys:
        ref = states[0][k]
        if not ref.is_floating_point():  # integer buffers (e.g. num_batches_tracked): take the first
            out[k] = ref.clone()
            continue
        # float64 accumulation, block by block: a block's sum stays in cache while every update is
        # added to it, so memory sees each update once and the result once (no float64 tensor of
        # the whole model); per element the same operations in the same order as a whole-tensor sum
        n = ref.numel()
        result = torch.empty_like(ref, memory_format=torch.contiguous_format)
        flat_out, flats = result.view(-1), [s[k].reshape(-1) for s in states]
        blocks += [(flat_out, flats, a, min(n, a + BLOCK)) for a in range(0, n, BLOCK)]
        out[k] = result
    _sum_blocks(blocks, alphas, aggregation_workers() if workers is None else workers)
    return out


BLOCK = 1 << 18  # elements: a 2 MiB float64 block
WORK_PER_THREAD = 1 << 24  # element additions (updates x elements) that make one more thread worth it
_pool: tuple[ThreadPoolExecutor, int] | None = None  # (executor, its threads), made when first needed
_pool_lock = threading.Lock()


def aggregation_workers() -> int:
    """Threads for summing blocks: up to 4, at most the CPUs this process may use. Aggregation runs
    while every client waits for the next task (memory-bound; torch releases the GIL)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _sum_range(blocks: list, alphas: list[float]) -> None:
    scratch = torch.empty(BLOCK, dtype=torch.float64)  # one block's float64 sum, per thread
    for flat_out, flats, a, b in blocks:
        acc = scratch[:b - a].zero_()
        for f, alpha in zip(flats, alphas):
            acc.add_(f[a:b], alpha=alpha)
        flat_out[a:b].copy_(acc)


def _sum_blocks(blocks: list, alphas: list[float], workers: int) -> None:
    global _pool
    total = sum(b - a for *_, a, b in blocks)
    # a thread per WORK_PER_THREAD additions at most: below that a second thread did not pay here
    # (16 x 6.2 MB of FedPara factors, ~120 small tensors each: measured no faster on two)
    workers = max(1, min(workers, len(blocks), total * len(alphas) // WORK_PER_THREAD))
    if workers == 1:
        _sum_range(blocks, alphas)
        return
    with _pool_lock:
        if _pool is None or _pool[1] < workers - 1:
            _pool = (ThreadPoolExecutor(workers - 1, thread_name_prefix="fedavg"), workers - 1)
        pool = _pool[0]
    # contiguous runs of blocks (neighbours stay together in memory) of about equal elements
    parts, run, done = [], [], 0
    for block in blocks:
        run.append(block)
        done += block[3] - block[2]
        if done * workers >= total * (len(parts) + 1) and len(parts) < workers - 1:
            parts.append(run)
            run = []
    parts.append(run)
    parts = [p for p in parts if p]
    futures = [pool.submit(_sum_range, part, alphas) for part in parts[1:]]
    _sum_range(parts[0], alphas)  # this thread takes the first run
    for f in futures:
        f.result()


def all_finite(state: Mapping[str, Tensor]) -> bool:
    """No NaN or Inf in any float tensor (the decoder's check, per tensor)."""
    return all(finite(t) for t in state.values() if t.is_floating_point())


class StreamingFedAvg:
    """FedAvg folded in as updates arrive: ``add(state, n)`` adds ``n * state`` to a float64 sum,
    ``result()`` divides by the total. Memory: one float64 copy of the model, whatever the number
    of clients. Equal to :func:`fedavg` up to float64 rounding (the order of the additions
    differs; the fp32 result differs from the sorted-order one in about 1 coordinate in 10^8)."""

    def __init__(self, reference: Mapping[str, Tensor]) -> None:
        self.reference = reference
        self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items() if v.is_floating_point()}
        self._first: dict[str, Tensor] | None = None  # integer buffers: the first update's, as fedavg
        self.total = 0
        self.count = 0

    @torch.no_grad()
    def add(self, state: Mapping[str, Tensor], weight: int) -> None:
        if weight <= 0:
            raise ValueError(f"weights must be positive, got {weight}")
        check_compatible(self.reference, state)
        for k, acc in self._sum.items():
            acc.add_(state[k], alpha=float(weight))
        if self._first is None:
            self._first = {k: v.clone() for k, v in state.items() if not v.is_floating_point()}
        self.total += weight
        self.count += 1

    @torch.no_grad()
    def result(self) -> dict[str, Tensor]:
        if not self.count:
            raise ValueError("aggregate: no results")
        out = {}
        for k, ref in self.reference.items():
            out[k] = (self._sum[k] / self.total).to(ref.dtype) if k in self._sum else self._first[k]
        return out


# --- robust aggregation in factor space ---------------------------------------------------------
# Each takes the clients' factor states (same keys and shapes) and returns one state; all of them
# need every update at once (they rank or compare updates), unlike FedAvg.

def _stack(states: list[Mapping[str, Tensor]], key: str) -> Tensor:  # (n, *shape) float64
    return torch.stack([s[key].to(torch.float64) for s in states])


@torch.no_grad()
def coordinate_median(states: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Coordinate-wise median (Yin et al., 2018); tolerates fewer than half arbitrary updates."""
    _check_all(states)
    return {k: (_stack(states, k).median(dim=0).values if ref.is_floating_point() else ref.clone()).to(ref.dtype)
            for k, ref in states[0].items()}


@torch.no_grad()
def trimmed_mean(states: list[Mapping[str, Tensor]], beta: float) -> dict[str, Tensor]:
    """Coordinate-wise mean after dropping the ``floor(beta n)`` largest and smallest values
    (Yin et al., 2018); tolerates up to ``beta n`` arbitrary updates."""
    _check_all(states)
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trimmed mean: beta must be in [0, 0.5), got {beta}")
    n = len(states)
    cut = int(beta * n)
    out = {}
    for k, ref in states[0].items():
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        vals = _stack(states, k).sort(dim=0).values[cut:n - cut]
        out[k] = vals.mean(dim=0).to(ref.dtype)
    return out


@torch.no_grad()
def krum(states: list[Mapping[str, Tensor]], f: int) -> dict[str, Tensor]:
    """Krum (Blanchard et al., 2017): the update closest to its ``n - f - 2`` nearest neighbours;
    tolerates ``f`` arbitrary updates when ``n >= 2f + 3``."""
    _check_all(states)
    n = len(states)
    if f < 0 or n < 2 * f + 3:
        raise ValueError(f"krum: needs n >= 2f + 3 updates, got n={n}, f={f}")
    flat = torch.stack([torch.cat([s[k].to(torch.float64).flatten() for k in states[0]]) for s in states])
    dist = torch.cdist(flat, flat) ** 2  # (n, n)
    scores = dist.sort(dim=1).values[:, 1:n - f - 1].sum(dim=1)  # skip the distance to itself
    best = int(scores.argmin())
    return {k: v.clone() for k, v in states[best].items()}


@torch.no_grad()
def delta_norms(reference: Mapping[str, Tensor], states: list[Mapping[str, Tensor]]) -> list[float]:
    """L2 norm of each state's difference to ``reference`` over every float tensor (float64)."""
    out = []
    for s in states:  # the difference in the tensors' dtype, its norm accumulated in float64
        sq = sum(float(torch.linalg.vector_norm(s[k] - ref, dtype=torch.float64)) ** 2
                 for k, ref in reference.items() if ref.is_floating_point())
        out.append(sq ** 0.5)
    return out


@torch.no_grad()
def norm_clip(reference: Mapping[str, Tensor], states: list[Mapping[str, Tensor]], weights: list[float],
              tau: float) -> dict[str, Tensor]:
    """FedAvg of the clients' deltas, each clipped to L2 norm ``tau`` (Sun et al., 2019): one
    client can move the model by at most ``tau`` times its weight share."""
    if tau <= 0:
        raise ValueError(f"norm clip: tau must be > 0, got {tau}")
    _check_all(states)
    scales = [min(1.0, tau / n) if n > 0 else 1.0 for n in delta_norms(reference, states)]
    clipped = [{k: (ref.to(torch.float64) + (s[k].to(torch.float64) - ref.to(torch.float64)) * c).to(ref.dtype)
                if ref.is_floating_point() else s[k] for k, ref in reference.items()}
               for s, c in zip(states, scales, strict=True)]
    return fedavg(clipped, weights)


def screen(reference: Mapping[str, Tensor], states: list[Mapping[str, Tensor]], factor: float,
           norms: list[float] | None = None) -> list[int]:
    """Indices of the updates to keep: those whose delta norm is at most ``factor`` times the
    median delta norm (and finite). With fewer than 3 updates there is no majority to compare
    against, so only non-finite norms are dropped. ``norms``: the :func:`delta_norms`, when they
    were taken already (the coordinator takes each as its update arrives)."""
    if norms is None:
        norms = delta_norms(reference, states)
    elif len(norms) != len(states):
        raise ValueError(f"screen: {len(norms)} norms for {len(states)} states")
    finite = [i for i, n in enumerate(norms) if n == n and n != float("inf")]
    if len(finite) < 3 or factor <= 0:
        return finite
    med = sorted(norms[i] for i in finite)[len(finite) // 2]
    return [i for i in finite if norms[i] <= factor * max(med, 1e-12)]


def _check_all(states: list[Mapping[str, Tensor]]) -> None:
    if not states:
        raise ValueError("aggregation needs at least one state")
    for s in states[1:]:
        check_compatible(states[0], s)


class StepGuard:
    """How far one aggregate may move the global model (docs/security.md).

    Whatever the number of replies (with fewer than 3 the screen cannot tell an outlier), a new
    global state is refused when it is not finite or when its L2 distance to the current one is
    more than ``factor`` times the median of the last ``window`` accepted moves (but never less
    than ``floor`` times the model's own norm, so that a few tiny moves, an echoing client's say,
    cannot freeze the model); before any move was accepted (round 1, or after a resume), more
    than ``factor`` times the model's own norm. ``factor`` 0 turns the guard off (finiteness is
    still checked)."""

    def __init__(self, factor: float = 10.0, window: int = 5, floor: float = 0.5) -> None:
        self.factor, self.window, self.floor = factor, window, floor
        self.moves: list[float] = []

    def limit(self, current: Mapping[str, Tensor]) -> float:
        if self.factor <= 0:
            return float("inf")
        norm = sum(float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2
                   for v in current.values() if v.is_floating_point()) ** 0.5
        if self.moves:
            ordered = sorted(self.moves)
            return max(self.factor * ordered[len(ordered) // 2], self.floor * norm)
        return self.factor * norm

    def check(self, current: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> tuple[bool, float, float]:
        """(accepted, move, limit); an accepted move joins the history."""
        if not all_finite(new):
            return False, float("inf"), self.limit(current)
        move, limit = delta_norms(current, [new])[0], self.limit(current)
        ok = move == move and move <= limit
        if ok and move > 0:
            self.moves = (self.moves + [move])[-self.window:]
        return ok, move, limit
