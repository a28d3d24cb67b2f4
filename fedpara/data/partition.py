"""Seeded, deterministic federated partitions of a labelled dataset.

Every function takes the *labels* of the whole split (cheap: 60,000 int64 for Fashion-MNIST)
plus ``(num_clients, index, seed)`` and returns the sorted int64 sample indices of client
``index`` only, so a device computes its own shard without loading anyone else's images. Each
client runs the same seeded computation, so all shards agree without any coordination.

Schemes (parsed by :func:`parse_scheme` from the data spec's ``partition=`` value):

- ``iid``: a seeded permutation cut into ``num_clients`` near-equal parts.
- ``dirichlet:ALPHA``: per-class proportions ``p_k ~ Dir(ALPHA * 1)`` over clients
  (Hsu et al., 2019, "Measuring the effects of non-identical data distribution"), the standard
  non-IID split used in the FedPara paper's experiments (Sec. 4). Small ALPHA -> few classes
  per client. Every client gets at least ``min_size`` samples: up to ``MAX_TRIES`` seeded
  resamples, then a deterministic rebalance that moves samples from the largest clients.
- ``shards:K``: McMahan et al. (2017) pathological split: sort by label, cut into
  ``num_clients * K`` shards, give each client K random shards (so about K classes).

Also :func:`validation_split`: a seeded carve-out of the train split held back for choosing
hyperparameters (the learning rate) without looking at the test split; clients are then
partitioned over the remaining rows only. And :func:`local_test_indices` for personalised evaluation (pFedPara, Sec. 3.3): a client's own
test subset drawn from the test split with the same class distribution as its train shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TRIES = 100
DEFAULT_MIN_SIZE = 10
_TAG_LOCAL_TEST = 0x7E57  # separates the local-test RNG stream from the partition stream
_TAG_VALIDATION = 0x5A1D  # the validation carve-out's own RNG stream


@dataclass(frozen=True)
class Scheme:
    """A parsed partition scheme: ``kind`` in {iid, dirichlet, shards, natural}."""

    kind: str
    alpha: float | None = None
    shards_per_client: int | None = None

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards_per_client}"
        return self.kind


def parse_scheme(text: str) -> Scheme:
    """Parse ``iid``, ``dirichlet:ALPHA``, ``shards:K`` or ``natural``; ValueError otherwise."""
    kind, _, arg = text.strip().partition(":")
    if kind in ("iid", "natural"):
        if arg:
            raise ValueError(f"partition {kind!r} takes no argument, got {text!r}")
        return Scheme(kind)
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"partition dirichlet needs a float ALPHA > 0, got {text!r}") from None
        if not (alpha > 0 and np.isfinite(alpha)):
            raise ValueError(f"partition dirichlet ALPHA must be finite and > 0, got {text!r}")
        return Scheme("dirichlet", alpha=alpha)
    if kind == "shards":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"partition shards needs an integer K >= 1, got {text!r}")
        return Scheme("shards", shards_per_client=int(arg))
    raise ValueError(f"unknown partition {text!r} (supported: iid, dirichlet:ALPHA, shards:K, "
                     "natural)")


def _check(n: int, num_clients: int, index: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0 <= index < num_clients:
        raise ValueError(f"index must be in 0..{num_clients - 1}, got {index}")
    if n < num_clients:
        raise ValueError(f"{n} samples cannot be split over {num_clients} clients")


def _labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    return labels.astype(np.int64, copy=False)


def iid(labels, num_clients: int, index: int, seed: int = 0) -> np.ndarray:
    """Client ``index``'s share of a seeded uniform split (sizes differ by at most one)."""
    n = len(labels)
    _check(n, num_clients, index)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(np.array_split(perm, num_clients)[index]).astype(np.int64)


def dirichlet_assignment(labels, num_clients: int, alpha: float, seed: int = 0,
                         min_size: int | None = None) -> np.ndarray:
    """Client id for every sample under the Dirichlet split (shape (N,), values 0..C-1)."""
    labels = _labels(labels)
    n = len(labels)
    _check(n, num_clients, 0)
    if min_size is None:
        min_size = min(DEFAULT_MIN_SIZE, n // num_clients)
    if min_size * num_clients > n:
        raise ValueError(f"min_size {min_size} x {num_clients} clients exceeds {n} samples")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    owner = np.empty(n, dtype=np.int64)
    for _ in range(MAX_TRIES):
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            # Hsu et al./FedMA balance trick: stop feeding clients already above the mean size.
            p = p * (sizes < n / num_clients)
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                owner[part] = client
                sizes[client] += len(part)
        if sizes.min() >= min_size:
            return owner
    return _rebalance(owner, num_clients, min_size, rng)


def _rebalance(owner: np.ndarray, num_clients: int, min_size: int,
               rng: np.random.Generator) -> np.ndarray:
    """Move random samples from the largest client to each client below ``min_size``."""
    owner = owner.copy()
    sizes = np.bincount(owner, minlength=num_clients)
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            take = min(min_size - sizes[client], sizes[donor] - min_size)
            moved = rng.choice(np.flatnonzero(owner == donor), size=take, replace=False)
            owner[moved] = client
            sizes[donor] -= take
            sizes[client] += take
    return owner


def dirichlet(labels, num_clients: int, index: int, seed: int = 0, *, alpha: float,
              min_size: int | None = None) -> np.ndarray:
    """Client ``index``'s indices under the per-class Dirichlet(alpha) split."""
    _check(len(labels), num_clients, index)
    owner = dirichlet_assignment(labels, num_clients, alpha, seed, min_size)
    return np.flatnonzero(owner == index).astype(np.int64)


def shards(labels, num_clients: int, index: int, seed: int = 0, *,
           shards_per_client: int = 2) -> np.ndarray:
    """Client ``index``'s indices under the sort-by-label shard split (covers every sample)."""
    labels = _labels(labels)
    n = len(labels)
    _check(n, num_clients, index)
    total = num_clients * shards_per_client
    if total > n:
        raise ValueError(f"{num_clients} clients x {shards_per_client} shards exceeds {n} samples")
    rng = np.random.default_rng(seed)
    within = rng.permutation(n)  # random order inside each class, then a stable sort by label
    order = within[np.argsort(labels[within], kind="stable")]
    pieces = np.array_split(order, total)
    mine = rng.permutation(total).reshape(num_clients, shards_per_client)[index]
    return np.sort(np.concatenate([pieces[s] for s in mine])).astype(np.int64)


def partition(labels, scheme: str | Scheme, num_clients: int, index: int,
              seed: int = 0) -> np.ndarray:
    """Dispatch on a scheme string (``iid``, ``dirichlet:0.5``, ``shards:2``)."""
    if isinstance(scheme, str):
        scheme = parse_scheme(scheme)
    if scheme.kind == "iid":
        return iid(labels, num_clients, index, seed)
    if scheme.kind == "dirichlet":
        return dirichlet(labels, num_clients, index, seed, alpha=scheme.alpha)
    if scheme.kind == "shards":
        return shards(labels, num_clients, index, seed,
                      shards_per_client=scheme.shards_per_client)
    raise ValueError(f"partition {scheme} needs a dataset with natural clients "
                     "(e.g. shakespeare); label partitions: iid, dirichlet:ALPHA, shards:K")


def validation_split(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, val)``: sorted, disjoint int64 indices covering ``range(n)``; ``val`` holds
    ``round(fraction * n)`` (at least 1) rows drawn by a seeded permutation of its own RNG stream.

    The same ``(n, fraction, seed)`` gives the same split on every device, so each client can drop
    the validation rows before partitioning and the coordinator can evaluate on exactly them.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"cannot carve a validation split out of {n} samples")
    k = min(max(int(round(fraction * n)), 1), n - 1)
    perm = np.random.default_rng([seed, _TAG_VALIDATION]).permutation(n)
    return np.sort(perm[k:]).astype(np.int64), np.sort(perm[:k]).astype(np.int64)


def local_test_indices(train_labels, test_labels, seed: int = 0, index: int = 0,
                       size: int | None = None, num_clients: int | None = None) -> np.ndarray:
    """A client's personalised test subset following its train shard's class distribution.

    ``train_labels`` are the labels of the client's own train shard; ``test_labels`` those of
    the whole test split. ``size`` defaults to ``len(test_labels) // num_clients`` (or to the
    shard size when ``num_clients`` is None), capped by what each class holds. Sampling is
    without replacement within a client, seeded by ``(seed, index)``; different clients may
    share test samples.
    """
    train_labels, test_labels = _labels(train_labels), _labels(test_labels)
    if len(train_labels) == 0:
        return np.empty(0, dtype=np.int64)
    if size is None:
        size = len(test_labels) // num_clients if num_clients else len(train_labels)
    size = min(size, len(test_labels))
    classes = np.arange(max(train_labels.max(), test_labels.max(initial=0)) + 1)
    share = np.bincount(train_labels, minlength=len(classes)) / len(train_labels)
    want = _apportion(share, size)
    rng = np.random.default_rng([seed, index, _TAG_LOCAL_TEST])
    picks = []
    for k in np.flatnonzero(want):
        pool = np.flatnonzero(test_labels == k)
        picks.append(rng.choice(pool, size=min(int(want[k]), len(pool)), replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.empty(0, np.int64)


def _apportion(share: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``share`` (largest remainder)."""
    raw = share * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - counts.sum()
    if rest > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
    return counts


TEST_TAG = 1 << 20  # RNG stream for capping the server test split (client streams use their index)


def seeded_subset(indices: np.ndarray, limit: int | None, seed: int, tag: int) -> np.ndarray:
    """A seeded, sorted subset of at most ``limit`` indices (what a data spec's ``limit`` means)."""
    if limit is None or len(indices) <= limit:
        return indices
    rng = np.random.default_rng([seed, tag])
    return np.sort(rng.choice(indices, size=limit, replace=False))
