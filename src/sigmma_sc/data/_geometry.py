"""Tile geometry shared by tiling, graphs and bundles: grid positions, block ids, k-NN restricted to groups.

:func:`sigmma_sc.pp.tile` writes each cell's tile and block ids with these functions; everything downstream
reads what it wrote (or, for grids shifted in memory, calls the same functions), so the geometry is defined once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.spatial import cKDTree

from .._constants import GRID


def grid_position(
    xy: np.ndarray, origin: tuple[float, float], size: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each point on a grid of ``size`` squares from ``origin``, clipped to ``shape`` (rows, cols)."""
    col = np.floor((xy[:, 0] - origin[0]) / size).astype(np.int64)
    row = np.floor((xy[:, 1] - origin[1]) / size).astype(np.int64)
    return np.clip(row, 0, shape[0] - 1), np.clip(col, 0, shape[1] - 1)


def block_ids(
    xy: np.ndarray, row: np.ndarray, col: np.ndarray, origin: tuple[float, float], size: float, grid: int
) -> np.ndarray:
    """Row-major id of each point's block on a ``grid`` x ``grid`` partition of its tile (0 .. grid**2 - 1).

    ``row``/``col`` are the points' tile positions from :func:`grid_position` on the grid of ``size`` squares
    from ``origin``; points on a block border belong to the block right of / below it, as for tiles. The model's
    ``sigmma_sc.nn._edges.block_ids`` (torch, from float32 positions inside the tile) is the same map except
    within float32 precision of a border (tested in ``tests/data/test_records.py``).
    """
    x0 = origin[0] + col * size
    y0 = origin[1] + row * size
    bx = np.clip(np.floor((xy[:, 0] - x0) / (size / grid)), 0, grid - 1).astype(np.int64)
    by = np.clip(np.floor((xy[:, 1] - y0) / (size / grid)), 0, grid - 1).astype(np.int64)
    return by * grid + bx


def grid_cells(
    xy: np.ndarray, valid: np.ndarray, origin: tuple[float, float], size: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each point's square of a grid and the points per square: the grid assignment of tiling and shifted grids.

    Returns ``(row, col, grid_id, counts)``: the position of each point (:func:`grid_position`), its row-major
    square ``row * cols + col`` (``-1`` where ``valid`` is False) and the number of valid points per square.
    """
    row, col = grid_position(xy, origin, size, shape)
    grid_id = np.where(valid, row * shape[1] + col, -1)
    counts = np.bincount(grid_id[grid_id >= 0], minlength=shape[0] * shape[1])
    return row, col, grid_id, counts


def tile_of_points(grid_id: np.ndarray, kept: np.ndarray, n_squares: int) -> np.ndarray:
    """Tile index of each point: the rank of its square among the ``kept`` squares (ascending), ``-1`` elsewhere."""
    tile_of_grid = np.full(n_squares, -1, dtype=np.int64)
    tile_of_grid[kept] = np.arange(kept.size)
    return np.where(grid_id >= 0, tile_of_grid[np.maximum(grid_id, 0)], -1)


def cell_blocks(
    xy: np.ndarray, row: np.ndarray, col: np.ndarray, origin: tuple[float, float], size: float, tile: np.ndarray
) -> dict[str, np.ndarray]:
    """Micro and meso block (:func:`block_ids` on the 4x4 / 2x2 grids) of each point, ``-1`` where ``tile < 0``."""
    tiled = tile >= 0
    return {s: np.where(tiled, block_ids(xy, row, col, origin, size, GRID[s]), -1) for s in ("micro", "meso")}


def separate_groups(xy: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translate each group of points far from the others, for one KD-tree over all groups.

    Returns the translated coordinates and each point's group index (0 .. n_groups - 1). Groups are placed on a
    line 3 spans apart, so a cross-group pair is at least 2 spans apart: farther than any same-group pair.
    """
    gi = pd.factorize(group)[0]
    lo = pd.DataFrame(xy).groupby(gi, sort=True).min().to_numpy()
    shifted = np.asarray(xy, dtype=np.float64) - lo[gi]  # coordinates relative to each group's corner
    span = float(shifted.max()) + 1.0 if shifted.size else 1.0
    shifted[:, 0] += gi.astype(np.float64) * 3.0 * span
    return shifted, gi


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
    shifted, _ = separate_groups(pts, g)
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
