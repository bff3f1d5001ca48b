"""Typed records: what ``sg.pp.tile``, ``sg.pp.cell_graph`` and ``sg.tl.embed`` wrote, resolved once from SpatialData.

A reader resolves the records it needs once, at the top (every check, with the errors that name the fix), and
passes the resolved objects down instead of keys: :class:`Tiling` (the tile table and what ``sg.pp.tile``
recorded), :class:`CellGraph` (the cell table's graph on that tiling) and :class:`EmbeddingRun` (what one
``sg.tl.embed`` run wrote). They hold references to the tables, not copies, and compare by identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import SCALES, SPLIT_BUFFER, SPLITS, Keys
from .._utils._record import embedding_keys, graph_record, read_record, tiling_keys, tiling_record
from .._utils._validate import check_graph_tiling, get_table, require_obs

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._image import ImageReader

#: split codes of a bundle: 0 train, 1 val, 2 test, 3 unused ('buffer' tiles of sg.pp.tile(split_buffer=...))
SPLIT_CODES = {s: i for i, s in enumerate(SPLITS)} | {SPLIT_BUFFER: 3}


@dataclass(frozen=True, eq=False)
class Tiling:
    """A tiling written by :func:`sigmma_sc.pp.tile`: its tile table and recorded parameters.

    Attributes
    ----------
    key
        Tile table key.
    tiles
        The tile table.
    params
        The record ``.uns[prefix]['tile']`` (parameters, as written).
    keys
        Every key the tiling wrote (``'cell_tile'``, ``'cell_blocks'``, ``'cell_spatial'``, ``'shapes'``, ...).
    """

    key: str
    tiles: AnnData = field(repr=False)
    params: Mapping[str, Any] = field(repr=False)
    keys: Mapping[str, Any] = field(repr=False)

    @classmethod
    def resolve(cls, sdata: SpatialData, tile_key: str = Keys.TILE_TABLE) -> Tiling:
        """The tiling of tile table ``tile_key``, or a ``KeyError`` saying to run ``sg.pp.tile``."""
        if tile_key not in sdata.tables:
            known = [k for k, t in sdata.tables.items() if tiling_record(t) is not None]
            hint = f" Tile tables here: {known} (pass `tile_key=`)." if known else ""
            raise KeyError(f"No tile table {tile_key!r} in the SpatialData object; run `sg.pp.tile` first.{hint}")
        tiles = sdata.tables[tile_key]
        params = tiling_record(tiles)
        if params is None:
            raise KeyError(f"Table {tile_key!r} is not a sigmma tile table; run `sg.pp.tile` first.")
        return cls(key=tile_key, tiles=tiles, params=params, keys=tiling_keys(params))

    @property
    def image_key(self) -> str:
        """The tiled image."""
        return self.params["image_key"]

    @property
    def tile_size(self) -> float:
        """Tile side in coordinate-system units."""
        return float(self.params["tile_size"])

    @property
    def tile_size_um(self) -> float:
        """Tile side in micrometres."""
        return float(self.params["tile_size_um"])

    @property
    def pixel_size_um(self) -> float:
        """Pixel size at which tiles are read."""
        return float(self.params["pixel_size_um"])

    @property
    def grid_origin(self) -> tuple[float, float]:
        """Top-left corner of the tile grid (coordinate-system units)."""
        x, y = self.params["grid_origin"]
        return float(x), float(y)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Rows and columns of the tile grid."""
        rows, cols = self.params["grid_shape"]
        return int(rows), int(cols)

    @property
    def min_cells(self) -> int:
        """Fewest cells of a kept tile (at least 1)."""
        return max(int(self.params.get("min_cells", 1)), 1)

    @property
    def n_tiles(self) -> int:
        """Number of tiles."""
        return int(self.tiles.n_obs)

    def origins(self) -> np.ndarray:
        """``(T, 2)`` top-left corner ``(x0, y0)`` of each tile."""
        obs = self.tiles.obs
        return np.c_[obs[Keys.TILE_X0].to_numpy(), obs[Keys.TILE_Y0].to_numpy()]

    def split_codes(self) -> np.ndarray:
        """``(T,)`` int8 split of each tile: 0 train, 1 val, 2 test, 3 unused (buffer)."""
        return self.tiles.obs[Keys.SPLIT].astype(str).map(SPLIT_CODES).to_numpy().astype(np.int8)

    def cell_tiles(self, cells: AnnData, table_key: str) -> np.ndarray:
        """``(n_obs,)`` int64 tile of each cell of ``cells`` (``-1``: untiled), or a ``KeyError`` naming ``sg.pp.tile``."""
        require_obs(cells, [self.keys["cell_tile"]], table_key, "sg.pp.tile")
        return cells.obs[self.keys["cell_tile"]].to_numpy().astype(np.int64)

    def backbone(self) -> dict[str, Any]:
        """How the cached backbone features were computed (``.uns['sigmma']['backbone']``; empty if none)."""
        return dict(self.tiles.uns.get(Keys.UNS, {}).get("backbone", {}))

    def backbone_features(self) -> dict[str, np.ndarray] | None:
        """Scale -> ``(T, D)`` float32 cached backbone features, or ``None`` when some scale lacks them."""
        keys = [Keys.BACKBONE.format(scale=s) for s in SCALES]
        if not all(k in self.tiles.obsm for k in keys):
            return None
        return {s: np.asarray(self.tiles.obsm[k], dtype=np.float32) for s, k in zip(SCALES, keys, strict=True)}

    def reader(self, sdata: SpatialData, image_key: str | None = None) -> ImageReader:
        """An :class:`~sigmma_sc.data.ImageReader` on the tiled image (or on ``image_key`` of the same section)."""
        from .._utils._validate import get_image
        from ._image import ImageReader, image_is_brightfield

        key, image = get_image(sdata, image_key or self.image_key)
        return ImageReader(
            image,
            self.params["coordinate_system"],
            self.params["um_per_unit"],
            brightfield=image_is_brightfield(sdata, key),
        )


@dataclass(frozen=True, eq=False)
class CellGraph:
    """A cell graph written by :func:`sigmma_sc.pp.cell_graph` on a :class:`Tiling`, checked against it.

    Attributes
    ----------
    table_key
        Cell table key.
    graph_key
        The graph's prefix.
    cells
        The cell table.
    tiling
        The tiling the graph was built on (and is current for).
    record
        The record ``.uns[graph_key]['cell_graph']`` (with ``'keys'``).
    """

    table_key: str
    graph_key: str
    cells: AnnData = field(repr=False)
    tiling: Tiling = field(repr=False)
    record: Mapping[str, Any] = field(repr=False)

    @classmethod
    def resolve(
        cls, sdata: SpatialData, tiling: Tiling, *, table_key: str = "table", graph_key: str = Keys.GRAPH
    ) -> CellGraph:
        """The graph ``graph_key`` of ``table_key``: tiled cells, built on ``tiling`` and not stale, or a clear error.

        Cheap (no image is read), so :func:`sigmma_sc.tl.train_sigmma` runs it before the slow featurization.
        """
        cells = get_table(sdata, table_key)
        blocks = [tiling.keys["cell_blocks"][s] for s in ("micro", "meso")]
        require_obs(cells, [tiling.keys["cell_tile"], *blocks], table_key, "sg.pp.tile")
        record = graph_record(cells, graph_key, table_key)
        if record.get("tile_key", tiling.key) != tiling.key:
            raise ValueError(
                f"Cell graph {graph_key!r} was built on tile table {record['tile_key']!r}, not {tiling.key!r}. Build "
                f"one on this tiling: `sg.pp.cell_graph(sdata, tile_key={tiling.key!r}, key_added=...)` and pass "
                "`graph_key=`."
            )
        check_graph_tiling(cells, table_key, record, tiling.keys["cell_tile"])  # stale after a new sg.pp.tile
        return cls(table_key=table_key, graph_key=graph_key, cells=cells, tiling=tiling, record=record)

    @property
    def features_key(self) -> str:
        """``.obsm`` key of the node features."""
        return self.record["features_key"]

    @property
    def n_neighs(self) -> int:
        """Neighbours per cell."""
        return int(self.record["n_neighs"])

    @property
    def pca(self) -> Mapping[str, Any] | None:
        """The PCA of the node features (``None``: features given by the user)."""
        return self.record.get("pca")

    def features(self) -> np.ndarray:
        """``(n_obs, F)`` float32 node features."""
        return np.asarray(self.cells.obsm[self.features_key], dtype=np.float32)

    def connectivities(self) -> Any:
        """The graph's ``(n_obs, n_obs)`` sparse connectivities."""
        return self.cells.obsp[self.record["keys"]["connectivities"]]

    def positions(self) -> np.ndarray:
        """``(n_obs, 2)`` float64 cell centroids in the tiling's coordinate system."""
        return np.asarray(self.cells.obsm[self.tiling.keys["cell_spatial"]], dtype=np.float64)

    def blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Micro and meso block of each cell, as :func:`sigmma_sc.pp.tile` wrote them (``-1``: untiled)."""
        keys = self.tiling.keys["cell_blocks"]
        return tuple(self.cells.obs[keys[s]].to_numpy().astype(np.int64) for s in ("micro", "meso"))


@dataclass(frozen=True, eq=False)
class EmbeddingRun:
    """What one :func:`sigmma_sc.tl.embed` run wrote into a table (``.uns[use_rep]['embed']``).

    Attributes
    ----------
    use_rep
        The run's prefix (``key_added`` of ``sg.tl.embed``).
    record
        Its record (empty for objects written before the record existed).
    keys
        Kind (``'image'``, ``'st'``, ``'cell'``) -> scale -> ``.obsm`` key, for the keys present in the table.
    """

    use_rep: str
    record: Mapping[str, Any] = field(repr=False)
    keys: Mapping[str, Mapping[str, str]]

    @classmethod
    def resolve(cls, adata: AnnData, use_rep: str = Keys.PREFIX, scales: tuple[str, ...] = SCALES) -> EmbeddingRun:
        """The run ``use_rep`` of ``adata`` (default key names when nothing was recorded)."""
        record = read_record(adata, use_rep, "embed") or {}
        keys = {kind: embedding_keys(adata, use_rep, kind, scales) for kind in ("image", "st", "cell")}
        return cls(use_rep=use_rep, record=record, keys=keys)

    @property
    def scales(self) -> tuple[str, ...]:
        """Scales with any embedding written, in :data:`~sigmma_sc._constants.SCALES` order."""
        return tuple(s for s in SCALES if any(s in k for k in self.keys.values()))
