"""``sg.pp.cell_graph``: per-tile k-nearest-neighbour cell graphs and node features."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree

from sigmma_sc._constants import Keys
from sigmma_sc._utils._validate import counts_matrix, get_table, require_obs, tiling_fingerprint

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def cell_graph(
    sdata: SpatialData,
    *,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    n_neighs: int = 6,
    features: str | None = None,
    n_comps: int = 50,
    layer: str | None = None,
    key_added: str = Keys.GRAPH,
    features_key: str = Keys.FEATURES,
    pca_from: Mapping[str, Any] | None = None,
    inplace: bool = True,
) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray] | None:
    """Build each tile's k-nearest-neighbour cell graph and the cells' node features.

    Every tiled cell is linked to its ``n_neighs`` nearest cells of the same tile (squidpy's
    :func:`~squidpy.gr.spatial_neighbors_knn` convention: directed rows, no self loops, unit connectivities,
    Euclidean distances in coordinate units); no edge crosses a tile border. Cells of a tile with fewer than
    ``n_neighs + 1`` cells are linked to all other cells of the tile. Untiled cells (tile ``-1``) get no edges.

    Node features are, by default, the first ``n_comps`` principal components of log-normalised counts
    (``normalize_total`` to the median library size, ``log1p``), with the PCA fitted on the cells of training
    tiles only and applied to all cells. Pass ``features='X_my_embedding'`` to use any ``.obsm`` matrix
    instead, e.g. an embedding from a single-cell or spatial foundation model.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.pp.tile`.
    table_key
        Cell table.
    tile_key
        Tile table written by :func:`sigmma_sc.pp.tile` (its split selects the cells the PCA is fitted on).
    n_neighs
        Number of neighbours of each cell.
    features
        ``.obsm`` key of precomputed node features; ``None`` computes the PCA.
    n_comps
        Number of principal components when ``features`` is ``None``.
    layer
        Layer holding raw counts (``None``: the ``layer`` given to :func:`sigmma_sc.pp.tile`, else ``.X``).
    key_added
        Prefix of the ``.obsp`` keys.
    features_key
        ``.obsm`` key the computed PCA is written to.
    pca_from
        A PCA recorded by an earlier run (``table.uns['sigmma']['cell_graph']['pca']`` of the training section,
        or ``model.meta['pca']``) to project this section's cells into the same node-feature space instead of
        fitting a new PCA; the section must hold all of its genes (its other genes are not used).
    inplace
        Write into ``sdata`` and return ``None``; otherwise return ``(connectivities, distances, features)``.

    Returns
    -------
    ``None`` if ``inplace``, else the results. In place, writes into the cell table:

    - ``.obsp['{key_added}_connectivities']`` and ``.obsp['{key_added}_distances']``: the per-tile graph.
    - ``.obsm[features_key]``: the node features (only when computed here).
    - ``.uns['sigmma']['cell_graph']``: parameters, including the ``.obsm`` key of the node features.
    """
    if not isinstance(n_neighs, int | np.integer) or n_neighs < 1:
        raise ValueError(f"`n_neighs` must be a positive integer, got {n_neighs!r}.")
    table = get_table(sdata, table_key)
    require_obs(table, [Keys.CELL_TILE], table_key, "sg.pp.tile")
    if Keys.CELL_SPATIAL not in table.obsm:
        raise KeyError(f"Table {table_key!r} lacks `.obsm[{Keys.CELL_SPATIAL!r}]`; run `sg.pp.tile` first.")
    tiles = get_table(sdata, tile_key)
    params = tiles.uns.get(Keys.UNS, {}).get("tile")
    if params is None:
        raise KeyError(f"Table {tile_key!r} is not a sigmma tile table; run `sg.pp.tile` first.")

    tile_of_cell = table.obs[Keys.CELL_TILE].to_numpy().astype(np.int64)
    xy = np.asarray(table.obsm[Keys.CELL_SPATIAL], dtype=np.float64)
    conn, dist = knn_within_tiles(xy, tile_of_cell, n_neighs)

    if features is None:
        train_tiles = np.flatnonzero(tiles.obs[Keys.SPLIT].to_numpy() == "train")
        fit_mask = np.isin(tile_of_cell, train_tiles)
        if layer is None:  # the counts pp.tile summed
            layer = params.get("layer")
        else:
            layer = str(layer)
        counts = counts_matrix(table, layer, table_key, check_integer=layer != params.get("layer"))
        if pca_from is None:
            pca = fit_log_pca(counts, fit_mask, n_comps)
            pca["var_names"] = table.var_names.astype(str).to_numpy()
        else:
            pca = dict(pca_from)
            names = np.asarray(pca["var_names"]).astype(str)
            section = pd.Index(table.var_names.astype(str))
            col = section.get_indexer(names)
            if (col < 0).any() or section.has_duplicates:
                raise ValueError(
                    "The genes of this section differ from those of `pca_from` "
                    f"({int((col < 0).sum())} of its {names.size} genes are missing); node features must share one "
                    "space. Subset both sections to the shared genes or use `features=` with a shared embedding."
                )
            if names.size != section.size or not (col == np.arange(col.size)).all():
                counts = counts[:, col]  # a cohort PCA over shared genes: project on those, in its order
                logger.info(
                    "Projecting on the %d genes of `pca_from`; %d other gene(s) of this section are not used.",
                    names.size, section.size - names.size,
                )  # fmt: skip
        X = apply_log_pca(counts, pca)
        feature_source = features_key
    else:
        if features not in table.obsm:
            raise KeyError(
                f"No `.obsm[{features!r}]` in table {table_key!r}; available: {sorted(table.obsm)}. "
                "Pass `features=None` to compute PCA features."
            )
        X = np.asarray(table.obsm[features], dtype=np.float32)
        if X.ndim != 2 or X.shape[0] != table.n_obs:
            raise ValueError(f"`.obsm[{features!r}]` must be a (n_cells, n_features) matrix, got shape {X.shape}.")
        if not np.isfinite(X[tile_of_cell >= 0]).all():
            raise ValueError(f"`.obsm[{features!r}]` has NaN or infinite values for tiled cells; fill or drop them.")
        feature_source = features

    _warn_isolated(conn, tile_of_cell)
    if not inplace:
        return conn, dist, X
    table.obsp[Keys.connectivities(key_added)] = conn
    table.obsp[Keys.distances(key_added)] = dist
    if features is None:
        table.obsm[features_key] = X
    uns = dict(table.uns.get(Keys.UNS, {}))
    uns["cell_graph"] = {
        "n_neighs": int(n_neighs),
        "features_key": feature_source,
        "n_features": int(X.shape[1]),
        "n_comps": int(X.shape[1]) if features is None else None,
        "layer": layer if features is None else None,
        "pca": pca if features is None else None,
        "key_added": key_added,
        "tile_key": tile_key,
        "tiling": tiling_fingerprint(tile_of_cell),  # a later sg.pp.tile makes this graph stale (check_graph)
        "distance_unit": f"{params['coordinate_system']} units ({params['um_per_unit']} µm)",
    }
    table.uns[Keys.UNS] = uns
    logger.info(
        "Wrote cell table %r .obsp[%r, %r]%s: %d edges over %d tiled cells.",
        table_key, Keys.connectivities(key_added), Keys.distances(key_added),
        f" and .obsm[{features_key!r}]" if features is None else "", conn.nnz, int((tile_of_cell >= 0).sum()),
    )  # fmt: skip
    return None


def _warn_isolated(conn: sparse.csr_matrix, tile_of_cell: np.ndarray) -> None:
    """A WARNING with the share of tiled cells that have no graph edge (alone in their tile)."""
    tiled = tile_of_cell >= 0
    if not tiled.any():
        return
    isolated = tiled & (np.diff(conn.indptr) == 0)
    share = isolated.sum() / tiled.sum()
    if share >= 0.01:
        n_tiles = np.unique(tile_of_cell[isolated]).size
        logger.warning(
            "%d of %d tiled cells (%.1f%%) have no graph edge: they are alone in their tile (%d tiles), so message "
            "passing cannot reach them. Use a larger `tile_size_um`, or drop such tiles with `min_cells=2` in "
            "`sg.pp.tile`.",
            int(isolated.sum()), int(tiled.sum()), 100 * share, n_tiles,
        )  # fmt: skip


def knn_within_tiles(
    xy: np.ndarray, tile_of_cell: np.ndarray, k: int, *, group: np.ndarray | None = None
) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """Directed k-NN graph of points restricted to groups (tiles, or finer blocks via ``group``).

    One KD-tree query over all points: each group is translated far away from the others, so that
    neighbours from another group are never closer than same-group ones, and any that are returned for
    small groups are removed. Points with a negative group get no edges.
    """
    groups = tile_of_cell if group is None else group
    n = xy.shape[0]
    valid = np.flatnonzero(groups >= 0)
    if valid.size < 2:
        empty = sparse.csr_matrix((n, n), dtype=np.float32)
        return empty, empty.copy()
    pts = xy[valid]
    g = groups[valid]
    import pandas as pd

    gi = pd.factorize(g)[0]
    lo = pd.DataFrame(pts).groupby(gi, sort=True).min().to_numpy()
    shifted = pts - lo[gi]  # coordinates relative to each group's corner
    span = float(shifted.max()) + 1.0
    # groups are placed on a line, 3 spans apart: a cross-group pair is >= 2 spans apart, farther than any same-group pair
    shifted[:, 0] += gi.astype(np.float64) * 3.0 * span
    m = valid.size
    kq = min(k + 1, m)
    dists, nbrs = cKDTree(shifted).query(shifted, k=kq, workers=-1)
    dists, nbrs = dists.reshape(m, kq), nbrs.reshape(m, kq)
    rows = np.arange(m)[:, None]
    ok = (nbrs != rows) & (nbrs < m)
    ok &= g[np.minimum(nbrs, m - 1)] == g[:, None]
    # keep at most k neighbours per row (a duplicate point can push self out of the first slot)
    ok &= np.cumsum(ok, axis=1) <= k
    counts = np.zeros(n, dtype=np.int64)
    counts[valid] = ok.sum(1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # valid is increasing, so row-major order of `ok` is already CSR order
    indices = valid[nbrs[ok]]
    conn = sparse.csr_matrix((np.ones(indices.size, dtype=np.float32), indices, indptr), shape=(n, n))
    dist = sparse.csr_matrix((dists[ok].astype(np.float32), indices.copy(), indptr.copy()), shape=(n, n))
    return conn, dist


def _sparse_is_faster(X: sparse.csr_matrix) -> bool:
    """Sparse products beat densify-then-BLAS below ~5% non-zeros (e.g. Xenium's ~10 counts per cell)."""
    return X.nnz < 0.05 * X.shape[0] * X.shape[1]


def _log_normalise(counts: sparse.csr_matrix, target_sum: float) -> sparse.csr_matrix:
    lib = np.add.reduceat(counts.data, counts.indptr[:-1]) if counts.nnz else np.zeros(counts.shape[0])
    lib = np.where(np.diff(counts.indptr) > 0, lib, 0)  # reduceat repeats the next value for empty rows
    scale = np.divide(target_sum, lib, out=np.zeros(lib.shape, dtype=np.float64), where=lib > 0).astype(np.float32)
    data = np.log1p(counts.data * np.repeat(scale, np.diff(counts.indptr)))
    # share indices/indptr with the counts: only the values are new
    return sparse.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape, copy=False)


def _single_threaded_blas(func):
    """Run ``func`` with one BLAS thread.

    These products are small, and a multi-threaded BLAS spins badly when other processes share the cores
    (measured here: a 200x200 ``eigh`` took 0.6 s instead of ~10 ms).
    """
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return func(*args, **kwargs)

    return wrapper


@_single_threaded_blas
def fit_log_pca(
    counts: sparse.csr_matrix, fit_mask: np.ndarray, n_comps: int, *, max_cells: int = 20_000, seed: int = 0
) -> dict[str, Any]:
    """Fit a PCA of log-normalised counts on the rows in ``fit_mask``.

    Counts are scaled to the median library size of the fitted rows and ``log1p``-transformed. At most
    ``max_cells`` fitted rows (a seeded random subset) enter the covariance: the leading components of a
    20,000-cell sample match those of all cells closely, and the cost no longer grows with the section.
    Returns ``{'target_sum', 'mean', 'components'}`` (``components``: genes x comps), for :func:`apply_log_pca`.
    """
    rows = np.flatnonzero(fit_mask)
    if rows.size < 2:
        raise ValueError("Fewer than 2 cells lie in training tiles; cannot fit the PCA of node features.")
    if rows.size > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_cells, replace=False))
    sub = counts[rows]
    lib = np.asarray(sub.sum(1)).ravel()
    target = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0
    Xf = _log_normalise(sub, target)
    n_comps = int(min(n_comps, Xf.shape[1] - 1, Xf.shape[0] - 1))
    if n_comps < 1:
        raise ValueError("Too few genes or training cells for a PCA of node features; pass `features=` instead.")
    mean = np.asarray(Xf.mean(0)).ravel()
    if Xf.shape[1] <= 2000:  # exact: eigendecomposition of the gene covariance
        gram = (Xf.T @ Xf).toarray() if _sparse_is_faster(Xf) else (lambda d: d.T @ d)(Xf.toarray())
        cov = gram.astype(np.float64) / Xf.shape[0] - np.outer(mean, mean)
        _, evecs = np.linalg.eigh(cov)
        comps = evecs[:, ::-1][:, :n_comps]
    else:  # whole-transcriptome panels: randomized SVD of the centred sample
        from sklearn.utils.extmath import randomized_svd

        _, _, vt = randomized_svd(Xf.toarray() - mean, n_comps, random_state=seed)
        comps = vt.T
    # deterministic sign: the largest-magnitude loading of each component is positive
    signs = np.sign(comps[np.abs(comps).argmax(0), np.arange(n_comps)])
    comps = comps * np.where(signs == 0, 1, signs)
    return {"target_sum": target, "mean": mean.astype(np.float32), "components": comps.astype(np.float32)}


@_single_threaded_blas
def apply_log_pca(counts: sparse.csr_matrix, pca: Mapping[str, Any], *, chunk: int = 65_536) -> np.ndarray:
    """Project counts onto a PCA from :func:`fit_log_pca`.

    Panels of up to 2,000 genes are projected in dense row chunks (BLAS), larger ones as sparse products.
    """
    X = _log_normalise(counts, float(pca["target_sum"]))
    comps = np.asarray(pca["components"], dtype=np.float32)
    offset = np.asarray(pca["mean"], dtype=np.float32) @ comps
    if X.shape[1] > 2000 or _sparse_is_faster(X):
        return (np.asarray(X @ comps) - offset).astype(np.float32)
    out = np.empty((X.shape[0], comps.shape[1]), dtype=np.float32)
    for start in range(0, X.shape[0], chunk):
        out[start : start + chunk] = X[start : start + chunk].toarray() @ comps - offset
    return out
