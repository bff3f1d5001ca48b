"""Dimensional collapse of tile embeddings: participation ratio and mean pairwise cosine on held-out tiles (issue 25)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from .._constants import Keys
from ..train._diagnostics import COLLAPSE_COSINE, COLLAPSE_PR, mean_pairwise_cosine, participation_ratio
from ._retrieval import split_mask, tile_table

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def embedding_collapse(
    sdata: SpatialData | AnnData,
    keys: str | Sequence[str],
    *,
    split: Literal["train", "val", "test"] = "val",
    tile_key: str = Keys.TILE_TABLE,
) -> pd.DataFrame:
    """How many directions tile embeddings use: participation ratio and mean pairwise cosine per embedding.

    The participation ratio ``(sum l)^2 / sum l^2`` over the eigenvalues ``l`` of the embeddings' covariance is the
    effective number of dimensions (1: every tile on one line; ``dim``: variance spread evenly); the mean cosine
    of all pairs of distinct tiles says whether the embeddings fill the sphere (about 0) or crowd in one cone
    (close to 1). An embedding counts as ``collapsed`` by the thresholds of the training diagnostics (mean
    cosine above 0.95 or participation ratio below 2), the check behind the warning of
    :func:`sigmma_sc.tl.train_sigmma`. Score held-out tiles: on training tiles a model can spread embeddings it
    has memorised.

    Parameters
    ----------
    sdata
        SpatialData object holding the tile table, or the tile table itself.
    keys
        ``.obsm`` key(s) of the tile table, each scored on its own (e.g. ``"X_sigmma_macro_image"``).
    split
        Tiles scored (``.obs['split']``; tiles without cells are left out).
    tile_key
        Tile table.

    Returns
    -------
    One row per key: ``key``, ``participation_ratio``, ``mean_cosine``, ``dim`` (embedding width), ``n_tiles``
    and ``collapsed`` (bool).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("Pass at least one `.obsm` key in `keys`.")
    tiles = tile_table(sdata, tile_key)
    missing = [k for k in keys if k not in tiles.obsm]
    if missing:
        raise KeyError(
            f"No `.obsm` keys {missing} in the tile table (it has {sorted(tiles.obsm)}); run `sg.tl.embed` first "
            "or pass existing keys."
        )
    mask = split_mask(tiles, split)
    rows = []
    for key in keys:
        z = torch.as_tensor(np.asarray(tiles.obsm[key], dtype=np.float64)[mask])
        pr, cos = participation_ratio(z), mean_pairwise_cosine(z)
        rows.append(
            {
                "key": key,
                "participation_ratio": pr,
                "mean_cosine": cos,
                "dim": int(z.shape[1]),
                "n_tiles": int(z.shape[0]),
                "collapsed": bool(cos > COLLAPSE_COSINE or pr < COLLAPSE_PR),
            }
        )
    out = pd.DataFrame(rows)
    logger.info("Embedding collapse on %d %s tiles:\n%s", int(mask.sum()), split, out.to_string(index=False))
    return out
