"""SpatialData -> :class:`~sigmma_sc.model.TrainingBundle`: the only bridge to the pure-torch model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from .._constants import GRID, Keys
from .._utils._json import jsonable
from ._geometry import separate_groups
from ._records import CellGraph, Tiling

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
    graph = CellGraph.resolve(sdata, Tiling.resolve(sdata, tile_key), table_key=table_key, graph_key=graph_key)
    return dict(graph.record)


def bundle_from_arrays(
    *,
    x: np.ndarray,
    xy: np.ndarray,
    tile_of: np.ndarray,
    micro: np.ndarray,
    meso: np.ndarray,
    connectivities: sparse.spmatrix,
    tile_origins: np.ndarray,
    tile_size: float,
    n_candidates: int,
    candidates: str = "knn",
    split: np.ndarray | None = None,
    image_features: Mapping[str, np.ndarray] | None = None,
    tiles: np.ndarray | None = None,
    meta: Mapping[str, Any] | None = None,
) -> tuple[TrainingBundle, np.ndarray]:
    """The one array-level constructor of a :class:`~sigmma_sc.model.TrainingBundle` from per-cell arrays.

    :func:`build_bundle` (a tiled, graphed section), the shifted grids of :func:`sigmma_sc.tl.embed` (cells
    re-tiled in memory) and cohorts (through :func:`build_bundle`) all call it. It orders the tiled cells by tile,
    takes positions inside the tiles, restricts the graph to the tiled cells and draws the candidate edges of
    stochastic edge addition (neighbour-patch constraint: same meso block, same tile).

    Parameters
    ----------
    x
        ``(n_obs, F)`` node features of every cell.
    xy
        ``(n_obs, 2)`` cell centroids (coordinate-system units).
    tile_of
        ``(n_obs,)`` tile of each cell (``-1``: untiled, left out), ``< T``.
    micro, meso
        ``(n_obs,)`` block of each cell inside its tile (row-major on a 4x4 / 2x2 grid), as
        :func:`~sigmma_sc.data._geometry.cell_blocks` computes them.
    connectivities
        ``(n_obs, n_obs)`` sparse cell graph (edges inside tiles).
    tile_origins
        ``(T, 2)`` top-left corner of each tile.
    tile_size
        Tile side (coordinate-system units).
    n_candidates
        Candidate edges per cell with ``candidates='knn'``.
    candidates
        ``'knn'`` (:func:`candidate_edges`) or ``'all'`` (:func:`all_pair_edges`).
    split
        ``(T,)`` split codes (0 train, 1 val, 2 test, 3 unused; ``None``: all train).
    image_features
        Scale -> ``(T, D)`` cached backbone features, or ``None``.
    tiles
        ``uint8 (T, C, H, W)`` tile images (fine-tuning), or ``None``.
    meta
        JSON-able information recorded with the bundle.

    Returns
    -------
    The bundle, and for each of its cells (ordered by tile) its row in the per-cell arrays.
    """
    from ..model import TrainingBundle

    if candidates not in CANDIDATE_RULES:
        raise ValueError(f"`candidates` must be one of {CANDIDATE_RULES}, got {candidates!r}.")
    n_tiles = int(np.shape(tile_origins)[0])
    rows = np.flatnonzero(tile_of >= 0)
    rows = rows[np.argsort(tile_of[rows], kind="stable")]
    t = tile_of[rows]
    cell_ptr = np.zeros(n_tiles + 1, dtype=np.int64)
    np.cumsum(np.bincount(t, minlength=n_tiles), out=cell_ptr[1:])

    x = np.asarray(x, dtype=np.float32)[rows]
    xy = np.asarray(xy, dtype=np.float64)[rows]
    pos = np.clip((xy - np.asarray(tile_origins)[t]) / tile_size, 0.0, np.nextafter(1.0, 0.0)).astype(np.float32)
    conn = sparse.csr_matrix(connectivities)[rows][:, rows].tocoo()
    edge_index = np.vstack([conn.row, conn.col]).astype(np.int64)
    cand_meso, cand_macro = _candidates(xy, t, micro[rows], meso[rows], conn, n_candidates, candidates)
    bundle = TrainingBundle(
        tiles=tiles,
        x=x,
        cell_ptr=cell_ptr,
        pos=pos,
        edge_index=edge_index,
        cand_meso=cand_meso,
        cand_macro=cand_macro,
        image_features=None if image_features is None else dict(image_features),
        split=split,
        meta=dict(meta or {}),
    )
    logger.info(
        "Bundle: %d tiles, %d cells, %d graph edges, %d meso and %d macro candidate edges.",
        n_tiles, rows.size, edge_index.shape[1], cand_meso.shape[1], cand_macro.shape[1],
    )  # fmt: skip
    return bundle, rows


def _candidates(
    xy: np.ndarray, t: np.ndarray, micro: np.ndarray, meso: np.ndarray, conn: sparse.coo_matrix, k: int, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """Meso and macro candidate edges of cells ordered by tile: same meso block / same tile, not yet linked."""
    same_micro = micro[conn.row] == micro[conn.col]
    n = t.size
    micro_edges = sparse.csr_matrix(
        (np.ones(int(same_micro.sum()), dtype=np.int8), (conn.row[same_micro], conn.col[same_micro])), shape=(n, n)
    )
    meso_group = t * (GRID["meso"] ** 2) + meso
    if rule == "all":
        cand_meso = all_pair_edges(meso_group, micro_edges)
    else:
        cand_meso = candidate_edges(xy, meso_group, k, micro_edges)
    linked = micro_edges + sparse.csr_matrix(
        (np.ones(cand_meso.shape[1], dtype=np.int8), (cand_meso[0], cand_meso[1])), shape=(n, n)
    )
    cand_macro = all_pair_edges(t, linked) if rule == "all" else candidate_edges(xy, t, k, linked)
    return cand_meso, cand_macro


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
    if candidates not in CANDIDATE_RULES:
        raise ValueError(f"`candidates` must be one of {CANDIDATE_RULES}, got {candidates!r}.")
    tiling = Tiling.resolve(sdata, tile_key)
    graph = CellGraph.resolve(sdata, tiling, table_key=table_key, graph_key=graph_key)
    return bundle_from_records(
        sdata, tiling, graph, n_candidates=n_candidates, candidates=candidates,
        require_image_features=require_image_features, include_tiles=include_tiles,
    )  # fmt: skip


def bundle_from_records(
    sdata: SpatialData,
    tiling: Tiling,
    graph: CellGraph,
    *,
    n_candidates: int | None = None,
    candidates: str = "knn",
    require_image_features: bool = True,
    include_tiles: bool = False,
) -> tuple[TrainingBundle, np.ndarray]:
    """:func:`build_bundle` on resolved records: records -> arrays -> :func:`bundle_from_arrays`."""
    inputs = st_inputs(tiling, graph)
    if inputs["tile_of"].max(initial=-1) >= tiling.n_tiles:
        raise ValueError(
            f"Cell table {graph.table_key!r} refers to tiles that tile table {tiling.key!r} lacks; run `sg.pp.tile` "
            "again."
        )
    image_features = tiling.backbone_features()
    if image_features is None and require_image_features:
        raise KeyError(
            f"Tile table {tiling.key!r} has no cached backbone features; run `sg.tl.featurize` (or "
            "`sg.tl.train_sigmma`, which featurizes) first."
        )
    k = int(n_candidates or graph.n_neighs)
    tiles_px = None
    if include_tiles:
        from .._utils._progress import track
        from ._tiles import iter_tile_images

        images = iter_tile_images(sdata, tile_key=tiling.key)
        tiles_px = np.stack(list(track(images, desc="Reading tiles", total=tiling.n_tiles)))
    bundle, rows = bundle_from_arrays(
        **inputs, n_candidates=k, candidates=candidates, split=tiling.split_codes(), image_features=image_features,
        tiles=tiles_px, meta=bundle_meta(sdata, tiling, graph, n_candidates=k, candidates=candidates),
    )  # fmt: skip
    # what sg.tl.embed compares to reuse the bundle training built (see SigmmaModel.fit, tl._embed.st_bundle)
    bundle.inputs_fingerprint = inputs_fingerprint(inputs, n_candidates=k, candidates=candidates)
    bundle.cell_rows = rows
    return bundle, rows


def st_inputs(tiling: Tiling, graph: CellGraph) -> dict[str, Any]:
    """The per-cell arrays of a section that :func:`bundle_from_arrays` takes (records -> arrays)."""
    micro, meso = graph.blocks()  # as sg.pp.tile wrote them
    return {
        "x": graph.features(),
        "xy": graph.positions(),
        "tile_of": tiling.cell_tiles(graph.cells, graph.table_key),
        "micro": micro,
        "meso": meso,
        "connectivities": graph.connectivities(),
        "tile_origins": tiling.origins(),
        "tile_size": tiling.tile_size,
    }


def inputs_fingerprint(inputs: Mapping[str, Any], *, n_candidates: int, candidates: str) -> str:
    """A hash of everything :func:`bundle_from_arrays` reads for the ST side: equal hashes, equal bundles.

    Hashes the arrays of :func:`st_inputs` (node features, positions, tiles, blocks, graph, tile corners and side)
    with the candidate rule; split, image features and tile images are left out (they do not enter the ST side).
    About 10 ms per 100 MB of arrays; building the bundle draws candidate edges with KD-tree queries instead.
    """
    import hashlib

    h = hashlib.sha1(usedforsecurity=False)
    for name in ("x", "xy", "tile_of", "micro", "meso", "tile_origins"):
        a = np.ascontiguousarray(inputs[name])
        h.update(f"{name}{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    conn = sparse.csr_matrix(inputs["connectivities"])
    for a in (conn.indptr, conn.indices, conn.data):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(f"{float(inputs['tile_size'])!r}|{int(n_candidates)}|{candidates}".encode())
    return h.hexdigest()


def bundle_meta(sdata: SpatialData, tiling: Tiling, graph: CellGraph, *, n_candidates: int, candidates: str) -> dict:
    """What a bundle records of its section: node features, tiling, image modality, backbone, genes, PCA."""
    backbone = tiling.backbone()
    image_key = tiling.image_key
    return {
        "features_key": graph.features_key,
        "n_features": int(np.shape(graph.cells.obsm[graph.features_key])[1]),
        "tile_size_um": tiling.tile_size_um,
        "pixel_size_um": tiling.pixel_size_um,
        "image_key": image_key,  # image modality, checked when the model predicts on new slides
        # None when the image is not in ``sdata`` (cells embedded on their own)
        "image_channels": tiling.reader(sdata).n_channels if image_key in sdata.images else None,
        "n_neighs": graph.n_neighs,
        "n_candidates": n_candidates,
        "candidates": candidates,
        "backbone": backbone.get("name"),
        "image_modality": backbone.get("modality"),
        # how the cached features were computed: a model made with SigmmaModel.from_bundle records it, so that
        # sg.tl.embed accepts these features (and refuses others)
        "backbone_pretrained": None if backbone.get("pretrained") is None else bool(backbone["pretrained"]),
        "backbone_info": jsonable({k: backbone[k] for k in BACKBONE_INFO if k in backbone}) or None,
        "var_names_hash": _hash_names(graph.cells.var_names),
        "pca": jsonable(graph.pca),
    }


def _hash_names(names) -> str:
    import hashlib

    return hashlib.sha1("\n".join(map(str, names)).encode()).hexdigest()[:16]
