"""Grid artefacts in per-cell embeddings: do neighbouring cells differ more across a block border than inside one?

SIGMMA embeds cells tile by tile: micro-scale message passing stops at micro-block borders and every scale at
tile borders, so two touching cells on either side of a border can get different embeddings because of the
grid, not the tissue. :func:`grid_artefact` measures it on spatial nearest-neighbour cell pairs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import GRID, SCALES, Keys
from .._utils._record import embedding_keys, missing_embedding, tiling_keys
from .._utils._validate import get_table
from ..data._tiles import tile_params

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

#: pair-length bins within which pairs across a border are compared with pairs inside a block
N_LENGTH_BINS = 8
#: offset of the control grid, in micro blocks (not a phase of the section's grid, nor of regular shifts)
CONTROL_OFFSET = 0.375


def grid_artefact(
    sdata: SpatialData,
    *,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    use_rep: str = Keys.PREFIX,
    scale: str | tuple[str, ...] = SCALES,
    n_neighs: int = 6,
    closest: float = 0.25,
    control_offset: float = CONTROL_OFFSET,
) -> pd.DataFrame:
    """Cosine distance of neighbouring cells' embeddings across a block border, relative to inside one block.

    Spatial ``n_neighs``-nearest-neighbour pairs of the tiled cells (over the whole section, ignoring tiles) are
    restricted to the ``closest`` fraction of shortest pairs, so that pairs across a border are not farther apart
    than pairs inside a block. At each scale, the pairs whose two cells lie in different blocks of that scale
    (micro: different 32 µm micro blocks for 128 µm tiles; meso: different meso blocks; macro: different tiles)
    are compared with the pairs inside one micro block (both cells share every block): ``ratio`` is the mean cosine
    distance of their embeddings across over inside, at matched pair lengths (pairs binned by length, each bin's
    inside mean weighted by its share of the pairs across, since longer pairs cross borders more often); 1 means the
    embedding does not see the grid. The same ratio on a control grid offset by ``control_offset`` micro blocks,
    which the model never saw, shows what tissue structure alone gives; ``excess`` is ``ratio / ratio_control``.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.tl.embed`.
    table_key
        Cell table.
    tile_key
        Tile table (its grid: origin and tile size).
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run, or a full ``.obsm`` key of cell embeddings
        (scanpy's meaning; with ``{scale}`` for several scales).
    scale
        Scale(s) to measure.
    n_neighs
        Spatial neighbours per cell.
    closest
        Fraction of the shortest pairs kept, in ``(0, 1]``.
    control_offset
        Offset of the control grid, in micro blocks (in ``(0, 1)``).

    Returns
    -------
    One row per scale: ``ratio``, ``ratio_control``, ``excess``, the mean cosine distances ``d_inside`` and
    ``d_across`` and the numbers of pairs ``n_inside`` and ``n_across``.
    """
    scales = (scale,) if isinstance(scale, str) else tuple(scale)
    if not scales or set(scales) - set(SCALES):
        raise ValueError(f"`scale` must be among {SCALES}, got {scale!r}.")
    if not 0 < closest <= 1:
        raise ValueError(f"`closest` is a fraction of the pairs in (0, 1], got {closest!r}.")
    if not 0 < control_offset < 1:
        raise ValueError(f"`control_offset` is a fraction of a micro block in (0, 1), got {control_offset!r}.")
    params = tile_params(sdata, tile_key)
    cells = get_table(sdata, table_key)
    tkeys = tiling_keys(params)
    recorded = embedding_keys(cells, use_rep, "cell", scales)
    rep = {}
    for s in scales:
        key = recorded.get(s, use_rep.format(scale=s))
        if key not in cells.obsm:
            raise missing_embedding(table_key, use_rep, cells, "cell embeddings")
        rep[s] = np.asarray(cells.obsm[key], dtype=np.float64)

    tiled = cells.obs[tkeys["cell_tile"]].to_numpy().astype(np.int64) >= 0
    xy_all = np.asarray(cells.obsm[tkeys["cell_spatial"]], dtype=np.float64)
    idx = np.flatnonzero(tiled & np.all([np.isfinite(z).all(1) for z in rep.values()], axis=0))
    if idx.size < n_neighs + 2:
        raise ValueError(f"Only {idx.size} tiled cells have an embedding; too few to measure a grid artefact.")
    pairs, dist = _knn_pairs(xy_all[idx], n_neighs)
    keep = dist <= np.quantile(dist, closest)
    pairs, dist = idx[pairs[keep]], dist[keep]
    edges = np.quantile(dist, np.linspace(0, 1, N_LENGTH_BINS + 1)[1:-1])
    length_bin = np.searchsorted(edges, dist, side="right")
    size = float(params["tile_size"])
    origin = np.asarray(params["grid_origin"], dtype=np.float64)
    same = _same_blocks(xy_all, pairs, origin, size)
    same_ctrl = _same_blocks(xy_all, pairs, origin - control_offset * size / GRID["micro"], size)

    rows = []
    for s in scales:
        d = _cosine_distance(rep[s], pairs)
        ratio = _ratio(d, same, s, length_bin)
        ctrl = _ratio(d, same_ctrl, s, length_bin)
        rows.append({
            "scale": s,
            "ratio": ratio,
            "ratio_control": ctrl,
            "excess": ratio / ctrl if ctrl > 0 else float("nan"),
            "d_inside": float(d[same["micro"]].mean()),
            "d_across": float(d[~same[s]].mean()),
            "n_inside": int(same["micro"].sum()),
            "n_across": int((~same[s]).sum()),
        })  # fmt: skip
    out = pd.DataFrame(rows).set_index("scale")
    logger.info("Grid artefact (across/inside, %d pairs): %s", len(pairs), out["ratio"].round(3).to_dict())
    return out


def _knn_pairs(xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected spatial k-NN pairs ``(P, 2)`` and their lengths."""
    from scipy.spatial import cKDTree

    _, nbrs = cKDTree(xy).query(xy, k=k + 1)
    i = np.repeat(np.arange(len(xy)), k)
    j = nbrs[:, 1:].ravel()
    pairs = np.unique(np.sort(np.c_[i, j], axis=1), axis=0)
    pairs = pairs[(pairs[:, 0] != pairs[:, 1]) & (pairs[:, 1] < len(xy))]
    return pairs, np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)


def _same_blocks(xy: np.ndarray, pairs: np.ndarray, origin: np.ndarray, size: float) -> dict[str, np.ndarray]:
    """Scale -> whether both cells of each pair lie in one block of that scale (macro: one tile)."""
    rel = xy - origin
    a, b = pairs[:, 0], pairs[:, 1]
    out = {}
    for s in SCALES:
        cell = np.floor(rel / (size / GRID[s])).astype(np.int64)
        out[s] = (cell[a] == cell[b]).all(1)
    return out


def _cosine_distance(z: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return 1.0 - np.einsum("ij,ij->i", zn[pairs[:, 0]], zn[pairs[:, 1]])


def _ratio(d: np.ndarray, same: dict[str, np.ndarray], scale: str, length_bin: np.ndarray) -> float:
    """Mean distance across over inside, the inside means of each length bin weighted as the pairs across."""
    inside, across = same["micro"], ~same[scale]
    n_bins = int(length_bin.max(initial=0)) + 1
    n_in = np.bincount(length_bin[inside], minlength=n_bins)
    n_ac = np.bincount(length_bin[across], minlength=n_bins)
    ok = (n_in > 0) & (n_ac > 0)  # bins with both kinds of pairs
    if not ok.any():
        return float("nan")
    sum_in = np.bincount(length_bin[inside], weights=d[inside], minlength=n_bins)
    sum_ac = np.bincount(length_bin[across], weights=d[across], minlength=n_bins)
    expected = float((n_ac[ok] * sum_in[ok] / n_in[ok]).sum())
    return float(sum_ac[ok].sum() / expected) if expected > 0 else float("nan")
