"""``sg.tl.retrieve``: cross-modal tile retrieval with a trained model's embeddings (image -> ST, ST -> image)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._constants import SCALES, Keys
from .._utils._validate import get_table
from ..data._records import EmbeddingRun

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_KEYS = ("image", "st")
_CHUNK = 4096


def retrieve(
    sdata: SpatialData,
    *,
    query: Literal["image", "st"] = "image",
    scale: str = "macro",
    k: int = 5,
    tile_key: str = Keys.TILE_TABLE,
    reference: SpatialData | None = None,
    reference_tile_key: str | None = None,
    query_tiles: Sequence[str] | Sequence[int] | np.ndarray | None = None,
    use_rep: str = Keys.PREFIX,
) -> pd.DataFrame:
    """For each query tile, the ``k`` closest tiles of the other modality, by cosine similarity.

    With ``query='image'`` the image embeddings of ``sdata``'s tiles (e.g. an H&E section without
    transcriptomics, embedded with ``sg.tl.embed(sdata, model, table_key=None)``) are matched against the
    ST embeddings of ``reference``'s tiles; ``query='st'`` goes the other way. Both sections must be
    embedded with the same model.

    Parameters
    ----------
    sdata
        Query section, processed by :func:`sigmma_sc.tl.embed`.
    query
        Modality of the query tiles: ``'image'`` (retrieve ST tiles) or ``'st'`` (retrieve image tiles).
    scale
        Scale of the embeddings (``'micro'``, ``'meso'`` or ``'macro'``).
    k
        Hits per query tile.
    tile_key
        Tile table of ``sdata``.
    reference
        Section searched (default: ``sdata`` itself).
    reference_tile_key
        Tile table of ``reference`` (default: ``tile_key``).
    query_tiles
        Query tiles, as tile-table names (``'tile_12'``) or integer positions (default: all tiles).
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run of both sections (default ``'sigmma'``).

    Returns
    -------
    Tidy table with one row per (query, hit): ``query`` and ``hit`` (tile-table names), ``query_index``
    and ``hit_index`` (row positions in the query / reference tile tables), ``rank`` (1 = best) and
    ``score`` (cosine similarity). When ``reference`` is ``sdata``, ``is_pair`` tells whether the hit is
    the query tile itself (its true cross-modal partner). Nothing is written.
    """
    if query not in _KEYS:
        raise ValueError(f"`query` must be 'image' or 'st', got {query!r}.")
    if scale not in SCALES:
        raise ValueError(f"`scale` must be one of {SCALES}, got {scale!r}.")
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"`k` must be a positive integer, got {k!r}.")
    same = reference is None or reference is sdata
    reference = sdata if reference is None else reference
    reference_tile_key = reference_tile_key or tile_key
    target = "st" if query == "image" else "image"
    q_tiles = get_table(sdata, tile_key)
    r_tiles = get_table(reference, reference_tile_key)
    Q = _embedding(q_tiles, query, scale, tile_key, "the query section", use_rep)
    R = _embedding(r_tiles, target, scale, reference_tile_key, "the reference section", use_rep)
    if Q.shape[1] != R.shape[1]:
        raise ValueError(
            f"Query embeddings have {Q.shape[1]} dimensions, reference embeddings {R.shape[1]}; embed both "
            "sections with the same model."
        )
    rows = _positions(q_tiles, query_tiles)
    valid_r = np.flatnonzero(np.isfinite(R).all(1))
    if valid_r.size == 0:
        raise ValueError("The reference section has no finite embeddings to retrieve from.")
    k = min(int(k), valid_r.size)
    Qn, Rn = _unit(Q[rows]), _unit(R[valid_r])
    hits = np.empty((rows.size, k), dtype=np.int64)
    scores = np.empty((rows.size, k), dtype=np.float32)
    for start in range(0, rows.size, _CHUNK):
        sim = Qn[start : start + _CHUNK] @ Rn.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < sim.shape[1] else np.tile(np.arange(k), (len(sim), 1))
        top_s = np.take_along_axis(sim, top, 1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        hits[start : start + _CHUNK] = valid_r[np.take_along_axis(top, order, 1)]
        scores[start : start + _CHUNK] = np.take_along_axis(top_s, order, 1)
    q_names = q_tiles.obs_names.to_numpy()[rows]
    out = pd.DataFrame(
        {
            "query": np.repeat(q_names, k),
            "query_index": np.repeat(rows, k),
            "rank": np.tile(np.arange(1, k + 1), rows.size),
            "hit": r_tiles.obs_names.to_numpy()[hits.ravel()],
            "hit_index": hits.ravel(),
            "score": scores.ravel(),
        }
    )
    if same:
        out["is_pair"] = out["query_index"].to_numpy() == out["hit_index"].to_numpy()
    logger.info("Retrieved the top %d %s tiles for %d %s query tiles (%s scale).", k, target, rows.size, query, scale)
    return out


def _embedding(tiles: AnnData, modality: str, scale: str, tile_key: str, what: str, use_rep: str) -> np.ndarray:
    key = EmbeddingRun.resolve(tiles, use_rep).keys[modality].get(scale, Keys.embedding(use_rep)[modality][scale])
    if key not in tiles.obsm:
        hint = (
            "run `sg.tl.embed(sdata, model)` first (with `table_key=None` for an image-only section)"
            if modality == "image"
            else "run `sg.tl.embed(sdata, model)` with the cell table first (ST embeddings need transcriptomics)"
        )
        raise KeyError(f"Tile table {tile_key!r} of {what} lacks `.obsm[{key!r}]`; {hint}.")
    return np.asarray(tiles.obsm[key], dtype=np.float32)


def _positions(tiles: AnnData, query_tiles) -> np.ndarray:
    if query_tiles is None:
        return np.arange(tiles.n_obs)
    arr = np.atleast_1d(np.asarray(query_tiles))
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < -tiles.n_obs or arr.max() >= tiles.n_obs):
            raise IndexError(f"`query_tiles` positions must be in [0, {tiles.n_obs}).")
        return np.where(arr < 0, arr + tiles.n_obs, arr).astype(np.int64)
    pos = tiles.obs_names.get_indexer(arr.astype(str))
    if (pos < 0).any():
        raise KeyError(f"Tiles {list(arr[pos < 0][:5])} are not in the tile table (names like {tiles.obs_names[0]!r}).")
    return pos.astype(np.int64)


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.nan_to_num(X, nan=0.0)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
