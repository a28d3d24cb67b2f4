"""Partition properties: disjoint, covering, deterministic, sane sizes, skew, local test split."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpara.data.partition import (
    dirichlet,
    dirichlet_assignment,
    iid,
    local_test_indices,
    parse_scheme,
    partition,
    shards,
)

torch.set_num_threads(1)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _all(labels, scheme, clients, seed):
    return [partition(labels, scheme, clients, i, seed) for i in range(clients)]


def _labels(n, classes, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@st.composite
def problems(draw):
    classes = draw(st.integers(1, 12))
    clients = draw(st.integers(1, 12))
    n = draw(st.integers(clients * 10, 600))
    seed = draw(st.integers(0, 2**32 - 1))
    return _labels(n, classes, seed % 1000), clients, seed


@FAST
@given(problems(), st.sampled_from(["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:100"]))
def test_disjoint_covering_deterministic(problem, scheme):
    labels, clients, seed = problem
    parts = _all(labels, scheme, clients, seed)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)  # cover, disjoint
    for i, part in enumerate(parts):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)  # sorted, unique
        np.testing.assert_array_equal(part, partition(labels, scheme, clients, i, seed))
    sizes = [len(p) for p in parts]
    if scheme == "iid":
        assert max(sizes) - min(sizes) <= 1
    else:
        assert min(sizes) >= min(10, len(labels) // clients)  # guaranteed minimum


@FAST
@given(problems(), st.integers(1, 3))
def test_shards_disjoint_covering(problem, k):
    labels, clients, seed = problem
    parts = _all(labels, f"shards:{k}", clients, seed)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= k  # shards differ by at most one sample each


def test_seed_changes_split():
    labels = _labels(1000, 10)
    assert not np.array_equal(iid(labels, 10, 0, seed=0), iid(labels, 10, 0, seed=1))
    a = dirichlet(labels, 10, 0, seed=0, alpha=0.5)
    b = dirichlet(labels, 10, 0, seed=1, alpha=0.5)
    assert not np.array_equal(a, b)


def _classes_per_client(labels, parts, frac=0.9):
    """How many classes cover ``frac`` of each client's samples."""
    out = []
    for p in parts:
        counts = np.sort(np.bincount(labels[p], minlength=10))[::-1]
        out.append(int(np.searchsorted(np.cumsum(counts), frac * len(p)) + 1))
    return np.array(out)


def test_dirichlet_small_alpha_is_skewed():
    labels = np.repeat(np.arange(10), 600)  # balanced 6000 samples
    skewed = _classes_per_client(labels, _all(labels, "dirichlet:0.1", 20, 0))
    uniform = _classes_per_client(labels, _all(labels, "dirichlet:1000", 20, 0))
    iid_ = _classes_per_client(labels, _all(labels, "iid", 20, 0))
    assert skewed.mean() <= 4 and uniform.mean() >= 8 and iid_.mean() >= 8


def test_shards_give_few_classes():
    labels = np.repeat(np.arange(10), 600)
    parts = _all(labels, "shards:2", 100, 3)
    per_client = [len(np.unique(labels[p])) for p in parts]
    assert max(per_client) <= 4 and np.mean(per_client) <= 2.5
    assert all(len(p) == 60 for p in parts)


def test_dirichlet_minimum_needs_rebalance():
    # 30 samples, 3 clients, one class, tiny alpha: resampling alone rarely succeeds.
    labels = np.zeros(30, dtype=np.int64)
    owner = dirichlet_assignment(labels, 3, alpha=1e-3, seed=0, min_size=10)
    assert np.bincount(owner, minlength=3).tolist() == [10, 10, 10]


@pytest.mark.parametrize("call, message", [
    (lambda l: iid(l, 0, 0), "num_clients"),
    (lambda l: iid(l, 4, 4), "index must be in 0..3"),
    (lambda l: iid(l, 101, 0), "cannot be split"),
    (lambda l: shards(l, 60, 0, shards_per_client=2), "exceeds 100"),
    (lambda l: dirichlet(l, 5, 0, alpha=0.5, min_size=30), "min_size"),
    (lambda l: dirichlet(l.astype(float), 5, 0, alpha=0.5), "integer"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(_labels(100, 10))


@pytest.mark.parametrize("text, message", [
    ("dirichlet", "ALPHA"), ("dirichlet:-1", "> 0"), ("dirichlet:nan", "> 0"),
    ("dirichlet:x", "float"), ("shards:0", "K >= 1"), ("shards:1.5", "integer"),
    ("iid:3", "no argument"), ("zipf:1", "unknown partition 'zipf:1'"),
])
def test_parse_scheme_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_scheme(text)


def test_parse_scheme_round_trip():
    for text in ("iid", "dirichlet:0.5", "shards:2", "natural"):
        assert str(parse_scheme(text)) == text


def test_local_test_follows_train_distribution():
    train = np.repeat(np.arange(10), 600)
    test = np.repeat(np.arange(10), 100)
    shard = dirichlet(train, 10, 4, seed=0, alpha=0.3)
    local = local_test_indices(train[shard], test, seed=0, index=4, size=200)
    assert len(np.unique(local)) == len(local) and local.max() < len(test)
    want = np.bincount(train[shard], minlength=10) / len(shard)
    got = np.bincount(test[local], minlength=10) / len(local)
    assert np.abs(want - got).max() < 0.05 + 1 / len(local)
    assert set(np.unique(test[local])) <= set(np.unique(train[shard]))
    np.testing.assert_array_equal(local, local_test_indices(train[shard], test, 0, 4, size=200))
    assert not np.array_equal(local, local_test_indices(train[shard], test, 1, 4, size=200))
    default = local_test_indices(train[shard], test, 0, 4, num_clients=10)
    assert abs(len(default) - 100) <= 10
