"""Cross-modal retrieval: Recall@p% with ``K = floor(p * N)`` (paper Suppl. D.2, eq. 3)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._constants import SCALES, SPLITS, Keys
from .._docs import doc_params, doc_tile_key, doc_use_rep
from .._utils._record import embedding_keys, missing_embedding

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.10, 0.15)


def tile_table(sdata: SpatialData | AnnData, tile_key: str = Keys.TILE_TABLE) -> AnnData:
    """The tile table: ``sdata.tables[tile_key]``, or ``sdata`` itself when it is an AnnData."""
    from anndata import AnnData

    if isinstance(sdata, AnnData):
        tiles = sdata
    else:
        tables = getattr(sdata, "tables", None)
        if tables is None:
            raise TypeError(f"Expected a SpatialData object or a tile table (AnnData), got {type(sdata).__name__}.")
        if tile_key not in tables:
            raise KeyError(f"No tile table {tile_key!r} in the SpatialData object; run `sg.pp.tile` first.")
        tiles = tables[tile_key]
    if Keys.SPLIT not in tiles.obs:
        raise KeyError(f"The tile table has no `.obs[{Keys.SPLIT!r}]`; run `sg.pp.tile` first.")
    return tiles


def split_mask(tiles: AnnData, split: str) -> np.ndarray:
    """Boolean mask of the tiles of ``split`` that hold cells."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    mask = tiles.obs[Keys.SPLIT].astype(str).to_numpy() == split
    if Keys.N_CELLS in tiles.obs:
        mask &= tiles.obs[Keys.N_CELLS].to_numpy() > 0
    if not mask.any():
        raise ValueError(f"The tile table has no {split!r} tiles with cells. {too_few_tiles_hint(tiles)}")
    return mask


def too_few_tiles_hint(tiles: AnnData) -> str:
    """The split's tile counts and the fix (smaller tiles) for errors about too few tiles."""
    counts = tiles.obs[Keys.SPLIT].astype(str).value_counts()
    split = "/".join(str(int(counts.get(s, 0))) for s in SPLITS)
    size = tiles.uns.get(Keys.UNS, {}).get("tile", {}).get("tile_size_um")
    at = f" of {size:g} µm" if size is not None else ""
    return (
        f"The section gives {tiles.n_obs} tiles{at} (train/val/test {split}): tile it with a smaller "
        "`tile_size_um` in `sg.pp.tile` (then re-run `sg.pp.cell_graph`, training and `sg.tl.embed`) so that every "
        "split holds at least 2 tiles."
    )


def recall_label(p: float) -> str:
    """Column name of Recall@p%, e.g. ``'R@5%'`` for ``p = 0.05``."""
    return f"R@{100 * p:g}%"


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def recall_at(
    query: np.ndarray,
    target: np.ndarray,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, float]:
    """Recall@p% of retrieving each query's partner among all targets by cosine similarity.

    Row ``i`` of ``query`` is paired with row ``i`` of ``target``. For each query the targets are ranked by
    cosine similarity, and the query counts as a hit when its partner is among the top ``K = floor(p * N)``
    (at least 1) of the ``N`` targets (paper eq. 3). Ties are broken uniformly at random in expectation: a
    partner tied with ``t`` other targets, ``g`` targets strictly better, scores ``clip((K - g) / (t + 1), 0, 1)``,
    so collapsed (constant) embeddings score chance level ``K / N`` rather than 0 or 1.

    Parameters
    ----------
    query
        ``(N, D)`` query embeddings.
    target
        ``(N, D')`` target embeddings; the partner of query ``i`` is target ``i``. ``D'`` must equal ``D``.
    fractions
        Fractions ``p`` in ``(0, 1]``.

    Returns
    -------
    ``{'R@5%': ..., 'R@10%': ..., ...}``, one recall in ``[0, 1]`` per fraction.
    """
    q = np.asarray(query, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if q.ndim != 2 or t.ndim != 2 or q.shape != t.shape:
        raise ValueError(f"`query` and `target` must be (N, D) arrays of the same shape, got {q.shape} and {t.shape}.")
    n = q.shape[0]
    if n < 2:
        raise ValueError(f"Retrieval needs at least 2 pairs, got {n}.")
    if not (np.isfinite(q).all() and np.isfinite(t).all()):
        raise ValueError("`query` and `target` must be finite (NaN embeddings?).")
    fractions = tuple(float(p) for p in fractions)
    if not fractions or any(not 0 < p <= 1 for p in fractions):
        raise ValueError(f"`fractions` must be in (0, 1], got {fractions}.")
    sim = _l2(q) @ _l2(t).T
    own = np.diag(sim)[:, None]
    # float32-level tolerance: similarities equal up to rounding count as ties
    tol = 1e-9 * np.maximum(1.0, np.abs(own))
    better = (sim > own + tol).sum(1)
    ties = (np.abs(sim - own) <= tol).sum(1) - 1
    out = {}
    for p in fractions:
        k = max(1, int(np.floor(p * n)))
        out[recall_label(p)] = float(np.clip((k - better) / (ties + 1), 0.0, 1.0).mean())
    return out


def available_scales(tiles: AnnData, use_rep: str = Keys.PREFIX) -> list[str]:
    """Scales whose image and ST embeddings of ``sg.tl.embed(..., key_added=use_rep)`` are both in the tile table."""
    img, st = embedding_keys(tiles, use_rep, "image"), embedding_keys(tiles, use_rep, "st")
    return [s for s in SCALES if s in img and s in st]


def paired_embeddings(
    tiles: AnnData, scales: Sequence[str], use_rep: str = Keys.PREFIX
) -> tuple[np.ndarray, np.ndarray]:
    """Image and ST embeddings of ``scales``: one scale as stored, several L2-normalised per scale and concatenated."""
    keys = {kind: embedding_keys(tiles, use_rep, kind) for kind in ("image", "st")}
    img, st = [], []
    for s in scales:
        for kind, out in (("image", img), ("st", st)):
            if s not in keys[kind]:
                raise KeyError(
                    f"Tile table has no {kind} embedding of scale {s!r} under {use_rep!r}; run "
                    f"`sg.tl.embed(sdata, model, key_added={use_rep!r})` with a model of scale {s!r}."
                )
            out.append(np.asarray(tiles.obsm[keys[kind][s]], dtype=np.float64))
    if len(scales) == 1:
        return img[0], st[0]
    return np.hstack([_l2(x) for x in img]), np.hstack([_l2(x) for x in st])


@doc_params(use_rep=doc_use_rep, tile_key=doc_tile_key)
def cross_modal_retrieval(
    sdata: SpatialData | AnnData,
    *,
    split: str = "test",
    scales: Sequence[str] | None = None,
    include_all: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    tile_key: str = Keys.TILE_TABLE,
    use_rep: str = Keys.PREFIX,
) -> pd.DataFrame:
    """Image -> ST and ST -> image retrieval of tiles of one split, per scale and for all scales together.

    Uses the tile embeddings written by :func:`sigmma_sc.tl.embed`. Only tiles of ``split`` take part, as
    queries and as candidates (``N`` = number of such tiles with cells), so ``K = floor(p * N)`` follows the
    paper's eq. 3 on the held-out tiles.

    Parameters
    ----------
    sdata
        SpatialData object holding the tile table, or the tile table itself.
    split
        ``'test'`` (report), ``'val'`` (model selection) or ``'train'``.
    scales
        Scales to evaluate (default: every scale with both image and ST embeddings).
    include_all
        Also evaluate the concatenation of the scales (scale ``'all'``; each scale's embedding L2-normalised,
        so the cosine similarity is the mean of the per-scale cosine similarities). Only with more than one scale.
    fractions
        Fractions ``p`` of Recall@p%.
    {tile_key}
    {use_rep}

    Returns
    -------
    One row per scale (``'micro'``, ``'meso'``, ``'macro'``, ``'all'``) and direction (``'image->st'``,
    ``'st->image'``), with columns ``scale``, ``direction``, ``n`` and ``R@5%``, ``R@10%``, ``R@15%``.
    """
    tiles = tile_table(sdata, tile_key)
    if scales is None:
        scales = available_scales(tiles, use_rep)
        if not scales:
            raise missing_embedding(tile_key, use_rep, tiles, "paired image/ST embeddings")
    scales = [scales] if isinstance(scales, str) else list(scales)
    bad = set(scales) - set(SCALES)
    if bad:
        raise ValueError(f"Unknown scales {sorted(bad)}; choose from {SCALES}.")
    mask = split_mask(tiles, split)
    groups = [(s, [s]) for s in scales]
    if include_all and len(scales) > 1:
        groups.append(("all", scales))
    rows = []
    for name, group in groups:
        img, st = paired_embeddings(tiles, group, use_rep)
        img, st = img[mask], st[mask]
        for direction, (q, t) in (("image->st", (img, st)), ("st->image", (st, img))):
            rows.append(
                {"scale": name, "direction": direction, "n": int(mask.sum()), **recall_at(q, t, fractions=fractions)}
            )
    return pd.DataFrame(rows)
