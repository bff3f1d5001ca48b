"""Microenvironment (niche) labels scored against planted domains and by spatial coherence, with tile bootstraps.

:func:`spatial_coherence` is the share of spatial nearest-neighbour cell pairs whose two cells carry the same
label (1: every neighbourhood is one label; a random labelling with ``k`` equal clusters gives about ``1/k``).
:func:`microenvironment_metrics` builds metric objects for :func:`sigmma_sc.metrics.paired_bootstrap`, which
resamples tiles (with all their cells) and recomputes ARI, NMI and coherence on each resample, so that two
labellings of the same cells are compared with a paired CI, as :func:`sigmma_sc.metrics.tile_metrics` does for
tile embeddings.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Keys
from .._utils._labels import microenvironment_labels
from .._utils._validate import get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def spatial_coherence(
    sdata: SpatialData,
    *,
    key: str | None = None,
    scale: str = "macro",
    table_key: str = "table",
    spatial_key: str | None = None,
    n_neighs: int = 6,
) -> float:
    """Share of spatial ``n_neighs``-nearest-neighbour cell pairs whose two cells have the same label.

    Pairs are the unique undirected pairs of each labelled cell and its ``n_neighs`` nearest labelled cells
    (cells with a missing label are left out). A labelling that follows contiguous domains scores high; a
    labelling that changes from cell to cell scores about the share expected by chance.

    Parameters
    ----------
    sdata
        SpatialData object with a labelled cell table (e.g. by :func:`sigmma_sc.tl.microenvironments`).
    key
        Which labels: an ``.obs`` column (e.g. ``'sigmma_microenv_macro'`` or a cell-type column), or the
        ``use_rep`` of a :func:`sigmma_sc.tl.microenvironments` run whose column of ``scale`` is read (default: the
        run of ``'sigmma'``).
    scale
        Scale of the microenvironments read when ``key`` names a run.
    table_key
        Cell table.
    spatial_key
        ``.obsm`` key of the cell coordinates (``None``: ``'spatial'`` when the table has it, else the cell
        centroids :func:`sigmma_sc.pp.tile` wrote, ``.obsm['sigmma_spatial']``).
    n_neighs
        Spatial neighbours per cell.

    Returns
    -------
    The share, in ``[0, 1]``.
    """
    cells = get_table(sdata, table_key)
    key = microenvironment_labels(cells, scale=scale, key=key, table_key=table_key)[1]
    if spatial_key is None:
        tiled = Keys.tiling()["cell_spatial"]
        spatial_key = "spatial" if "spatial" in cells.obsm or tiled not in cells.obsm else tiled
    if spatial_key not in cells.obsm:
        raise KeyError(
            f"No .obsm[{spatial_key!r}] (cell coordinates) in table {table_key!r}; pass `spatial_key=` among "
            f"{list(cells.obsm)}, or run `sg.pp.tile` (it writes the cells' centroids)."
        )
    if int(n_neighs) < 1:
        raise ValueError(f"`n_neighs` must be >= 1, got {n_neighs}.")
    labels = cells.obs[key]
    ok = np.flatnonzero(labels.notna().to_numpy())
    if ok.size <= n_neighs:
        raise ValueError(f"Only {ok.size} cells have a label in .obs[{key!r}]; need more than `n_neighs`={n_neighs}.")
    xy = np.asarray(cells.obsm[spatial_key], dtype=np.float64)[ok, :2]
    pairs = neighbour_pairs(xy, int(n_neighs))
    codes = pd.Categorical(labels.to_numpy()[ok]).codes
    return float((codes[pairs[:, 0]] == codes[pairs[:, 1]]).mean())


def neighbour_pairs(xy: np.ndarray, k: int) -> np.ndarray:
    """Unique undirected spatial ``k``-nearest-neighbour pairs ``(P, 2)`` of points ``(n, 2)`` (``i < j``)."""
    from scipy.spatial import cKDTree

    k = min(int(k), len(xy) - 1)
    _, nbrs = cKDTree(xy).query(xy, k=k + 1)
    i = np.repeat(np.arange(len(xy)), k)
    j = nbrs[:, 1:].ravel()
    pairs = np.unique(np.sort(np.c_[i, j], axis=1), axis=0)
    return pairs[(pairs[:, 0] != pairs[:, 1]) & (pairs[:, 1] < len(xy))]


def _codes(x) -> np.ndarray:
    """Integer codes of labels (missing: -1)."""
    return pd.Categorical(np.asarray(x, dtype=object)).codes.astype(np.int64)


class AgreementMetric:
    """Agreement of cell labels with reference labels (ARI or NMI), recomputed on resamples of tiles.

    A resample draws tiles with replacement; each drawn tile contributes all of its cells (a tile drawn twice,
    its cells twice) to the contingency table of labels x reference, from which the score is computed. With
    every tile drawn once the score is scikit-learn's ``adjusted_rand_score`` or ``normalized_mutual_info_score``
    (arithmetic normalisation) on the cells.

    Parameters
    ----------
    labels, reference
        ``(n_cells,)`` labels to score and the reference (e.g. planted domains); missing values leave a cell out.
    tile
        ``(n_cells,)`` tile index of each cell in ``0..n_tiles-1`` (negative: left out).
    kind
        ``'ari'`` or ``'nmi'``.
    n_tiles
        Number of tiles (default ``tile.max() + 1``).
    """

    def __init__(self, labels, reference, tile, kind: str = "ari", n_tiles: int | None = None):
        if kind not in ("ari", "nmi"):
            raise ValueError(f"`kind` must be 'ari' or 'nmi', got {kind!r}.")
        a, b, t = _codes(labels), _codes(reference), np.asarray(tile, dtype=np.int64)
        if not len(a) == len(b) == len(t):
            raise ValueError(f"`labels`, `reference` and `tile` differ in length: {len(a)}, {len(b)}, {len(t)}.")
        ok = (a >= 0) & (b >= 0) & (t >= 0)
        self.kind = kind
        self.n = int(n_tiles if n_tiles is not None else t.max(initial=-1) + 1)
        na, nb = int(a.max(initial=-1)) + 1, int(b.max(initial=-1)) + 1
        cell = (a[ok] * nb + b[ok]).astype(np.int64)
        m = np.zeros((self.n, max(na * nb, 1)))
        np.add.at(m, (t[ok], cell), 1.0)
        self.m, self.na, self.nb = m, max(na, 1), max(nb, 1)  # per-tile contingency counts, flattened

    def values(self, counts: np.ndarray) -> np.ndarray:
        """The score on each resample; ``counts`` is ``(n_tiles, B)``: how often each tile was drawn."""
        nij = (self.m.T @ counts.astype(np.float64)).reshape(self.na, self.nb, -1)  # (na, nb, B)
        ai, bj = nij.sum(1), nij.sum(0)
        n = ai.sum(0)
        if self.kind == "ari":
            c2 = lambda x: x * (x - 1) / 2
            sum_ij, sum_a, sum_b, tot = c2(nij).sum((0, 1)), c2(ai).sum(0), c2(bj).sum(0), c2(n)
            with np.errstate(invalid="ignore", divide="ignore"):
                expected = sum_a * sum_b / tot
                maximum = (sum_a + sum_b) / 2
                return np.where(maximum - expected != 0, (sum_ij - expected) / (maximum - expected), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            p, pa, pb = nij / n, ai / n, bj / n
            ratio = np.where(p > 0, p / (pa[:, None, :] * pb[None, :, :]), 1.0)
            mi = np.where(p > 0, p * np.log(ratio), 0.0).sum((0, 1))
            ent = lambda q: -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(0)
            mean_h = (ent(pa) + ent(pb)) / 2
            return np.where(mean_h > 0, np.clip(mi, 0, None) / np.where(mean_h > 0, mean_h, 1.0), 1.0)


class CoherenceMetric:
    """Spatial coherence (share of neighbour pairs with one label), recomputed on resamples of tiles.

    Each pair belongs to the tile of its first cell and counts as often as that tile is drawn.

    Parameters
    ----------
    labels
        ``(n_cells,)`` labels (missing: pairs with such a cell are left out).
    pairs
        ``(P, 2)`` cell index pairs, e.g. from :func:`neighbour_pairs`.
    tile
        ``(n_cells,)`` tile index of each cell (negative: left out).
    n_tiles
        Number of tiles (default ``tile.max() + 1``).
    """

    def __init__(self, labels, pairs: np.ndarray, tile, n_tiles: int | None = None):
        a, t = _codes(labels), np.asarray(tile, dtype=np.int64)
        pairs = np.asarray(pairs, dtype=np.int64)
        ok = (a[pairs[:, 0]] >= 0) & (a[pairs[:, 1]] >= 0) & (t[pairs[:, 0]] >= 0)
        pairs = pairs[ok]
        self.n = int(n_tiles if n_tiles is not None else t.max(initial=-1) + 1)
        same = (a[pairs[:, 0]] == a[pairs[:, 1]]).astype(np.float64)
        self.same = np.bincount(t[pairs[:, 0]], weights=same, minlength=self.n)
        self.total = np.bincount(t[pairs[:, 0]], minlength=self.n).astype(np.float64)

    def values(self, counts: np.ndarray) -> np.ndarray:
        """The share on each resample; ``counts`` is ``(n_tiles, B)``."""
        w = counts.astype(np.float64)
        den = self.total @ w
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (self.same @ w) / np.where(den > 0, den, 1.0), np.nan)


def microenvironment_metrics(
    labels,
    tile,
    *,
    reference=None,
    pairs: np.ndarray | None = None,
    n_tiles: int | None = None,
) -> dict[str, object]:
    """The scores of one labelling of cells, as objects :func:`sigmma_sc.metrics.paired_bootstrap` recomputes.

    Parameters
    ----------
    labels
        ``(n_cells,)`` microenvironment labels (missing values leave a cell out).
    tile
        ``(n_cells,)`` index of each cell's tile among the tiles bootstrapped, ``0..n_tiles-1`` (negative: the
        cell is not scored, e.g. cells of validation tiles).
    reference
        ``(n_cells,)`` known labels (e.g. planted domains): ``'ARI'`` and ``'NMI'``.
    pairs
        ``(P, 2)`` spatial neighbour pairs of cells: ``'coherence'``.
    n_tiles
        Number of tiles (default ``tile.max() + 1``).

    Returns
    -------
    Metric name -> metric (``'ARI'``, ``'NMI'``, ``'coherence'`` as given); pass two such mappings over the
    same cells and tiles to :func:`sigmma_sc.metrics.paired_bootstrap` for the paired CI of their differences.
    """
    tile = np.asarray(tile, dtype=np.int64)
    n_tiles = int(n_tiles if n_tiles is not None else tile.max(initial=-1) + 1)
    if n_tiles < 1:
        raise ValueError("No cell has a tile (every `tile` is negative); nothing to score.")
    out: dict[str, object] = {}
    if reference is not None:
        out["ARI"] = AgreementMetric(labels, reference, tile, "ari", n_tiles)
        out["NMI"] = AgreementMetric(labels, reference, tile, "nmi", n_tiles)
    if pairs is not None:
        out["coherence"] = CoherenceMetric(labels, pairs, tile, n_tiles)
    if not out:
        raise ValueError("Pass `reference` (ARI, NMI) and/or `pairs` (coherence); nothing to score.")
    return out
