"""``sg.pl.retrieval_examples``: query tiles and their top cross-modal hits, as tile images with scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._constants import Keys
from .._utils._validate import get_table
from ..tl._retrieve import retrieve
from ._utils import save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_MODALITY = {"image": "image", "st": "ST"}


def retrieval_examples(
    sdata: SpatialData,
    *,
    query_tiles: Sequence[str] | Sequence[int] | None = None,
    n_queries: int = 3,
    query: Literal["image", "st"] = "image",
    scale: str = "macro",
    k: int = 5,
    tile_key: str = Keys.TILE_TABLE,
    use_rep: str = Keys.PREFIX,
    reference: SpatialData | None = None,
    reference_tile_key: str | None = None,
    split: str | None = "test",
    tile_px: int = 128,
    seed: int = 0,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Query tiles (left) and their ``k`` best hits in the other modality, shown as tile images with scores.

    One row per query: the query tile's image, then the images of the retrieved tiles (from
    ``reference``) titled with their rank and cosine similarity. When the reference is the query section,
    the query's true partner is framed in green when retrieved. Uses :func:`sigmma_sc.tl.retrieve`.

    Parameters
    ----------
    sdata
        Query section, processed by :func:`sigmma_sc.tl.embed`.
    query_tiles
        Query tiles, as tile-table names or positions (default: ``n_queries`` random tiles of ``split``).
    n_queries
        Number of random queries when ``query_tiles`` is not given.
    query
        Modality of the queries: ``'image'`` (retrieve ST tiles) or ``'st'`` (retrieve image tiles).
    scale
        Scale of the embeddings.
    k
        Hits per query.
    tile_key
        Tile table of ``sdata``.
    use_rep
        The ``key_added`` of the :func:`sigmma_sc.tl.embed` run searched (default ``'sigmma'``).
    reference
        Section searched (default: ``sdata``).
    reference_tile_key
        Tile table of ``reference`` (default: ``tile_key``).
    split
        Split the random queries are drawn from (``None`` or a split without tiles: all tiles).
    tile_px
        Side in pixels at which tile images are read for display.
    seed
        Seed of the random choice of queries.
    figsize
        Figure size in inches (default: 1.9 inch per tile).
    save
        Path to save the figure to.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` (several panels).
    """
    import matplotlib.pyplot as plt

    reference = sdata if reference is None else reference
    reference_tile_key = reference_tile_key or tile_key
    tiles = get_table(sdata, tile_key)
    if query_tiles is None:
        pool = np.arange(tiles.n_obs)
        if split is not None and Keys.SPLIT in tiles.obs:
            in_split = np.flatnonzero((tiles.obs[Keys.SPLIT] == split).to_numpy())
            pool = in_split if in_split.size else pool
        rng = np.random.default_rng(seed)
        query_tiles = np.sort(rng.choice(pool, size=min(n_queries, pool.size), replace=False))
    hits = retrieve(
        sdata,
        query=query,
        scale=scale,
        k=k,
        tile_key=tile_key,
        reference=reference,
        reference_tile_key=reference_tile_key,
        query_tiles=query_tiles,
        use_rep=use_rep,
    )
    q_rows = hits.drop_duplicates("query_index")["query_index"].to_numpy()
    k = int(hits["rank"].max())
    q_img = _read_tiles(sdata, tile_key, q_rows, tile_px)
    h_img = _read_tiles(reference, reference_tile_key, hits["hit_index"].to_numpy(), tile_px)
    target = "st" if query == "image" else "image"
    nrows, ncols = len(q_rows), k + 1
    fig, axes = plt.subplots(
        nrows, ncols, figsize=figsize or (1.9 * ncols, 2.1 * nrows), squeeze=False, layout="constrained"
    )
    for r, qi in enumerate(q_rows):
        rows = hits[hits["query_index"] == qi]
        _show(axes[r, 0], q_img[r], f"query ({_MODALITY[query]})\n{tiles.obs_names[qi]}", edge="#1f77b4")
        for c, (pos, row) in enumerate(
            zip(np.flatnonzero((hits["query_index"] == qi).to_numpy()), rows.itertuples(), strict=True), 1
        ):
            pair = bool(getattr(row, "is_pair", False))
            title = f"#{row.rank} {_MODALITY[target]} {row.hit}\ncos {row.score:.3f}" + (" (pair)" if pair else "")
            _show(axes[r, c], h_img[pos], title, edge="#2ca02c" if pair else None)
    fig.suptitle(
        f"{_MODALITY[query]} → {_MODALITY[target]} retrieval ({scale} scale): top {k} hits"
        + (" · green frame: true pair" if reference is sdata else ""),
        fontsize="medium",
    )
    save_figure(fig, save)
    return fig


def _read_tiles(sdata: SpatialData, tile_key: str, rows: np.ndarray, tile_px: int) -> list[np.ndarray]:
    from ..data._tiles import tile_params, tile_reader

    params = tile_params(sdata, tile_key)
    reader = tile_reader(sdata, tile_key)
    obs = get_table(sdata, tile_key).obs
    x0, y0 = obs[Keys.TILE_X0].to_numpy(), obs[Keys.TILE_Y0].to_numpy()
    size = float(params["tile_size"])
    return [reader.read_square(float(x0[i]), float(y0[i]), size, tile_px) for i in rows]


def _show(ax, img: np.ndarray, title: str, edge: str | None = None) -> None:
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(np.moveaxis(img[:3], 0, -1))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize="x-small")
    for spine in ax.spines.values():
        spine.set_visible(edge is not None)
        if edge is not None:
            spine.set_edgecolor(edge)
            spine.set_linewidth(3)
