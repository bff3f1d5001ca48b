"""SpatialData -> :class:`~sigmma_sc.model.TrainingBundle`: the only bridge to the pure-torch model."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from .._constants import GRID, SCALES, SPLIT_BUFFER, SPLITS, Keys
from .._utils._json import jsonable
from .._utils._record import graph_record, tiling_keys
from .._utils._validate import check_graph_tiling, get_table, require_obs
from ._geometry import separate_groups
from ._tiles import tile_params, tile_reader

#: the fields of :class:`~sigmma_sc.nn.BackboneInfo` a model records (``SigmmaConfig.backbone_info``)
BACKBONE_INFO = ("name", "num_features", "input_size", "mean", "std", "is_vit")

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model import TrainingBundle

logger = logging.getLogger(__name__)


def candidate_edges(
    xy: np.ndarray, group: np.ndarray, k: int, exclude: sparse.spmatrix, *, chunk: int = 65_536
) -> np.ndarray:
    """Candidate edges for stochastic edge addition: each cell's ``k`` nearest cells of its group not yet linked to it.

    For every cell with a group ``>= 0``, the ``min(k, available)`` nearest other cells of the same group that
    are not linked to it in ``exclude`` (in either direction); ``available`` is the number of such cells. The
    selections are then made undirected (a pair chosen by either end appears in both directions), so a cell
    can end up with more than ``k`` candidate partners but never with fewer than ``min(k, available)``.

    One cKDTree over all cells, groups translated apart so that a cell of another group is never nearer than
    one of the same group (as for the tile graphs of :func:`~sigmma_sc.pp.cell_graph`). A cell with ``d`` excluded partners
    is queried for its ``k + d + 1`` nearest points, which must contain its ``k`` nearest allowed ones (or
    every allowed cell of a smaller group); cells are queried in chunks of similar ``d``, so memory stays
    ``O(chunk * (k + max d))``.

    Parameters
    ----------
    xy
        ``(N, 2)`` cell coordinates.
    group
        ``(N,)`` group of each cell (a meso block or a tile); cells with a negative group get no candidates.
    k
        Candidates chosen by each cell.
    exclude
        ``(N, N)`` sparse matrix of the pairs already linked (any non-zero entry, either direction).
    chunk
        Cells per KD-tree query.

    Returns
    -------
    ``(2, E)`` int64 edges holding both directions of every candidate pair, without self loops or duplicates,
    sorted by source then target.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    group = np.asarray(group)
    n = xy.shape[0]
    empty = np.empty((2, 0), dtype=np.int64)
    valid = np.flatnonzero(group >= 0)
    if k < 1 or valid.size < 2:
        return empty
    ex = sparse.coo_matrix(exclude)
    nz = ex.data != 0
    r0, c0 = ex.row[nz].astype(np.int64), ex.col[nz].astype(np.int64)
    ex_key = _sorted_unique(np.concatenate([r0 * n + c0, c0 * n + r0]))  # both directions
    degree = np.bincount(ex_key // n, minlength=n)

    m = valid.size
    shifted, gi = separate_groups(xy[valid], group[valid])  # cross-group pairs are >= 2 spans apart
    tree = cKDTree(shifted)
    need = np.minimum(k + 1 + degree[valid], m)
    order = np.argsort(need, kind="stable")
    rows_out, cols_out = [], []
    for start in range(0, m, chunk):
        q = order[start : start + chunk]  # rows into `valid`, ascending need
        kq = int(need[q[-1]])
        _, nbrs = tree.query(shifted[q], k=kq, workers=-1)
        nbrs = nbrs.reshape(q.size, kq)
        ok = (nbrs < m) & (nbrs != q[:, None])
        nb = np.minimum(nbrs, m - 1)
        ok &= gi[nb] == gi[q][:, None]
        src = valid[q].astype(np.int64)[:, None]
        dst = valid[nb].astype(np.int64)
        key = src * n + dst
        pos = np.minimum(np.searchsorted(ex_key, key), max(ex_key.size - 1, 0))
        if ex_key.size:
            ok &= ex_key[pos] != key
        ok &= np.cumsum(ok, axis=1) <= k
        rows_out.append(np.broadcast_to(src, ok.shape)[ok])
        cols_out.append(dst[ok])
    r = np.concatenate(rows_out)
    c = np.concatenate(cols_out)
    if r.size == 0:
        return empty
    key = _sorted_unique(np.concatenate([r * n + c, c * n + r]))
    return np.vstack([key // n, key % n]).astype(np.int64)


CANDIDATE_RULES = ("knn", "all")


def all_pair_edges(group: np.ndarray, exclude: sparse.spmatrix, *, max_pairs: int = 1 << 20) -> np.ndarray:
    """The paper's candidate rule (§3.2, neighbour-patch constraint): every pair of cells of the same group.

    Every ordered pair ``(u, v)``, ``u != v``, of cells sharing a group ``>= 0`` (a meso block or a tile) that is
    not linked in ``exclude`` (either direction). The pairs are generated a chunk of cells at a time, each chunk
    holding at most ``max_pairs`` pairs (or one cell's row when that is longer), so the temporaries stay
    ``O(max_pairs)`` (about 48 bytes per pair: 48 MiB at the default) whatever the section's or a group's size;
    the result holds ``E = sum_g n_g (n_g - 1)`` minus the excluded pairs (about 5,000 meso and 15,000 macro pairs
    per 128 µm tile of 140 cells) and assembling it takes about ``48 E`` bytes more (keys, sort, rows).

    Parameters
    ----------
    group
        ``(N,)`` group of each cell; cells with a negative group get no candidates.
    exclude
        ``(N, N)`` sparse matrix of the pairs already linked (any non-zero entry, either direction).
    max_pairs
        Pairs generated per chunk.

    Returns
    -------
    ``(2, E)`` int64 edges holding both directions of every candidate pair, sorted by source then target.
    """
    group = np.asarray(group)
    n = group.size
    empty = np.empty((2, 0), dtype=np.int64)
    valid = np.flatnonzero(group >= 0)
    if valid.size < 2:
        return empty
    ex = sparse.coo_matrix(exclude)
    nz = ex.data != 0
    r0, c0 = ex.row[nz].astype(np.int64), ex.col[nz].astype(np.int64)
    ex_key = _sorted_unique(np.concatenate([r0 * n + c0, c0 * n + r0]))
    order = valid[np.argsort(group[valid], kind="stable")]  # cells by group, then by index
    g_sorted = group[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    sizes = np.diff(np.r_[starts, order.size])
    # rows (cells) in sorted order with their group's start and size; chunks of rows with <= max_pairs pairs
    row_size = np.repeat(sizes, sizes)
    row_start = np.repeat(starts, sizes)
    cum = np.cumsum(row_size)
    out = []
    lo = 0
    while lo < order.size:
        base = cum[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, base + max_pairs, side="right")))
        rs, rstart = row_size[lo:hi], row_start[lo:hi]
        total = int(rs.sum())
        first = np.repeat(np.cumsum(rs) - rs, rs)  # offset of each pair's row inside the chunk
        col_pos = np.repeat(rstart, rs) + (np.arange(total) - first)
        src = np.repeat(order[lo:hi], rs).astype(np.int64)
        dst = order[col_pos].astype(np.int64)
        keep = src != dst
        key = src[keep] * n + dst[keep]
        if ex_key.size:
            pos = np.minimum(np.searchsorted(ex_key, key), ex_key.size - 1)
            key = key[ex_key[pos] != key]
        out.append(key)
        lo = hi
    key = np.sort(np.concatenate(out)) if out else np.empty(0, np.int64)
    return np.vstack([key // n, key % n]).astype(np.int64) if key.size else empty


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of an int64 vector by sorting (several times faster than numpy's hash-based unique here)."""
    a = np.sort(a)
    return a[np.r_[True, a[1:] != a[:-1]]] if a.size else a


def checked_graph(
    sdata: SpatialData, *, table_key: str = "table", tile_key: str = Keys.TILE_TABLE, graph_key: str = Keys.GRAPH
) -> dict:
    """The cell graph's record, after the checks a bundle needs: tiled cells, a graph on this tiling, not stale.

    Cheap (no image is read), so :func:`sigmma_sc.tl.train_sigmma` runs it before the slow featurization.
    """
    tkeys = tiling_keys(tile_params(sdata, tile_key))
    cells = get_table(sdata, table_key)
    blocks = [tkeys["cell_blocks"][s] for s in ("micro", "meso")]
    require_obs(cells, [tkeys["cell_tile"], *blocks], table_key, "sg.pp.tile")
    graph = graph_record(cells, graph_key, table_key)
    if graph.get("tile_key", tile_key) != tile_key:
        raise ValueError(
            f"Cell graph {graph_key!r} was built on tile table {graph['tile_key']!r}, not {tile_key!r}. Build one on "
            f"this tiling: `sg.pp.cell_graph(sdata, tile_key={tile_key!r}, key_added=...)` and pass `graph_key=`."
        )
    check_graph_tiling(cells, table_key, graph, tkeys["cell_tile"])  # stale after a new sg.pp.tile: say so
    return graph


def build_bundle(
    sdata: SpatialData,
    *,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    graph_key: str = Keys.GRAPH,
    n_candidates: int | None = None,
    candidates: str = "knn",
    require_image_features: bool = True,
    include_tiles: bool = False,
) -> tuple[TrainingBundle, np.ndarray]:
    """Collect what the model needs from a tiled, graphed section into a :class:`~sigmma_sc.model.TrainingBundle`.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.pp.tile` and :func:`sigmma_sc.pp.cell_graph`.
    table_key
        Cell table.
    tile_key
        Tile table.
    graph_key
        Prefix of the cell graph in the cell table's ``.obsp``.
    n_candidates
        Candidate edges per cell for stochastic edge addition with ``candidates="knn"`` (default: the graph's
        ``n_neighs``).
    candidates
        The candidate rule of stochastic edge addition: ``"knn"`` (default: each cell's ``n_candidates`` nearest
        cells of its meso block / tile not yet linked, ``candidate_edges``) or ``"all"`` (the paper's rule:
        every not-yet-linked pair inside the meso block / tile, ``all_pair_edges``; about 10x more candidate
        edges, so more memory and time per step).
    require_image_features
        Raise if the tile table has no cached backbone features.
    include_tiles
        Also read every tile's image (``uint8 (T, C, H, W)`` at the tiling's pixel size) into the bundle, as
        backbone fine-tuning needs (``T x 3 x 256 x 256`` bytes: ~1.2 GB for 6,000 tiles).

    Returns
    -------
    The bundle, and for each of its cells (ordered by tile) the row of the cell table it came from.
    """
    from ..model import TrainingBundle

    if candidates not in CANDIDATE_RULES:
        raise ValueError(f"`candidates` must be one of {CANDIDATE_RULES}, got {candidates!r}.")
    params = tile_params(sdata, tile_key)
    tkeys = tiling_keys(params)
    tiles = get_table(sdata, tile_key)
    cells = get_table(sdata, table_key)
    graph = checked_graph(sdata, table_key=table_key, tile_key=tile_key, graph_key=graph_key)
    feats_key = graph["features_key"]

    tile_of = cells.obs[tkeys["cell_tile"]].to_numpy().astype(np.int64)
    if tile_of.max(initial=-1) >= tiles.n_obs:
        raise ValueError(
            f"Cell table {table_key!r} refers to tiles that tile table {tile_key!r} lacks; run `sg.pp.tile` again."
        )
    rows = np.flatnonzero(tile_of >= 0)
    rows = rows[np.argsort(tile_of[rows], kind="stable")]
    t = tile_of[rows]
    cell_ptr = np.zeros(tiles.n_obs + 1, dtype=np.int64)
    np.cumsum(np.bincount(t, minlength=tiles.n_obs), out=cell_ptr[1:])

    x = np.asarray(cells.obsm[feats_key], dtype=np.float32)[rows]
    xy = np.asarray(cells.obsm[tkeys["cell_spatial"]], dtype=np.float64)[rows]
    size = float(params["tile_size"])
    origin = np.c_[tiles.obs[Keys.TILE_X0].to_numpy(), tiles.obs[Keys.TILE_Y0].to_numpy()][t]
    pos = np.clip((xy - origin) / size, 0.0, np.nextafter(1.0, 0.0)).astype(np.float32)

    conn = cells.obsp[graph["keys"]["connectivities"]].tocsr()[rows][:, rows].tocoo()
    edge_index = np.vstack([conn.row, conn.col]).astype(np.int64)

    # candidate edges for stochastic edge addition (neighbour-patch constraint): same meso block / same tile
    k = int(n_candidates or graph["n_neighs"])
    blocks = [tkeys["cell_blocks"][s] for s in ("micro", "meso")]
    micro, meso = (cells.obs[b].to_numpy().astype(np.int64)[rows] for b in blocks)  # as sg.pp.tile wrote them
    same_micro = micro[conn.row] == micro[conn.col]
    n = rows.size
    micro_edges = sparse.csr_matrix(
        (np.ones(int(same_micro.sum()), dtype=np.int8), (conn.row[same_micro], conn.col[same_micro])), shape=(n, n)
    )
    meso_group = t * (GRID["meso"] ** 2) + meso
    if candidates == "all":
        cand_meso = all_pair_edges(meso_group, micro_edges)
    else:
        cand_meso = candidate_edges(xy, meso_group, k, micro_edges)
    linked = micro_edges + sparse.csr_matrix(
        (np.ones(cand_meso.shape[1], dtype=np.int8), (cand_meso[0], cand_meso[1])), shape=(n, n)
    )
    cand_macro = all_pair_edges(t, linked) if candidates == "all" else candidate_edges(xy, t, k, linked)

    image_features = None
    keys = [Keys.BACKBONE.format(scale=s) for s in SCALES]
    if all(key in tiles.obsm for key in keys):
        image_features = {s: np.asarray(tiles.obsm[key], dtype=np.float32) for s, key in zip(SCALES, keys, strict=True)}
    elif require_image_features:
        raise KeyError(
            f"Tile table {tile_key!r} has no cached backbone features; run `sg.tl.featurize` (or `sg.tl.train_sigmma`, "
            "which featurizes) first."
        )
    # 0 train, 1 val, 2 test, 3 unused ('buffer' tiles of sg.pp.tile(split_buffer=...))
    codes = {s: i for i, s in enumerate(SPLITS)} | {SPLIT_BUFFER: 3}
    split = tiles.obs[Keys.SPLIT].astype(str).map(codes).to_numpy().astype(np.int8)
    backbone = dict(tiles.uns.get(Keys.UNS, {}).get("backbone", {}))
    meta = {
        "features_key": feats_key,
        "n_features": int(x.shape[1]),
        "tile_size_um": float(params["tile_size_um"]),
        "pixel_size_um": float(params["pixel_size_um"]),
        "image_key": params["image_key"],  # image modality, checked when the model predicts on new slides
        # None when the image is not in ``sdata`` (cells embedded on their own, e.g. under shifted grids)
        "image_channels": tile_reader(sdata, tile_key).n_channels if params["image_key"] in sdata.images else None,
        "n_neighs": int(graph["n_neighs"]),
        "n_candidates": k,
        "candidates": candidates,
        "backbone": backbone.get("name"),
        "image_modality": backbone.get("modality"),
        # how the cached features were computed: a model made with SigmmaModel.from_bundle records it, so that
        # sg.tl.embed accepts these features (and refuses others)
        "backbone_pretrained": None if backbone.get("pretrained") is None else bool(backbone["pretrained"]),
        "backbone_info": jsonable({k: backbone[k] for k in BACKBONE_INFO if k in backbone}) or None,
        "var_names_hash": _hash_names(cells.var_names),
        "pca": jsonable(graph.get("pca")),
    }
    tiles_px = None
    if include_tiles:
        from .._utils._progress import track
        from ._tiles import iter_tile_images

        tiles_px = np.stack(
            list(track(iter_tile_images(sdata, tile_key=tile_key), desc="Reading tiles", total=tiles.n_obs))
        )
    bundle = TrainingBundle(
        tiles=tiles_px,
        x=x,
        cell_ptr=cell_ptr,
        pos=pos,
        edge_index=edge_index,
        cand_meso=cand_meso,
        cand_macro=cand_macro,
        image_features=image_features,
        split=split,
        meta=meta,
    )
    logger.info(
        "Bundle: %d tiles, %d cells, %d graph edges, %d meso and %d macro candidate edges.",
        tiles.n_obs, n, edge_index.shape[1], cand_meso.shape[1], cand_macro.shape[1],
    )  # fmt: skip
    return bundle, rows


def _hash_names(names) -> str:
    import hashlib

    return hashlib.sha1("\n".join(map(str, names)).encode()).hexdigest()[:16]
