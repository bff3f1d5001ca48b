"""Candidate edges of stochastic edge addition: each cell's k nearest not-yet-linked cells of its block."""

import numpy as np
import pytest
from scipy import sparse

from sigmma_sc.data._build import candidate_edges


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


def _brute_all(group, exclude):
    n = group.size
    ex = (exclude + exclude.T).toarray() != 0
    same = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
    ok = same & ~ex & ~np.eye(n, dtype=bool)
    return set(zip(*(a.tolist() for a in np.nonzero(ok)), strict=True))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_pairs", [1, 50, 1 << 20])
def test_all_pairs_match_brute_force(seed, max_pairs):
    from sigmma_sc.data._build import all_pair_edges

    _, group, exclude = _layout(seed)
    out = all_pair_edges(group, exclude, max_pairs=max_pairs)
    assert out.dtype == np.int64
    got = list(map(tuple, out.T.tolist()))
    assert got == sorted(got)  # sorted by source then target, no duplicates
    assert set(got) == _brute_all(group, exclude)
    assert len(set(got)) == len(got)


def test_all_pairs_memory_is_bounded_by_the_chunk():
    """The chunk's temporaries cost <= ~64 bytes per pair of the chunk (docstring: ~48), whatever the group sizes."""
    import tracemalloc

    from sigmma_sc.data._build import all_pair_edges

    rng = np.random.default_rng(0)
    n = 3000
    group = np.repeat(np.arange(3), n // 3)  # 3 groups of 1000 cells: ~3 M pairs
    # exclude most pairs, so that the output is small and the chunk's temporaries show
    rows, cols = np.nonzero(group[:, None] == group[None, :])
    keep = rng.random(rows.size) < 0.9
    exclude = sparse.csr_matrix((np.ones(keep.sum(), np.int8), (rows[keep], cols[keep])), shape=(n, n))
    ref = all_pair_edges(group, exclude, max_pairs=1 << 30)
    peaks = {}
    for max_pairs in (1, 20_000, 1 << 30):  # one row (1000 pairs) per chunk, 20 rows, everything at once
        tracemalloc.start()
        out = all_pair_edges(group, exclude, max_pairs=max_pairs)
        peaks[max_pairs] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(out, ref)
    assert peaks[20_000] - peaks[1] <= 64 * 20_000 + (1 << 20)
    assert peaks[1 << 30] - peaks[1] >= 32 * 3_000_000  # one chunk of all ~3 M pairs costs far more


def test_bundle_with_the_papers_candidate_rule():
    """``build_bundle(candidates="all")``: every pair inside a meso block / tile is a candidate at one scale."""
    from _section import make_section

    import sigmma_sc as sg
    from sigmma_sc._constants import GRID
    from sigmma_sc.data._build import build_bundle
    from sigmma_sc.nn._edges import block_ids

    sdata = make_section(n_cells=600, image_px=256)
    sg.pp.tile(sdata, image_key="he", tile_size_um=16.0, pixel_size_um=0.5)
    sg.pp.cell_graph(sdata, n_comps=5)
    with pytest.raises(ValueError, match="candidates"):
        build_bundle(sdata, candidates="radius", require_image_features=False)
    knn, _ = build_bundle(sdata, require_image_features=False)
    full, _ = build_bundle(sdata, candidates="all", require_image_features=False)
    assert full.meta["candidates"] == "all"
    n = full.n_cells
    tile = full._cell_tile
    micro = block_ids(full.pos, tile, GRID["micro"])
    meso = block_ids(full.pos, tile, GRID["meso"])
    src, dst = full.edge_index
    micro_linked = set(zip(*[a.tolist() for a in full.edge_index[:, micro[src] == micro[dst]]], strict=True))
    micro_linked |= {(v, u) for u, v in micro_linked}
    pairs = {(u, v) for u in range(n) for v in range(n) if u != v and tile[u] == tile[v]}
    meso_pairs = {p for p in pairs if meso[p[0]] == meso[p[1]]} - micro_linked
    got_meso = set(zip(*[a.tolist() for a in full.cand_meso], strict=True))
    got_macro = set(zip(*[a.tolist() for a in full.cand_macro], strict=True))
    assert got_meso == meso_pairs
    assert got_macro == pairs - micro_linked - meso_pairs
    assert full.cand_meso.shape[1] > knn.cand_meso.shape[1]
