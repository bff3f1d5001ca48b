"""Cell embeddings blended over shifted tile grids (``sg.tl.embed(..., shifts=...)``, on by default).

Micro-scale message passing stops at the micro-block borders (the neighbour-patch constraint) and every
scale stops at the tile borders, so a cell's embedding depends on where the grid cuts its neighbourhood.
Embedding the cells again under grids offset by up to a whole tile, and blending each cell's embeddings with
weights that fall to zero at the borders of each grid (as overlapping image tiles are blended), removes that
dependence on the grid's phase at every scale.
"""

from __future__ import annotations

import logging
import time
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

#: grids blended by default (``shifts='auto'``), chosen on the demo section (BENCHMARKS, "Cell maps")
AUTO_SHIFTS = 16
#: default time budget of the shifted passes, in seconds (``sg.tl.embed(time_budget_s=...)``)
TIME_BUDGET_S = 300.0
#: power of the tent weights (1: linear tents; higher: each cell mostly from the grids that centre it best), chosen
#: with AUTO_SHIFTS on the demo section (BENCHMARKS, "Cell maps")
BLEND_POWER = 2.0
#: floor of a cell's blending weight, so that a cell on a border of every grid still gets an embedding
MIN_WEIGHT = 1e-3
_PLASTIC = 1.324717957244746  # the R2 low-discrepancy sequence's constant (x**3 = x + 1)


def auto_shifts(n: int) -> list[tuple[float, float]]:
    """The first ``n`` offsets of the R2 low-discrepancy sequence over a whole tile, in micro blocks.

    ``(0, 0)`` (the section's own grid) comes first; each further offset is ``frac(i * (1 / g, 1 / g**2))`` of
    the tile side (``g``: the plastic number), so every prefix spreads the offsets evenly over the tile and,
    the rotation being irrational, over the phases of the meso and micro grids too.
    """
    alpha = np.array([1.0 / _PLASTIC, 1.0 / _PLASTIC**2])
    tile = float(GRID["micro"])  # a tile, in micro blocks
    out = [(0.0, 0.0)]
    for i in range(1, n):
        dx, dy = np.mod(i * alpha, 1.0) * tile
        out.append((round(float(dx), 6), round(float(dy), 6)))
    return out


def check_shifts(shifts: int | Sequence[Sequence[float]] | str | None) -> list[tuple[float, float]] | None:
    """Validate ``shifts`` and return them as ``(dx, dy)`` pairs (micro blocks, in ``[0, 4)``), or ``None``.

    An integer ``n`` stands for the first ``n`` offsets of :func:`auto_shifts`; ``'auto'`` for
    :data:`AUTO_SHIFTS` of them.

    Returns
    -------
    The list of ``(dx, dy)`` pairs, or ``None`` for ``shifts=None``.
    """
    if shifts is None:
        return None
    top = GRID["micro"]
    fix = (
        f"Pass `shifts='auto'`, `None` (the section's grid only), a positive integer n (n grids offset over the whole "
        f"tile) or a sequence of distinct (dx, dy) pairs in [0, {top}) (micro blocks, e.g. [(0, 0), (1.5, 2.5)])"
    )
    if isinstance(shifts, str):
        if shifts != "auto":
            raise TypeError(f"`shifts` could not be read as (dx, dy) pairs: {shifts!r}. {fix}.")
        return auto_shifts(AUTO_SHIFTS)
    if isinstance(shifts, bool):
        raise TypeError(f"`shifts` must not be a bool, got {shifts!r}. {fix}.")
    if isinstance(shifts, int | np.integer):
        if shifts < 1:
            raise ValueError(f"`shifts` as an integer must be >= 1, got {shifts}. {fix}.")
        return auto_shifts(int(shifts))
    try:
        pairs = np.asarray(shifts, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"`shifts` could not be read as (dx, dy) pairs: {shifts!r}. {fix}.") from e
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise ValueError(f"`shifts` must be a non-empty sequence of (dx, dy) pairs, got shape {pairs.shape}. {fix}.")
    if not np.isfinite(pairs).all() or (pairs < 0).any() or (pairs >= top).any():
        raise ValueError(
            f"Every shift must lie in [0, {top}) (micro blocks: a whole tile), got {pairs.tolist()}. {fix}."
        )
    if len(np.unique(pairs, axis=0)) != len(pairs):
        raise ValueError(f"`shifts` holds the same offset twice: {pairs.tolist()}. {fix}.")
    return [(float(dx), float(dy)) for dx, dy in pairs]


def check_time_budget(time_budget_s: float | None) -> None:
    """``time_budget_s`` is ``None`` or a positive number of seconds."""
    if time_budget_s is None:
        return
    if isinstance(time_budget_s, bool) or not isinstance(time_budget_s, int | float) or not time_budget_s > 0:
        raise ValueError(
            f"`time_budget_s` must be a positive number of seconds or None (no limit), got {time_budget_s!r}."
        )


def blend_weights(xy: np.ndarray, origin: Sequence[float], size: float, scale: str, power: float = 1.0) -> np.ndarray:
    """Blending weight of each cell under a grid: a tent over its position in its block of ``scale``.

    ``1`` at the centre of the block (macro: the tile), falling linearly to :data:`MIN_WEIGHT` at its borders, in
    x times in y, to the ``power``; so a cell's blended embedding takes little from the grids that cut its
    neighbourhood.
    """
    u = np.mod((np.asarray(xy, dtype=np.float64) - np.asarray(origin)) / (size / GRID[scale]), 1.0)
    tent = 1.0 - np.abs(2.0 * u - 1.0)
    return np.maximum((tent[:, 0] * tent[:, 1]) ** power, MIN_WEIGHT)


def shifted_cell_embeddings(
    sdata: SpatialData,
    model: SigmmaModel,
    shifts: Sequence[tuple[float, float]],
    *,
    table_key: str,
    tile_key: str,
    batch_size: int,
    graph_key: str = Keys.PREFIX,
    blend: str = "tent",
    time_budget_s: float | None = None,
    stop_at_budget: bool = False,
    power: float | None = None,
    passes: list | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each cell's embedding blended over tile grids shifted by ``shifts`` (micro blocks).

    For every shift the tiled cells (tile ``>= 0``) are assigned to the tiles of the grid of
    :func:`sigmma_sc.pp.tile` moved by ``(dx, dy)`` micro blocks towards the top left, the 6-NN graph is built
    within the new tiles as :func:`sigmma_sc.pp.cell_graph` does (same ``n_neighs``, same node features), and
    the model embeds them; nothing is written into ``sdata``. Tiles with fewer than the tiling's ``min_cells``
    cells are skipped, so a cell is blended over the shifts whose tiling holds it. ``blend='tent'`` weighs a
    cell's embedding under each grid by :func:`blend_weights` at each scale; ``'mean'`` takes the plain mean.

    After the first shift, the time of the remaining ones is estimated; if the total exceeds ``time_budget_s``,
    the shifts that fit are kept with ``stop_at_budget`` (a warning says how many), otherwise all run after a
    warning with the estimate. ``power``: of the tent weights (default :data:`BLEND_POWER`); ``passes``: a list
    that receives ``(origin, rows, {scale: embeddings})`` of every pass (for benchmarks).

    Returns
    -------
    Scale -> ``(n_obs, out_dim)`` blended embeddings (NaN for untiled cells), and the number of shifts blended
    per cell ``(n_obs,)``.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse
    from spatialdata import SpatialData as _SpatialData

    if blend not in ("tent", "mean"):
        raise ValueError(f"`blend` must be 'tent' or 'mean', got {blend!r}.")
    power = BLEND_POWER if power is None else float(power)
    params = tile_params(sdata, tile_key)
    cells = get_table(sdata, table_key)
    graph = graph_record(cells, graph_key, table_key)
    feats_key = graph["features_key"]
    tkeys = tiling_keys(params)
    tiled = cells.obs[tkeys["cell_tile"]].to_numpy().astype(np.int64) >= 0
    xy = np.asarray(cells.obsm[tkeys["cell_spatial"]], dtype=np.float64)
    view_keys = Keys.tiling(Keys.PREFIX, params["image_key"])  # the in-memory views use the default names
    # rebuilt per shift below, so not stale on the shifted tiling: drop the original tiling's fingerprint
    view_graph = {
        **{k: v for k, v in graph.items() if k != "tiling"},
        "keys": Keys.graph(Keys.PREFIX) | {"features": feats_key},
    }
    size = float(params["tile_size"])
    block = size / GRID["micro"]
    x_min, y_min = params["grid_origin"]
    n_rows, n_cols = (int(v) + 1 for v in params["grid_shape"])  # one more row/column covers the shifted edge
    min_cells = max(int(params.get("min_cells", 1)), 1)
    var = pd.DataFrame(index=cells.var_names.copy())

    sums: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    count = np.zeros(cells.n_obs, dtype=np.int64)
    start = time.perf_counter()
    n_run = len(shifts)
    for i, (dx, dy) in enumerate(shifts):
        if i >= n_run:
            break
        if i == 1 and time_budget_s is not None:
            per_shift = time.perf_counter() - start
            estimate = per_shift * len(shifts)
            if estimate > time_budget_s:
                fits = max(int(time_budget_s // max(per_shift, 1e-9)), 1)
                if stop_at_budget:
                    logger.warning(
                        "Blending %d shifted grids would take about %.0f s (%.1f s each), over `time_budget_s=%g`; "
                        "blending the first %d. The cell embeddings may show the tile grid; raise `time_budget_s` "
                        "(or pass `time_budget_s=None`) for all of them.",
                        len(shifts), estimate, per_shift, time_budget_s, fits,
                    )  # fmt: skip
                    n_run = min(fits, n_run)
                else:
                    logger.warning(
                        "%d shifted grids will take about %.0f s (%.1f s each), over `time_budget_s=%g`; running "
                        "them all as asked. Pass fewer shifts or `shifts='auto'` to stay within the budget.",
                        len(shifts), estimate, per_shift, time_budget_s,
                    )  # fmt: skip
            if i >= n_run:
                break
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
                weights[s] = np.zeros(cells.n_obs, dtype=np.float64)
            w = blend_weights(xy[rows], origin, size, s, power) if blend == "tent" else np.ones(rows.size)
            sums[s][rows] += w[:, None] * z.numpy()
            weights[s][rows] += w
        count[rows] += 1
        if passes is not None:
            passes.append((origin, rows, {s: z.numpy() for s, z in z_cell.items()}))
        logger.debug("Embedded %d cells under the grid shifted by (%.3g, %.3g) micro blocks.", rows.size, dx, dy)

    means = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for s, total in sums.items():
            mean = (total / weights[s][:, None]).astype(np.float32)
            mean[count == 0] = np.nan
            means[s] = mean
    logger.info("Blended %d shifted grids in %.1f s.", int(count.max(initial=0)), time.perf_counter() - start)
    return means, count
