"""``sg.pp.cell_graph``: per-tile k-nearest-neighbour cell graphs and node features."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from sigmma_sc._constants import Keys
from sigmma_sc._utils._validate import check_prefix, counts_matrix, get_table, tiling_fingerprint
from sigmma_sc._utils._write import save_output, save_outputs, save_record
from sigmma_sc.data._geometry import knn_within_tiles
from sigmma_sc.data._pca import apply_log_pca, fit_log_pca
from sigmma_sc.data._records import Tiling

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
    key_added: str = Keys.PREFIX,
    features_key: str | None = None,
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
        Stem of every key written (``Keys.graph(key_added)``, see :doc:`/keys`; default ``'sigmma'``);
        downstream functions take it as ``graph_key``.
    features_key
        ``.obsm`` key the computed PCA is written to (default ``f'{key_added}_features'``).
    pca_from
        A PCA recorded by an earlier run (``table.uns['sigmma']['cell_graph']['pca']`` of the training section,
        or ``model.meta['pca']``) to project this section's cells into the same node-feature space instead of
        fitting a new PCA; the section must hold all of its genes (its other genes are not used).
    inplace
        Write into ``sdata`` and return ``None``; otherwise return ``(connectivities, distances, features)``
        and leave ``sdata`` unchanged.

    Returns
    -------
    ``None`` if ``inplace``, else the results. In place, writes into the cell table:

    `.obsp['sigmma_connectivities' | f'{key_added}_connectivities']`
        The per-tile graph (1 for an edge).
    `.obsp['sigmma_distances' | f'{key_added}_distances']`
        Its edge lengths in coordinate-system units.
    `.obsm['sigmma_features' | features_key]`
        The node features (only when computed here).
    `.uns['sigmma' | key_added]['cell_graph']`
        Parameters, the tile table, the node-feature key and, under ``'keys'``, every key written.
    """
    if not isinstance(n_neighs, int | np.integer) or n_neighs < 1:
        raise ValueError(f"`n_neighs` must be a positive integer, got {n_neighs!r}.")
    check_prefix(key_added)
    table = get_table(sdata, table_key)
    tiling = Tiling.resolve(sdata, tile_key)
    params, tkeys, tiles = tiling.params, tiling.keys, tiling.tiles
    tile_of_cell = tiling.cell_tiles(table, table_key)
    if tkeys["cell_spatial"] not in table.obsm:
        raise KeyError(f"Table {table_key!r} lacks `.obsm[{tkeys['cell_spatial']!r}]`; run `sg.pp.tile` first.")
    gkeys = Keys.graph(key_added)
    if features_key is None:
        features_key = gkeys["features"]

    xy = np.asarray(table.obsm[tkeys["cell_spatial"]], dtype=np.float64)
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
            names = np.array([str(v) for v in np.asarray(pca["var_names"], dtype=object)])
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
    n_tiled = int((tile_of_cell >= 0).sum())
    graph = {gkeys["connectivities"]: conn, gkeys["distances"]: dist}
    save_outputs(table, "obsp", graph, table=table_key, what=f"cell graph: {conn.nnz} edges over {n_tiled} tiled cells")
    if features is None:
        save_output(table, "obsm", features_key, X, table=table_key, what="node features")
    written = {"connectivities": gkeys["connectivities"], "distances": gkeys["distances"], "features": feature_source}
    record = {
        "n_neighs": int(n_neighs),
        "features_key": feature_source,
        "n_features": int(X.shape[1]),
        "n_comps": int(X.shape[1]) if features is None else None,
        "layer": layer if features is None else None,
        "pca": pca if features is None else None,
        "key_added": key_added,
        "keys": written,
        "tile_key": tile_key,
        "tiling": tiling_fingerprint(tile_of_cell),  # a later sg.pp.tile makes this graph stale (check_graph_tiling)
        "distance_unit": f"{params['coordinate_system']} units ({params['um_per_unit']} µm)",
    }
    save_record(table, key_added, "cell_graph", record, table=table_key)
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
