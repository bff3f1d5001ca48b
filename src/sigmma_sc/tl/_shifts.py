"""Cell embeddings averaged over shifted tile grids (``sg.tl.embed(..., shifts=...)``).

Micro-scale message passing stops at the micro-block borders (the neighbour-patch constraint) and every
scale stops at the tile borders, so a cell's embedding depends on where the grid cuts its neighbourhood.
Embedding the cells again under grids offset by fractions of a micro block, and averaging each cell's
embeddings, removes that dependence on the grid's phase.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._constants import GRID, SPLITS, Keys
from .._utils._record import graph_record, tiling_keys
from .._utils._validate import get_table
from ..data._bundle import build_bundle
from ..data._geometry import block_ids, grid_position, knn_within_tiles
from ..data._tiles import tile_params

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel

logger = logging.getLogger(__name__)


def check_shifts(shifts: int | Sequence[Sequence[float]] | None) -> list[tuple[float, float]] | None:
    """Validate ``shifts`` and return them as ``(dx, dy)`` pairs (fractions of a micro block), or ``None``.

    An integer ``n`` stands for the ``n x n`` offsets ``(i / n, j / n)``, ``i, j = 0 .. n - 1``.

    Returns
    -------
    The list of ``(dx, dy)`` pairs, each in ``[0, 1)``, or ``None`` for ``shifts=None``.
    """
    if shifts is None:
        return None
    fix = (
        "Pass `shifts=None`, a positive integer n (the n x n offsets i/n of a micro block), or a sequence of "
        "distinct (dx, dy) pairs in [0, 1) (fractions of a micro block, e.g. [(0, 0), (0.5, 0.5)])"
    )
    if isinstance(shifts, bool):
        raise TypeError(f"`shifts` must not be a bool, got {shifts!r}. {fix}.")
    if isinstance(shifts, int | np.integer):
        if shifts < 1:
            raise ValueError(f"`shifts` as an integer must be >= 1, got {shifts}. {fix}.")
        n = int(shifts)
        return [(i / n, j / n) for j in range(n) for i in range(n)]
    try:
        pairs = np.asarray(shifts, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`shifts` could not be read as (dx, dy) pairs: {shifts!r}. {fix}.") from e
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"`shifts` must be a non-empty sequence of (dx, dy) pairs, got shape {pairs.shape}. {fix}.")
    if not np.isfinite(pairs).all() or (pairs < 0).any() or (pairs >= 1).any():
        raise ValueError(f"Every shift must lie in [0, 1) (a fraction of a micro block), got {pairs.tolist()}. {fix}.")
    if len(np.unique(pairs, axis=0)) != len(pairs):
        raise ValueError(f"`shifts` holds the same offset twice: {pairs.tolist()}. {fix}.")
    return [(float(dx), float(dy)) for dx, dy in pairs]


def shifted_cell_embeddings(
    sdata: SpatialData,
    model: SigmmaModel,
    shifts: Sequence[tuple[float, float]],
    *,
    table_key: str,
    tile_key: str,
    batch_size: int,
    graph_key: str = Keys.PREFIX,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each cell's mean embedding over tile grids shifted by ``shifts`` (fractions of a micro block).

    For every shift the tiled cells (tile ``>= 0``) are assigned to the tiles of the grid of
    :func:`sigmma_sc.pp.tile` moved by ``(dx, dy)`` micro blocks towards the top left, the 6-NN graph is built
    within the new tiles as :func:`sigmma_sc.pp.cell_graph` does (same ``n_neighs``, same node features), and
    the model embeds them; nothing is written into ``sdata``. Tiles with fewer than the tiling's ``min_cells``
    cells are skipped, so a cell is averaged over the shifts whose tiling holds it.

    Returns
    -------
    Scale -> ``(n_obs, out_dim)`` mean embeddings (NaN for untiled cells), and the number of shifts averaged
    per cell ``(n_obs,)``.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata import SpatialData as _SpatialData

    params = tile_params(sdata, tile_key)
    cells = get_table(sdata, table_key)
    graph = graph_record(cells, graph_key, table_key)
    feats_key = graph["features_key"]
    tkeys = tiling_keys(params)
    tiled = cells.obs[tkeys["cell_tile"]].to_numpy().astype(np.int64) >= 0
    xy = np.asarray(cells.obsm[tkeys["cell_spatial"]], dtype=np.float64)
    view_keys = Keys.tiling(Keys.PREFIX, params["image_key"])  # the in-memory views use the default names
    # rebuilt per shift below, so not stale on the shifted tiling: drop the original tiling's fingerprint
    view_graph = {**{k: v for k, v in graph.items() if k != "tiling"}, "keys": Keys.graph(Keys.PREFIX) | {"features": feats_key}}
    size = float(params["tile_size"])
    block = size / GRID["micro"]
    x_min, y_min = params["grid_origin"]
    n_rows, n_cols = (int(v) + 1 for v in params["grid_shape"])  # one more row/column covers the shifted edge
    min_cells = max(int(params.get("min_cells", 1)), 1)
    var = pd.DataFrame(index=cells.var_names.copy())

    sums: dict[str, np.ndarray] = {}
    count = np.zeros(cells.n_obs, dtype=np.int64)
    for dx, dy in shifts:
        origin = (x_min - dx * block, y_min - dy * block)
        row, col = grid_position(xy, origin, size, (n_rows, n_cols))
        grid_id = np.where(tiled, row * n_cols + col, -1)
        n_in = np.bincount(grid_id[tiled], minlength=n_rows * n_cols)
        kept = np.flatnonzero(n_in >= min_cells)
        tile_of_grid = np.full(n_rows * n_cols, -1, dtype=np.int64)
        tile_of_grid[kept] = np.arange(kept.size)
        tile = np.where(grid_id >= 0, tile_of_grid[np.maximum(grid_id, 0)], -1)
        conn, _ = knn_within_tiles(xy, tile, int(graph["n_neighs"]))

        tiles = ad.AnnData(
            obs=pd.DataFrame(
                {
                    Keys.TILE_X0: origin[0] + (kept % n_cols) * size,
                    Keys.TILE_Y0: origin[1] + (kept // n_cols) * size,
                    Keys.SPLIT: pd.Categorical([SPLITS[0]] * kept.size, categories=list(SPLITS)),
                },
                index=[str(i) for i in range(kept.size)],
            )
        )
        view_params = {**params, "key_added": Keys.PREFIX, "keys": view_keys}
        tiles.uns[Keys.PREFIX] = {"tile": {**view_params, "grid_origin": [float(origin[0]), float(origin[1])]}}
        obs = {view_keys["cell_tile"]: tile}
        for scale, key in view_keys["cell_blocks"].items():  # blocks of the shifted grid, as sg.pp.tile defines them
            obs[key] = np.where(tile >= 0, block_ids(xy, row, col, origin, size, GRID[scale]), -1)
        shifted = ad.AnnData(
            obs=pd.DataFrame(obs, index=cells.obs_names.copy()),
            var=var,
            obsm={feats_key: cells.obsm[feats_key], view_keys["cell_spatial"]: xy},
            obsp={view_graph["keys"]["connectivities"]: sparse.csr_matrix(conn)},
            uns={Keys.PREFIX: {"cell_graph": view_graph}},
        )
        view = _SpatialData(tables={tile_key: tiles, table_key: shifted})
        bundle, rows = build_bundle(view, table_key=table_key, tile_key=tile_key, require_image_features=False)
        _, z_cell = model.encode_st(bundle, batch_size=batch_size)
        for s, z in z_cell.items():
            if s not in sums:
                sums[s] = np.zeros((cells.n_obs, z.shape[1]), dtype=np.float64)
            sums[s][rows] += z.numpy()
        count[rows] += 1
        logger.info("Embedded %d cells under the grid shifted by (%.3g, %.3g) micro blocks.", rows.size, dx, dy)

    means = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for s, total in sums.items():
            mean = (total / count[:, None]).astype(np.float32)
            mean[count == 0] = np.nan
            means[s] = mean
    return means, count
