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

from .._constants import GRID, Keys
from ..data._build import bundle_from_arrays
from ..data._geometry import cell_blocks, grid_cells, knn_within_tiles, tile_of_points
from ..data._records import CellGraph, Tiling

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import SigmmaModel, TrainingBundle

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
    if blend not in ("tent", "mean"):
        raise ValueError(f"`blend` must be 'tent' or 'mean', got {blend!r}.")
    power = BLEND_POWER if power is None else float(power)
    graph = CellGraph.resolve(sdata, Tiling.resolve(sdata, tile_key), table_key=table_key, graph_key=graph_key)
    grid = _ShiftedGrids(graph, (model.meta or {}).get("candidates", "knn"))
    n_obs = graph.cells.n_obs

    sums: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    count = np.zeros(n_obs, dtype=np.int64)
    start = time.perf_counter()
    n_run = len(shifts)
    for i, (dx, dy) in enumerate(shifts):
        if i >= n_run:
            break
        if i == 1 and time_budget_s is not None:
            n_run = _shifts_within_budget(
                time.perf_counter() - start, len(shifts), time_budget_s, stop_at_budget=stop_at_budget
            )
            if i >= n_run:
                break
        origin, bundle, rows = grid.bundle(dx, dy)
        _, z_cell = model.encode_st(bundle, batch_size=batch_size)
        for s, z in z_cell.items():
            if s not in sums:
                sums[s] = np.zeros((n_obs, z.shape[1]), dtype=np.float64)
                weights[s] = np.zeros(n_obs, dtype=np.float64)
            w = blend_weights(grid.xy[rows], origin, grid.size, s, power) if blend == "tent" else np.ones(rows.size)
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


def _shifts_within_budget(per_shift: float, n_shifts: int, time_budget_s: float, *, stop_at_budget: bool) -> int:
    """How many shifts to run after timing the first: all, or (``stop_at_budget``) those that fit the budget."""
    estimate = per_shift * n_shifts
    if estimate <= time_budget_s:
        return n_shifts
    fits = max(int(time_budget_s // max(per_shift, 1e-9)), 1)
    if stop_at_budget:
        logger.warning(
            "Blending %d shifted grids would take about %.0f s (%.1f s each), over `time_budget_s=%g`; "
            "blending the first %d. The cell embeddings may show the tile grid; raise `time_budget_s` "
            "(or pass `time_budget_s=None`) for all of them.",
            n_shifts, estimate, per_shift, time_budget_s, fits,
        )  # fmt: skip
        return min(fits, n_shifts)
    logger.warning(
        "%d shifted grids will take about %.0f s (%.1f s each), over `time_budget_s=%g`; running "
        "them all as asked. Pass fewer shifts or `shifts='auto'` to stay within the budget.",
        n_shifts, estimate, per_shift, time_budget_s,
    )  # fmt: skip
    return n_shifts


class _ShiftedGrids:
    """The tiled cells of a section re-tiled in memory under the grid of :func:`sigmma_sc.pp.tile` moved by a shift.

    The same grid assignment, kept tiles (at least the tiling's ``min_cells`` cells), block ids and per-tile k-NN
    graph as :func:`sigmma_sc.pp.tile` and :func:`sigmma_sc.pp.cell_graph` (``sigmma_sc.data._geometry``), and
    the bundle from :func:`~sigmma_sc.data._build.bundle_from_arrays`; nothing is written.
    """

    def __init__(self, graph: CellGraph, candidates: str = "knn"):
        tiling = graph.tiling
        self.graph = graph
        self.candidates = candidates  # the candidate rule of the model's training (``model.meta['candidates']``)
        self.xy = graph.positions()
        self.tiled = tiling.cell_tiles(graph.cells, graph.table_key) >= 0
        self.x = graph.features()
        self.size = tiling.tile_size
        self.block = self.size / GRID["micro"]
        self.origin = tiling.grid_origin
        self.shape = tuple(int(v) + 1 for v in tiling.grid_shape)  # one more row/column covers the shifted edge
        self.min_cells = tiling.min_cells

    def bundle(self, dx: float, dy: float) -> tuple[tuple[float, float], TrainingBundle, np.ndarray]:
        """The grid moved by ``(dx, dy)`` micro blocks towards the top left: its origin, bundle and cell rows."""
        origin = (self.origin[0] - dx * self.block, self.origin[1] - dy * self.block)
        row, col, grid_id, n_in = grid_cells(self.xy, self.tiled, origin, self.size, self.shape)
        kept = np.flatnonzero(n_in >= self.min_cells)
        tile = tile_of_points(grid_id, kept, n_in.size)
        blocks = cell_blocks(self.xy, row, col, origin, self.size, tile)
        conn, _ = knn_within_tiles(self.xy, tile, self.graph.n_neighs)
        n_cols = self.shape[1]
        origins = np.c_[origin[0] + (kept % n_cols) * self.size, origin[1] + (kept // n_cols) * self.size]
        bundle, rows = bundle_from_arrays(
            x=self.x, xy=self.xy, tile_of=tile, micro=blocks["micro"], meso=blocks["meso"], connectivities=conn,
            tile_origins=origins, tile_size=self.size, n_candidates=self.graph.n_neighs, candidates=self.candidates,
        )  # fmt: skip
        return origin, bundle, rows
