from __future__ import annotations

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import Keys
from sigmma_sc.pp._cell_graph import knn_within_tiles


@pytest.fixture
def tiled():
    sdata = make_section(n_cells=600, image_px=256, rotation_deg=10.0)
    sg.pp.tile(sdata, image_key="he", tile_size_um=16.0, min_cells=1)
    return sdata


def test_knn_matches_brute_force_within_tiles(tiled):
    sg.pp.cell_graph(tiled, n_comps=5)
    cells = tiled.tables["table"]
    conn = cells.obsp["sigmma_connectivities"].tocsr()
    dist = cells.obsp["sigmma_distances"].tocsr()
    xy = cells.obsm[Keys.tiling()["cell_spatial"]]
    tile_of = cells.obs[Keys.CELL_TILE].to_numpy()
    for t in np.unique(tile_of[tile_of >= 0]):
        idx = np.flatnonzero(tile_of == t)
        d = np.linalg.norm(xy[idx, None] - xy[None, idx], axis=-1)
        np.fill_diagonal(d, np.inf)
        k = min(6, idx.size - 1)
        for a, i in enumerate(idx):
            got = set(conn[i].indices)
            assert len(got) == k
            expected_d = np.sort(d[a])[:k]
            # same neighbour distances as brute force (ties may swap equal-distance neighbours)
            assert np.allclose(np.sort(dist[i].data), expected_d, atol=1e-4)
            assert got <= set(idx)  # no cross-tile edge
            assert i not in got  # no self loop
    # squidpy convention: unit connectivities, directed rows of k
    assert np.all(conn.data == 1.0)


def test_knn_against_squidpy_on_one_tile():
    import anndata as ad
    import squidpy as sq

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (300, 2))
    conn, dist = knn_within_tiles(xy, np.zeros(300, dtype=int), 6)
    adata = ad.AnnData(np.zeros((300, 1)), obsm={"spatial": xy})
    build = getattr(sq.gr, "spatial_neighbors_knn", None)
    if build is not None:
        build(adata, n_neighs=6)
    else:  # older squidpy
        sq.gr.spatial_neighbors(adata, coord_type="generic", n_neighs=6)
    ref = adata.obsp["spatial_connectivities"]
    assert (conn != ref).nnz == 0
    assert np.allclose(dist.toarray(), adata.obsp["spatial_distances"].toarray(), atol=1e-4)


def test_small_tiles_and_untiled_cells():
    xy = np.array([[0, 0], [1, 0], [10, 10], [11, 10], [12, 10], [50, 50.0]])
    tiles = np.array([0, 0, 1, 1, 1, -1])
    conn, _ = knn_within_tiles(xy, tiles, 6)
    dense = conn.toarray()
    assert dense[0].nonzero()[0].tolist() == [1]
    assert sorted(dense[2].nonzero()[0].tolist()) == [3, 4]
    assert dense[5].sum() == 0
    assert dense[:, 5].sum() == 0


def test_features_pca_shape_determinism_and_train_fit(tiled):
    sg.pp.cell_graph(tiled, n_comps=7)
    cells = tiled.tables["table"]
    X = cells.obsm[Keys.FEATURES]
    assert X.shape == (cells.n_obs, 7)
    assert X.dtype == np.float32
    assert np.isfinite(X).all()
    assert cells.uns["sigmma"]["cell_graph"]["features_key"] == Keys.FEATURES
    again = make_section(n_cells=600, image_px=256, rotation_deg=10.0)
    sg.pp.tile(again, image_key="he", tile_size_um=16.0)
    sg.pp.cell_graph(again, n_comps=7)
    assert np.array_equal(again.tables["table"].obsm[Keys.FEATURES], X)
    # the PCA is fitted on training cells: training-cell features are centred, components ordered by variance
    train = np.isin(cells.obs[Keys.CELL_TILE], np.flatnonzero(tiled.tables[Keys.TILE_TABLE].obs["split"] == "train"))
    assert np.allclose(X[train].mean(0), 0, atol=1e-4)
    var = X[train].var(0)
    assert np.all(np.diff(var) <= 1e-6)
    # the first PC separates the two planted expression programs
    left = cells.obsm[Keys.tiling()["cell_spatial"]][:, 0] > np.median(cells.obsm[Keys.tiling()["cell_spatial"]][:, 0])
    assert abs(X[left, 0].mean() - X[~left, 0].mean()) > 2 * X[:, 0].std() * 0.5


def test_user_features(tiled):
    cells = tiled.tables["table"]
    emb = np.random.default_rng(0).normal(size=(cells.n_obs, 12)).astype(np.float32)
    cells.obsm["X_fm"] = emb
    conn, dist, X = sg.pp.cell_graph(tiled, features="X_fm", inplace=False)
    assert np.array_equal(X, emb)
    assert "sigmma_connectivities" not in cells.obsp  # inplace=False wrote nothing
    sg.pp.cell_graph(tiled, features="X_fm")
    assert cells.uns["sigmma"]["cell_graph"]["features_key"] == "X_fm"
    assert Keys.FEATURES not in cells.obsm


def test_errors(section, tiled):
    with pytest.raises(KeyError, match=r"run `sg.pp.tile` first"):
        sg.pp.cell_graph(section)
    with pytest.raises(ValueError, match="n_neighs"):
        sg.pp.cell_graph(tiled, n_neighs=0)
    with pytest.raises(KeyError, match="X_missing.*features=None"):
        sg.pp.cell_graph(tiled, features="X_missing")
    cells = tiled.tables["table"]
    cells.obsm["X_bad"] = np.full((cells.n_obs, 3), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="NaN"):
        sg.pp.cell_graph(tiled, features="X_bad")
    assert "sigmma_connectivities" not in cells.obsp


def _log_normalised_x(sdata):
    """Counts in layer 'counts', log1p of normalised counts in `.X`, as public h5ad files often ship."""
    cells = sdata.tables["table"]
    counts = np.asarray(cells.X, dtype=np.float32)
    cells.layers["counts"] = counts.copy()
    lib = np.maximum(counts.sum(1, keepdims=True), 1)
    cells.X = np.log1p(counts / lib * 1e4).astype(np.float32)
    return counts


def test_non_integer_counts_ask_for_the_counts_layer(caplog):
    import logging

    sdata = make_section(n_cells=300)
    counts = _log_normalised_x(sdata)
    with pytest.raises(ValueError, match=r"not integers.*log-normalised.*layer='counts'"):
        sg.pp.tile(sdata, image_key="he", tile_size_um=16.0)
    assert Keys.TILE_TABLE not in sdata.tables
    del sdata.tables["table"].layers["counts"]  # nothing better to use: a warning, and the run goes on
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(sdata, image_key="he", tile_size_um=16.0)
    assert "not integers" in caplog.text
    sdata.tables["table"].layers["counts"] = counts
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.tile(sdata, image_key="he", tile_size_um=16.0, layer="counts")
    assert "not integers" not in caplog.text


def test_cell_graph_uses_the_layer_given_to_tile():
    """The PCA runs on the counts `pp.tile` summed (its `layer`), not on the log-normalised `.X`."""
    ref = make_section(n_cells=600, image_px=256)
    sg.pp.tile(ref, image_key="he", tile_size_um=16.0)
    sg.pp.cell_graph(ref, n_comps=5)
    sdata = make_section(n_cells=600, image_px=256)
    _log_normalised_x(sdata)
    sg.pp.tile(sdata, image_key="he", tile_size_um=16.0, layer="counts")
    sg.pp.cell_graph(sdata, n_comps=5)
    got = sdata.tables["table"].obsm[Keys.FEATURES]
    assert np.allclose(got, ref.tables["table"].obsm[Keys.FEATURES], atol=1e-4)
    assert sdata.tables["table"].uns["sigmma"]["cell_graph"]["layer"] == "counts"


def test_cells_without_edges_warn_with_their_share(caplog):
    import logging

    sdata = make_section(n_cells=150, image_px=256)
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.5)  # tiny tiles: many hold one cell
    tile_of = sdata.tables["table"].obs[Keys.CELL_TILE].to_numpy()
    alone = np.isin(tile_of, np.flatnonzero(np.bincount(tile_of[tile_of >= 0]) == 1)).sum()
    assert alone > 0
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.pp.cell_graph(sdata, n_comps=4)
    assert f"{alone} of {(tile_of >= 0).sum()} tiled cells" in caplog.text
    assert "no graph edge" in caplog.text
