"""Candidate edges of stochastic edge addition: each cell's k nearest not-yet-linked cells of its block."""

import numpy as np
import pytest
from scipy import sparse

from sigmma_sc.data._bundle import candidate_edges


def _brute_force(xy, group, k, exclude):
    n = xy.shape[0]
    ex = (exclude + exclude.T).toarray() != 0
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    chosen, available = set(), np.zeros(n, dtype=int)
    for i in range(n):
        if group[i] < 0:
            continue
        allowed = np.flatnonzero((group == group[i]) & ~ex[i] & (np.arange(n) != i))
        available[i] = allowed.size
        for j in allowed[np.argsort(d[i, allowed])][:k]:
            chosen |= {(i, int(j)), (int(j), i)}
    return chosen, available


def _layout(seed, n=300):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, (n, 2))
    group = rng.integers(-1, 12, n)  # some ungrouped cells, groups of various sizes
    group[:3] = 50  # a group of 3 cells (fewer than k + 1)
    group[3] = 51  # a singleton
    m = 4 * n  # random links: inside groups (as kNN edges) and across them
    rows, cols = rng.integers(0, n, m), rng.integers(0, n, m)
    same = group[rows] == group[cols]
    keep = same | (rng.random(m) < 0.2)
    exclude = sparse.csr_matrix((np.ones(keep.sum(), np.int8), (rows[keep], cols[keep])), shape=(n, n))
    return xy, group, exclude


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 6])
def test_candidates_match_brute_force(seed, k):
    xy, group, exclude = _layout(seed)
    ref, available = _brute_force(xy, group, k, exclude)
    out = candidate_edges(xy, group, k, exclude, chunk=37)  # several chunks of different query sizes
    assert out.dtype == np.int64
    assert out.shape[0] == 2
    got = set(map(tuple, out.T.tolist()))
    assert len(got) == out.shape[1]  # no duplicates
    assert got == ref
    # every cell proposes min(k, available) partners of its own group, none of them already linked
    n = xy.shape[0]
    partners = np.bincount(out[0], minlength=n)
    assert (partners >= np.minimum(k, available)).all()
    assert (group[out[0]] == group[out[1]]).all()
    assert (group[out[0]] >= 0).all()
    assert not ((exclude + exclude.T).tocsr()[out[0], out[1]] != 0).any()
    assert (out[0] != out[1]).all()


def test_candidates_edge_cases():
    xy = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])  # duplicated points
    group = np.array([0, 0, 0, 0, 1])
    none = sparse.csr_matrix((5, 5))
    out = candidate_edges(xy, group, 2, none)
    assert np.bincount(out[0], minlength=5)[:4].min() >= 2
    assert (out[0] != out[1]).all()
    assert 4 not in out  # alone in its group
    assert candidate_edges(xy, group, 0, none).shape == (2, 0)
    assert candidate_edges(xy, -np.ones(5, int), 3, none).shape == (2, 0)
    full = sparse.csr_matrix(np.ones((5, 5)))
    assert candidate_edges(xy, group, 3, full).shape == (2, 0)  # everything is already linked
