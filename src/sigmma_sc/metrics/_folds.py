"""Spatial k-fold probes on one section: every tile with cells is a probe's test tile once.

The section's tiles with cells are cut into ``k`` spatially contiguous strips along the section's longer axis,
holding (nearly) equal numbers of tiles. For fold ``f`` the probe is fitted on the other folds except fold
``f + 1`` (mod ``k``), which picks the paper protocol's ridge penalty, and it predicts fold ``f``. Predictions of
all folds are scored together: tile-level PCC/MSE over every tile, gene-wise PCC within each fold (each fold
selects its own genes on its own training tiles) and averaged over folds weighted by their tiles.

What it does not do: it does not retrain the embedding. A SIGMMA model trained on the section's own
train/val/test split has seen the images and cells of its training tiles, and its image embedding of those
tiles was pulled towards their ST embedding by the contrastive loss; their k-fold probe scores are not
held-out scores of the model. k-fold is therefore sound for embeddings that were not fitted on this section
(the frozen backbone, a model trained on other sections) and for comparing such embeddings; for a model
trained here, report the original split's test tiles. Retrieval is always scored on the original split.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import Keys
from ._bootstrap import FoldMetric, GenePccMetric, MeanMetric, point
from ._probe import linear_probe

if TYPE_CHECKING:
    from anndata import AnnData

logger = logging.getLogger(__name__)


def spatial_folds(tiles: AnnData, k: int) -> np.ndarray:
    """Fold of each tile: ``k`` contiguous strips of equal tile counts along the longer axis; ``-1`` without cells.

    Parameters
    ----------
    tiles
        Tile table with the tile origins ``.obs['x0']``, ``.obs['y0']`` written by :func:`sigmma_sc.pp.tile`.
    k
        Number of folds (at least 3: each fold needs training tiles and a validation fold besides itself).

    Returns
    -------
    ``(n_tiles,)`` int fold ids in ``0 .. k - 1`` (``-1`` for tiles without cells).
    """
    if int(k) < 3:
        raise ValueError(f"Spatial k-fold needs `folds >= 3` (a test, a validation and training folds), got {k}.")
    missing = [c for c in (Keys.TILE_X0, Keys.TILE_Y0) if c not in tiles.obs]
    if missing:
        raise KeyError(f"The tile table has no tile origins `.obs{missing}`; run `sg.pp.tile` first.")
    has = np.ones(tiles.n_obs, dtype=bool)
    if Keys.N_CELLS in tiles.obs:
        has = tiles.obs[Keys.N_CELLS].to_numpy() > 0
    if int(has.sum()) < 3 * int(k):
        raise ValueError(f"{int(has.sum())} tiles with cells are too few for {k} folds (at least 3 per fold).")
    xy = np.c_[tiles.obs[Keys.TILE_X0].to_numpy(float), tiles.obs[Keys.TILE_Y0].to_numpy(float)]
    axis = int(np.ptp(xy[has, 1]) > np.ptp(xy[has, 0]))
    idx = np.flatnonzero(has)
    order = idx[np.lexsort((xy[idx, 1 - axis], xy[idx, axis]))]
    fold = np.full(tiles.n_obs, -1, dtype=np.int64)
    for f, part in enumerate(np.array_split(order, int(k))):
        fold[part] = f
    return fold


def _fold_table(tiles: AnnData, keys: list[str], fold: np.ndarray, f: int, k: int) -> AnnData:
    """A light copy of the tile table whose split is fold ``f`` = test, ``f + 1`` = val, the rest train."""
    import anndata as ad

    split = np.where(fold == f, "test", np.where(fold == (f + 1) % k, "val", "train"))
    split = np.where(fold < 0, "train", split)  # tiles without cells take no part (split_mask drops them)
    obs = tiles.obs.copy()
    obs[Keys.SPLIT] = pd.Categorical(split, categories=["train", "val", "test"])
    out = ad.AnnData(X=tiles.X, obs=obs, var=tiles.var, uns={Keys.UNS: dict(tiles.uns.get(Keys.UNS, {}))})
    for key in keys:
        out.obsm[key] = tiles.obsm[key]
    return out


def kfold_probe(
    tiles: AnnData, keys: list[str], fold: np.ndarray, *, protocol: str, n_genes: int, n_components: int
) -> tuple[dict[str, float], dict[str, object]]:
    """Probe scores over all folds and their bootstrap metrics (on the tiles with ``fold >= 0``, in order).

    Returns
    -------
    The summary values (``pcc``, ``pcc_std``, ``mse``, ``mse_std``, ``gene_pcc``, ``gene_pcc_std``, ``mse_raw``,
    ``alpha`` = NaN: one per fold) and metric name -> metric (as :func:`sigmma_sc.metrics.tile_metrics`).
    """
    k = int(fold.max()) + 1
    scored = np.flatnonzero(fold >= 0)
    where = {t: i for i, t in enumerate(scored)}  # tile row -> position among the scored tiles
    n = scored.size
    pcc, mse, raw = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    gene_folds, gene_std = [], []
    for f in range(k):
        res = linear_probe(
            _fold_table(tiles, keys, fold, f, k), keys, protocol=protocol, n_genes=n_genes, n_components=n_components
        )
        pos = np.array([where[t] for t in np.flatnonzero(fold == f)])
        pcc[pos], mse[pos] = res.tile_pcc, res.tile_mse
        raw[pos] = np.mean((res.y_true - res.y_pred) ** 2, axis=1)
        cal = res.y_pred + res.train_mean if protocol == "hest" else res.y_pred
        gene_folds.append((pos, GenePccMetric(res.y_true, cal)))
        gene_std.append((pos.size, float(np.nanstd(res.gene_pcc)) if np.isfinite(res.gene_pcc).any() else np.nan))
    metrics = {
        f"{protocol}_pcc": MeanMetric(pcc),
        f"{protocol}_mse": MeanMetric(mse),
        f"{protocol}_gene_pcc": FoldMetric(gene_folds, n),
        f"{protocol}_mse_raw": MeanMetric(raw),
    }
    w = np.array([s for s, _ in gene_std], dtype=float)
    v = np.array([x for _, x in gene_std], dtype=float)
    ok = np.isfinite(v)
    values = {
        "pcc": float(np.nanmean(pcc)),
        "pcc_std": float(np.nanstd(pcc)),
        "mse": float(np.mean(mse)),
        "mse_std": float(np.std(mse)),
        "gene_pcc": point(metrics[f"{protocol}_gene_pcc"]),
        "gene_pcc_std": float(np.average(v[ok], weights=w[ok])) if ok.any() else float("nan"),
        "mse_raw": float(np.mean(raw)),
        "alpha": float("nan"),
    }
    return values, metrics
