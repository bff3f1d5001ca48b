"""Inference-time perturbations of the cell graphs: each does what it says, and a model without a graph ignores them."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from sigmma_sc._constants import GRID
from sigmma_sc.model import SigmmaModel
from sigmma_sc.model._perturb import perturb_bundle, subset_bundle
from sigmma_sc.nn._edges import block_ids


def _knn_degrees(b) -> Counter:
    """(cell, kNN group, 'in'/'out') -> degree; group 0: same micro block, 1: same meso block only, 2: other."""
    ids = {s: block_ids(b.pos, b._cell_tile, GRID[s]) for s in ("micro", "meso")}
    src, dst = b.edge_index
    group = 2 - (ids["meso"][src] == ids["meso"][dst]).long() - (ids["micro"][src] == ids["micro"][dst]).long()
    out = Counter(zip(src.tolist(), group.tolist(), ["out"] * len(src), strict=True))
    out.update(zip(dst.tolist(), group.tolist(), ["in"] * len(dst), strict=True))
    return out


def _degrees(ei: torch.Tensor) -> Counter:
    return Counter(ei[0].tolist())


def test_permute_features_keeps_each_tiles_composition(bundle):
    new, changed = perturb_bundle(bundle, "permute_features", seed=1)
    assert changed > 0.5
    ptr = bundle.cell_ptr.tolist()
    for t in range(bundle.n_tiles):
        old_rows, new_rows = bundle.x[ptr[t] : ptr[t + 1]], new.x[ptr[t] : ptr[t + 1]]
        assert torch.equal(torch.sort(old_rows, 0).values, torch.sort(new_rows, 0).values)  # same multiset
    assert not torch.equal(new.x, bundle.x)
    for name in ("pos", "edge_index", "cand_meso", "cand_macro", "cell_ptr"):
        assert torch.equal(getattr(new, name), getattr(bundle, name))


def test_no_edges_drops_every_edge(bundle):
    new, changed = perturb_bundle(bundle, "no_edges")
    assert changed == 1.0
    for name in ("edge_index", "cand_meso", "cand_macro"):
        assert getattr(new, name).shape == (2, 0)
    assert torch.equal(new.x, bundle.x)


def test_rewire_keeps_every_degree_and_moves_edges(bundle):
    new, changed = perturb_bundle(bundle, "rewire", seed=0)
    assert _knn_degrees(new) == _knn_degrees(bundle)  # in/out degree of every cell in every kNN group
    for name in ("cand_meso", "cand_macro"):
        assert _degrees(getattr(new, name)) == _degrees(getattr(bundle, name))
    old = set(map(tuple, bundle.edge_index.T.tolist()))
    moved = [e for e in map(tuple, new.edge_index.T.tolist()) if e not in old]
    # the toy tiles hold ~26 cells (under 2 per micro block, ~6 per meso block): blocks this small are nearly
    # complete graphs and allow few swaps (11% of the kNN edges move, 55% of the tile-level candidates)
    assert len(moved) > 0.05 * bundle.edge_index.shape[1]
    assert changed > 0.15
    assert not (new.edge_index[0] == new.edge_index[1]).any()
    assert len(set(map(tuple, new.edge_index.T.tolist()))) == new.edge_index.shape[1]  # no duplicates
    again, _ = perturb_bundle(bundle, "rewire", seed=0)
    assert torch.equal(again.edge_index, new.edge_index)  # seeded
    with pytest.raises(ValueError, match="must be one of"):
        perturb_bundle(bundle, "shuffle")


def test_subset_bundle_embeds_as_the_full_bundle(bundle, small_config):
    model = SigmmaModel.from_bundle(bundle, **small_config)
    idx = np.array([3, 0, 7, 12])
    full, _ = model.encode_st(bundle)
    part, _ = model.encode_st(subset_bundle(bundle, idx))
    for s in full:
        torch.testing.assert_close(part[s], full[s][idx], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["permute_features", "no_edges", "rewire"])
def test_a_model_without_graph_ignores_every_perturbation_a_gnn_does_not(bundle, small_config, kind):
    """The control: the no-graph model (mean of node features) sees only composition, so nothing changes."""
    # cells of one toy tile are near copies of the tile's latent: give them distinct features
    bundle = dataclasses.replace(bundle, x=torch.randn(bundle.x.shape, generator=torch.Generator().manual_seed(0)))
    new, _ = perturb_bundle(bundle, kind, seed=0)
    mlp = SigmmaModel.from_bundle(bundle, **small_config, use_graph=False)
    base, _ = mlp.encode_st(bundle)
    pert, _ = mlp.encode_st(new)
    for s in base:
        torch.testing.assert_close(pert[s], base[s], rtol=1e-5, atol=1e-5)
    gnn = SigmmaModel.from_bundle(bundle, **small_config, edge_addition=False)
    base, _ = gnn.encode_st(bundle)
    pert, _ = gnn.encode_st(new)
    # an untrained GNN is nearly linear, so the changes are small, but 1000x above the no-graph model's rounding
    assert float((pert["macro"] - base["macro"]).abs().max()) > 1e-4
