"""``sg.pp.tile``: square tiles of physical size over a registered image, with a spatial split."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import ndimage, sparse

from sigmma_sc._constants import GRID, SPLIT_BUFFER, SPLITS, Keys
from sigmma_sc._docs import doc_inplace, doc_params
from sigmma_sc._utils._validate import (
    categorical,
    cell_coordinates,
    check_positive,
    check_prefix,
    counts_matrix,
    get_image,
    get_table,
    resolve_counts_layer,
    shared_coordinate_system,
)
from sigmma_sc._utils._validate import um_per_unit as _um_per_unit
from sigmma_sc._utils._write import save_output, save_outputs, save_record
from sigmma_sc.data._geometry import cell_blocks, grid_cells, tile_of_points
from sigmma_sc.data._image import ImageReader, image_is_brightfield

from ._tissue import brightfield_tissue_mask, otsu

if TYPE_CHECKING:
    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

MIN_CROP_PX = 4
FINER_WARNING = 4  # warn when tiles are read this many times finer (or more) than the image's full resolution


@doc_params(inplace=doc_inplace)
def tile(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    table_key: str | None = "table",
    coordinate_system: str | None = None,
    tile_size_um: float = 128.0,
    pixel_size_um: float = 0.5,
    um_per_unit: float | None = None,
    layer: str | None = None,
    min_tissue_fraction: float = 0.05,
    min_cells: int = 1,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_region_tiles: int | None = None,
    split_buffer: int = 0,
    cells_outside: Literal["raise", "drop"] = "raise",
    seed: int = 0,
    key_added: str = Keys.PREFIX,
    inplace: bool = True,
) -> tuple[gpd.GeoDataFrame, AnnData, pd.DataFrame] | None:
    """Cut a section into square tiles of physical size and split them spatially into train/val/test.

    The tile grid is laid over the image's extent in ``coordinate_system``. A tile is kept when it holds at
    least ``min_cells`` cells and at least ``min_tissue_fraction`` of it is tissue (detected on a low-resolution
    pyramid level); the others are dropped as background and counted in the log. Tiles are grouped into
    square regions of ``split_region_tiles`` x ``split_region_tiles`` tiles and whole regions are assigned to
    train, validation and test, so that validation and test tiles lie in regions spatially disjoint from the
    training regions. Regions touch, though: without a buffer, a training tile can be the direct neighbour of a
    test tile (the same tissue structure, a few µm away). ``split_buffer=b`` takes the training tiles within
    ``b`` tiles (8-neighbourhood, grid steps) of a validation or test tile out of training: their split becomes
    ``'buffer'`` (they are tiled, graphed and embedded, but no training, model selection or held-out score
    uses them), so every held-out tile is at least ``b`` tiles away from any training tile.

    Parameters
    ----------
    sdata
        SpatialData object with an image and a cell table annotating cell shapes or points.
    image_key
        Image element to tile (H&E, or a morphology stain such as Xenium's DAPI). Optional if there is one image.
    table_key
        Cell table (counts in ``.X`` or ``layer``). ``None`` tiles an image-only section (e.g. an H&E slide
        without transcriptomics, to embed with :func:`sigmma_sc.tl.embed` and ``table_key=None``): every grid
        tile with at least ``min_tissue_fraction`` tissue is kept, ``min_cells`` is ignored, and the tile
        table has no genes and ``n_cells`` 0.
    coordinate_system
        Coordinate system shared by the image and the cells; tiles are defined in it. Default: ``'global'`` when
        both are in it, else the only one they share.
    tile_size_um
        Tile side in micrometres (the paper: 256 px at 0.5 µm/px = 128 µm).
    pixel_size_um
        Pixel size at which the image is read for the model, in micrometres.
    um_per_unit
        Micrometres per unit of ``coordinate_system``. Default: the value recorded by the ``sigmma_sc.io`` readers
        (:func:`sigmma_sc.io.xenium`, :func:`sigmma_sc.io.from_anndata`, ...) in ``sdata.attrs['sigmma']``, or 1 when
        the coordinate system's name says micrometres (``'microns'``, ``'um'``, ``'global_um'``, ...).
    layer
        Layer of the cell table holding raw counts; ``'raw'`` reads ``table.raw`` (scanpy's place for them).
        ``None``: ``.X``, or ``.raw`` when ``.X`` is not integer (log-normalised) and ``.raw`` holds integer
        counts for the same genes (logged).
    min_tissue_fraction
        Minimum tissue fraction of a kept tile.
    min_cells
        Minimum number of cells of a kept tile.
    split_fractions
        Train, validation and test fractions of tiles.
    split_region_tiles
        Side of a split region in tiles (default: about 50 regions over the section).
    split_buffer
        Training tiles within this many tiles of a validation or test tile become ``'buffer'`` tiles, unused
        (0: none, the regions touch). A buffer of 1 took half of the demo's training tiles away
        (see ``BENCHMARKS.md``), so it is off by default.
    cells_outside
        What to do with cells whose centroid lies off the image: ``'raise'`` or ``'drop'`` them (tile ``-1``).
    seed
        Seed of the split.
    key_added
        Stem of every key written (``Keys.tiling(key_added, image_key)``, see :doc:`/keys`; default ``'sigmma'``):
        the tile table ``f'{key_added}_tiles'``, the tile
        shapes ``f'{image_key}_{key_added}_tiles'`` and the cell columns ``f'{key_added}_tile'``, ... A second
        tiling (another tile size, another image) under another prefix leaves the first one intact.
    {inplace}

    Returns
    -------
    ``None`` if ``inplace``, else ``(tile_shapes, tile_table, cell_assignments)`` (``cell_assignments`` is
    empty with ``table_key=None``). In place, writes:

    `sdata.shapes['{image_key}_sigmma_tiles' | f'{image_key}_{key_added}_tiles']`
        Square tile polygons in ``coordinate_system``.
    `sdata.tables['sigmma_tiles' | f'{key_added}_tiles']`
        One row per kept tile annotating those shapes; ``.X`` summed counts of its cells; ``.obs``
        ``tile_id``, ``tile_row``, ``tile_col``, ``x0``, ``y0``, ``n_cells``, ``tissue_fraction``, ``split``
        (train/val/test, and ``buffer`` with ``split_buffer``), ``split_region``; ``.uns[key_added]['tile']`` the parameters and, under ``'keys'``,
        every key written.
    `table.obs['sigmma_tile' | f'{key_added}_tile']`
        Row of the tile table of each cell (``-1`` if dropped).
    `table.obs['sigmma_{scale}_block' | f'{key_added}_{scale}_block']`
        Micro block (0-15, row-major 4x4) and meso block (0-3, 2x2) of each cell.
    `table.obsm['sigmma_spatial' | f'{key_added}_spatial']`
        Centroids in ``coordinate_system``; the cell table's ``.uns[key_added]['tile']`` records these keys.
    """
    check_prefix(key_added)
    tile_size_um = check_positive(tile_size_um, "tile_size_um")
    pixel_size_um = check_positive(pixel_size_um, "pixel_size_um")
    fractions = _check_tile_args(min_tissue_fraction, split_buffer, split_fractions, cells_outside)
    image_key, image = get_image(sdata, image_key)
    table = get_table(sdata, table_key) if table_key is not None else _empty_cell_table()
    if coordinate_system is None:
        coordinate_system = shared_coordinate_system(sdata, image, table if table_key is not None else None, table_key)
    scale = _um_per_unit(sdata, coordinate_system, um_per_unit)
    reader = ImageReader(image, coordinate_system, scale, brightfield=image_is_brightfield(sdata, image_key))
    tile_px = _tile_px(reader, tile_size_um, pixel_size_um, image_key)

    counts, xy, layer = _cell_inputs(sdata, table, table_key, layer, coordinate_system)
    on_image = _cells_on_image(reader, xy, cells_outside, image_key, coordinate_system)

    size = tile_size_um / scale  # tile side in coordinate-system units
    xmin, ymin, xmax, ymax = reader.extent()
    n_cols, n_rows = max(1, int(np.ceil((xmax - xmin) / size))), max(1, int(np.ceil((ymax - ymin) / size)))
    row, col, grid_id, n_cells_grid = grid_cells(xy, on_image, (xmin, ymin), size, (n_rows, n_cols))
    has_cells = n_cells_grid >= max(min_cells, 1) if table_key is not None else np.ones(n_rows * n_cols, dtype=bool)
    candidates = np.flatnonzero(has_cells)  # tissue is only measured where cells are
    tissue = np.zeros(n_rows * n_cols, dtype=np.float64)
    tissue[candidates] = _tissue_fraction(reader, xmin, ymin, size, candidates, n_cols)
    keep = has_cells & (tissue >= min_tissue_fraction)
    kept_grid = np.flatnonzero(keep)
    _check_kept(kept_grid, image_key, min_tissue_fraction, image_only=table_key is None)
    cell_tile = tile_of_points(grid_id, kept_grid, n_rows * n_cols)
    t_row, t_col = kept_grid // n_cols, kept_grid % n_cols
    x0, y0 = xmin + t_col * size, ymin + t_row * size
    n_dropped_cells = int((cell_tile < 0).sum())
    _log_kept(kept_grid, keep, n_cells_grid, has_cells, grid_id, tissue, min_tissue_fraction, n_dropped_cells,
              image_only=table_key is None)  # fmt: skip
    blocks = cell_blocks(xy, row, col, (xmin, ymin), size, cell_tile)  # inside each tile (row-major)

    split, region = _spatial_split(t_row, t_col, fractions, split_region_tiles, seed)
    split = _buffer_split(split, t_row, t_col, split_buffer)
    _warn_small_splits(split, fractions, tile_size_um)
    member, summed = _summed_counts(cell_tile, counts, kept_grid.size)

    keys = Keys.tiling(key_added, image_key)
    shapes_key = keys["shapes"]
    params = {
        "key_added": key_added,
        "keys": keys,
        "image_key": image_key,
        "table_key": table_key,
        "shapes_key": shapes_key,
        "coordinate_system": coordinate_system,
        "tile_size_um": tile_size_um,
        "tile_size": size,
        "tile_px": int(tile_px),
        "pixel_size_um": tile_size_um / tile_px,
        "um_per_unit": scale,
        "layer": layer,
        "grid_origin": [float(xmin), float(ymin)],
        "grid_shape": [n_rows, n_cols],
        "min_tissue_fraction": float(min_tissue_fraction),
        "min_cells": int(min_cells),
        "split_fractions": [float(f) for f in fractions],
        "split_buffer": int(split_buffer),
        "seed": int(seed),
        "n_dropped_cells": n_dropped_cells,
    }
    shapes = _tile_shapes(x0, y0, size, coordinate_system)
    tile_table = _tile_table(
        summed, table, shapes_key, t_row, t_col, x0, y0, member, tissue[kept_grid], split, region, params
    )
    cells = pd.DataFrame(
        {keys["cell_tile"]: cell_tile} | {keys["cell_blocks"][b]: blocks[b] for b in ("micro", "meso")},
        index=table.obs_names,
    )
    if not inplace:
        return shapes, tile_table, cells
    _write_tiling(
        sdata, table, table_key, shapes, tile_table, cells, xy, keys, key_added=key_added, image_key=image_key
    )
    return None


def _write_tiling(
    sdata: SpatialData,
    table: AnnData,
    table_key: str | None,
    shapes: gpd.GeoDataFrame,
    tile_table: AnnData,
    cells: pd.DataFrame,
    xy: np.ndarray,
    keys: dict,
    *,
    key_added: str,
    image_key: str,
) -> None:
    """Write the tile shapes, the tile table and (with a cell table) each cell's tile, blocks and centroid."""
    shapes_key, tile_table_key = keys["shapes"], keys["tile_table"]
    save_output(sdata, "shapes", shapes_key, shapes, what="tiles")
    save_output(sdata, "tables", tile_table_key, tile_table, what="tile table")
    if table_key is None:
        return
    save_outputs(table, "obs", {k: cells[k].to_numpy() for k in cells}, table=table_key, what="tile and block ids")
    save_output(table, "obsm", keys["cell_spatial"], xy, table=table_key, what="cell centroids")
    record = {"tile_key": tile_table_key, "image_key": image_key, "keys": keys}
    save_record(table, key_added, "tile", record, table=table_key)


def _cell_inputs(
    sdata: SpatialData, table: AnnData, table_key: str | None, layer: str | None, coordinate_system: str
) -> tuple[sparse.spmatrix, np.ndarray, str | None]:
    """The cells' raw counts, centroids in ``coordinate_system`` and the counts layer used (none image-only)."""
    if table_key is None:
        return table.X, np.zeros((0, 2), dtype=np.float64), layer
    layer = resolve_counts_layer(table, layer, table_key)  # scanpy's .raw when .X is log-normalised
    counts = counts_matrix(table, layer, table_key)
    return counts, cell_coordinates(sdata, table, table_key, coordinate_system), layer


def _check_tile_args(
    min_tissue_fraction: float, split_buffer: int, split_fractions: tuple[float, float, float], cells_outside: str
) -> np.ndarray:
    """The cheap checks of ``sg.pp.tile``'s arguments; returns the split fractions as an array."""
    if not 0 <= min_tissue_fraction <= 1:
        raise ValueError(f"`min_tissue_fraction` must be in [0, 1], got {min_tissue_fraction}.")
    if not isinstance(split_buffer, int | np.integer) or isinstance(split_buffer, bool) or split_buffer < 0:
        raise ValueError(f"`split_buffer` must be a non-negative integer (tiles), got {split_buffer!r}.")
    fractions = np.asarray(split_fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1):
        raise ValueError(f"`split_fractions` must be three non-negative numbers summing to 1, got {split_fractions}.")
    if cells_outside not in ("raise", "drop"):
        raise ValueError(f"`cells_outside` must be 'raise' or 'drop', got {cells_outside!r}.")
    return fractions


def _tile_px(reader: ImageReader, tile_size_um: float, pixel_size_um: float, image_key: str) -> int:
    """Tile side in pixels as read (a multiple of ``MIN_CROP_PX``), after checking that micro crops are large enough."""
    tile_px = MIN_CROP_PX * max(1, round(tile_size_um / pixel_size_um / MIN_CROP_PX))
    if tile_px // GRID["micro"] < MIN_CROP_PX:  # the tile as read (a multiple of MIN_CROP_PX px), not the ratio
        raise ValueError(
            f"A {tile_size_um} µm tile at {pixel_size_um} µm/px is read as {tile_px} px, giving micro crops of "
            f"{tile_px // GRID['micro']} px; at least {MIN_CROP_PX} px are needed. Increase `tile_size_um` (at least "
            f"{MIN_CROP_PX * GRID['micro'] * pixel_size_um:g} µm) or decrease `pixel_size_um`."
        )
    native_crop = tile_size_um / reader.pixel_size_um / GRID["micro"]
    if native_crop < MIN_CROP_PX * (1 - 1e-6):
        raise ValueError(
            f"The image's full resolution is {reader.pixel_size_um:.4g} µm/px, so a micro crop of a {tile_size_um} µm "
            f"tile spans only {_floor(native_crop)} image pixels (at least {MIN_CROP_PX} needed). Increase "
            f"`tile_size_um` (at least {MIN_CROP_PX * GRID['micro'] * reader.pixel_size_um:.4g} µm), or check "
            "`um_per_unit` and the image's transformation."
        )
    if pixel_size_um * FINER_WARNING <= reader.pixel_size_um * 1.01:  # 4x and more (1% tolerance)
        logger.warning(
            "`pixel_size_um=%g` is %.0fx finer than image %r's full resolution (%.4g µm/px): tiles are upsampled and "
            "hold no more detail. Pass `pixel_size_um=%.4g` (or coarser), or check `um_per_unit` (%g µm per unit).",
            pixel_size_um, reader.pixel_size_um / pixel_size_um, image_key, reader.pixel_size_um,
            reader.pixel_size_um, reader.um_per_unit,
        )  # fmt: skip
    return tile_px


def _cells_on_image(
    reader: ImageReader, xy: np.ndarray, cells_outside: str, image_key: str, coordinate_system: str
) -> np.ndarray:
    """Which cell centroids lie on the image; raises (``cells_outside='raise'``) or warns when some do not."""
    on_image = reader.contains(xy)
    if not on_image.all():
        n_off = int((~on_image).sum())
        if cells_outside == "raise":
            raise ValueError(
                f"{n_off} of {len(xy)} cell centroids lie outside image {image_key!r} in {coordinate_system!r}. "
                "Check the image registration (alignment file) and `coordinate_system`, or pass "
                "`cells_outside='drop'` to leave those cells untiled."
            )
        logger.warning("%d cells lie outside image %r and are left untiled (tile -1).", n_off, image_key)
    return on_image


def _check_kept(kept_grid: np.ndarray, image_key: str, min_tissue_fraction: float, *, image_only: bool) -> None:
    if kept_grid.size == 0 and image_only:
        raise ValueError(
            f"No tile of image {image_key!r} holds at least {min_tissue_fraction:.0%} tissue. Check "
            "`min_tissue_fraction` and that the image shows tissue on a brighter (H&E) or darker (fluorescence) "
            "background."
        )
    if kept_grid.size == 0:
        raise ValueError(
            "No tile holds enough cells and tissue. Check `tile_size_um`, `min_cells`, `min_tissue_fraction` "
            "and that the cells lie on the tissue of the image."
        )


def _log_kept(
    kept_grid: np.ndarray,
    keep: np.ndarray,
    n_cells_grid: np.ndarray,
    has_cells: np.ndarray,
    grid_id: np.ndarray,
    tissue: np.ndarray,
    min_tissue_fraction: float,
    n_dropped_cells: int,
    *,
    image_only: bool,
) -> None:
    """Log the tiles kept and the cells tiled (and warn when most cells are not)."""
    if image_only:
        logger.info("Kept %d of %d grid tiles with >= %.0f%% tissue (image only, no cells).",
                    kept_grid.size, keep.size, 100 * min_tissue_fraction)  # fmt: skip
        return
    n_bg = int((~keep & (n_cells_grid > 0)).sum())
    n_cells = grid_id.size
    logger.info(
        "Kept %d of %d grid tiles (%d empty, %d with cells dropped as background); %d of %d cells are tiled.",
        kept_grid.size, keep.size, int((n_cells_grid == 0).sum()), n_bg, n_cells - n_dropped_cells, n_cells,
    )  # fmt: skip
    _warn_untiled(grid_id, has_cells, tissue, min_tissue_fraction, n_dropped_cells, n_cells)


def _summed_counts(
    cell_tile: np.ndarray, counts: sparse.spmatrix, n_tiles: int
) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """The ``(tiles, cells)`` membership matrix and the summed counts of each tile's cells."""
    idx = np.flatnonzero(cell_tile >= 0)
    member = sparse.csr_matrix(
        (np.ones(idx.size, dtype=np.float32), (cell_tile[idx], idx)), shape=(n_tiles, cell_tile.size)
    )
    return member, (member @ counts).tocsr()


def _warn_small_splits(split: pd.Categorical, fractions: np.ndarray, tile_size_um: float) -> None:
    """A WARNING with the fix when a split that should hold tiles holds fewer than 2."""
    counts = pd.Series(np.asarray(split)).value_counts()
    n = {s: int(counts.get(s, 0)) for s in SPLITS}
    short = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and n[s] < 2]
    if not short:
        return
    total = sum(n.values())
    smaller = tile_size_um * np.sqrt(total / 50) if total < 50 else tile_size_um / 2
    logger.warning(
        "Only %d tiles: train/val/test = %d/%d/%d, so %s hold(s) fewer than 2 tiles (%s). Use a smaller "
        "`tile_size_um` (e.g. %.3g instead of %g µm) for more tiles, or tile a larger section.",
        total, n["train"], n["val"], n["test"], " and ".join(short),
        "; ".join(
            {"train": "training needs at least 2", "val": "no validation loss, the last epoch is kept",
             "test": "held-out scores (retrieval, probes) need at least 2"}[s] for s in short
        ),
        smaller, tile_size_um,
    )  # fmt: skip


def _warn_untiled(
    grid_id: np.ndarray,
    has_cells: np.ndarray,
    tissue: np.ndarray,
    min_tissue_fraction: float,
    n_dropped: int,
    n_cells: int,
) -> None:
    """A WARNING naming the causes and fixes when most cells end up in no tile."""
    if n_cells == 0 or n_dropped <= n_cells / 2:
        return
    on = grid_id >= 0
    off = int((~on).sum())
    g = grid_id[on]
    few = int((~has_cells[g]).sum())
    background = int((has_cells[g] & (tissue[g] < min_tissue_fraction)).sum())
    logger.warning(
        "Only %d of %d cells (%.0f%%) are tiled: %d lie off the image, %d in tiles with fewer than `min_cells` cells "
        "and %d in tiles where less than %.0f%% tissue was detected. Check the image (its intensities: a saturated "
        "artefact or an unusual range hides the tissue) and the registration; lower `min_tissue_fraction` (0 keeps "
        "every tile with cells) or `min_cells`.",
        n_cells - n_dropped, n_cells, 100 * (n_cells - n_dropped) / n_cells, off, few, background,
        100 * min_tissue_fraction,
    )  # fmt: skip


def _empty_cell_table() -> AnnData:
    import anndata as ad

    return ad.AnnData(X=sparse.csr_matrix((0, 0), dtype=np.float32))


def tissue_mask(thumb: np.ndarray, pixel_size_um: float = 4.0, *, brightfield: bool | None = None) -> np.ndarray:
    """Tissue mask of a low-resolution uint8 ``(C, h, w)`` image with pixels of ``pixel_size_um``.

    RGB (brightfield, e.g. H&E): tissue is darker or more saturated than the white glass, without pen marks
    and dust (:func:`sigmma_sc.pp._tissue.brightfield_tissue_mask`). One channel
    (fluorescence, e.g. DAPI): after smoothing over ~12 µm, tissue is brighter than the background by a
    quarter of the Otsu threshold's height above it (sparse nuclei still count as tissue); so is a 3-channel
    image when ``brightfield=False`` (a fluorescence composite; ``None``: brightfield when it has 3 channels).
    """
    img = thumb.astype(np.float32)
    if img.shape[0] == 3 and brightfield is not False:  # pen marks and dust removed, folds kept (see pp/_tissue.py)
        return brightfield_tissue_mask(thumb, pixel_size_um)
    else:
        smooth = ndimage.gaussian_filter(img.max(0), max(1.0, 12.0 / pixel_size_um))
        if np.ptp(smooth) < 1:
            return np.zeros(smooth.shape, dtype=bool)
        bg = np.percentile(smooth, 5)
        mask = smooth > bg + 0.25 * (otsu(smooth) - bg)
    mask = ndimage.binary_closing(mask, iterations=2)
    return ndimage.binary_fill_holes(mask) if mask.mean() < 0.999 else mask


def _tissue_fraction(
    reader: ImageReader, xmin: float, ymin: float, size: float, grid_ids: np.ndarray, n_cols: int
) -> np.ndarray:
    """Fraction of the grid tiles ``grid_ids`` covered by tissue, sampled on a 16x16 grid of points per tile.

    The mask is computed on the pyramid level closest to 1/16 of the tile side per pixel.
    """
    thumb, to_cs = reader.thumbnail(
        max_pixel_size_um=max(size * reader.um_per_unit / 16, reader.pixel_size_um), background_artefacts=True
    )
    mask = tissue_mask(
        thumb, float(np.sqrt(abs(np.linalg.det(to_cs[:2, :2])))) * reader.um_per_unit, brightfield=reader.brightfield
    )
    g = 16
    offs = (np.arange(g) + 0.5) / g * size
    ox, oy = np.meshgrid(offs, offs)
    ox, oy = ox.ravel()[None], oy.ravel()[None]
    inv = np.linalg.inv(to_cs)
    h, w = mask.shape
    out = np.empty(len(grid_ids), dtype=np.float64)
    chunk = 65_536  # tiles per step: bounded memory on a whole slide tiled without cells
    for start in range(0, len(grid_ids), chunk):
        rows, cols = np.divmod(np.asarray(grid_ids[start : start + chunk]), n_cols)
        px = xmin + cols[:, None] * size + ox
        py = ymin + rows[:, None] * size + oy
        ix = np.floor(inv[0, 0] * px + inv[0, 1] * py + inv[0, 2]).astype(np.int64)
        iy = np.floor(inv[1, 0] * px + inv[1, 1] * py + inv[1, 2]).astype(np.int64)
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        hit = np.zeros(ix.shape, dtype=bool)
        hit[inside] = mask[iy[inside], ix[inside]]
        out[start : start + chunk] = hit.mean(1)
    return out


def _spatial_split(
    rows: np.ndarray, cols: np.ndarray, fractions: np.ndarray, region_tiles: int | None, seed: int
) -> tuple[pd.Categorical, np.ndarray]:
    """Assign whole square regions of tiles to train/val/test with tile counts close to ``fractions``."""
    n = rows.size
    if region_tiles is None:
        region_tiles = max(1, round(np.sqrt(n / 50)))
    elif int(region_tiles) < 1:
        raise ValueError(f"`split_region_tiles` must be >= 1, got {region_tiles}.")
    rr, rc = rows // int(region_tiles), cols // int(region_tiles)
    _, region = np.unique(rr * (cols.max() + 1) + rc, return_inverse=True)
    sizes = np.bincount(region)
    order = np.random.default_rng(seed).permutation(sizes.size)
    targets = fractions * n
    assigned = np.zeros(sizes.size, dtype=np.int64)  # 0 train, 1 val, 2 test
    filled = np.zeros(3)
    for r in order:  # each region goes to the split furthest below its target (ties: train, val, test)
        s = int(np.argmax(targets - filled))
        assigned[r] = s
        filled[s] += sizes[r]
    split = np.asarray(SPLITS)[assigned[region]]
    return categorical(split, SPLITS), region


def _buffer_split(split: pd.Categorical, rows: np.ndarray, cols: np.ndarray, buffer: int) -> pd.Categorical:
    """Training tiles within ``buffer`` grid steps (Chebyshev) of a val/test tile become ``'buffer'`` tiles."""
    if buffer == 0 or rows.size == 0:
        return split
    labels = np.asarray(split).astype(object)
    held = np.zeros((int(rows.max()) + 1, int(cols.max()) + 1), dtype=bool)
    held[rows[labels != "train"], cols[labels != "train"]] = True
    near = ndimage.maximum_filter(held, size=2 * int(buffer) + 1, mode="constant", cval=False)
    drop = (labels == "train") & near[rows, cols]
    labels[drop] = SPLIT_BUFFER
    logger.info(
        "Split buffer of %d tile(s): %d of %d training tiles next to a val/test tile are 'buffer' tiles (unused).",
        int(buffer), int(drop.sum()), int(drop.sum() + (labels == "train").sum()),
    )  # fmt: skip
    return categorical(labels, (*SPLITS, SPLIT_BUFFER))


def _tile_shapes(x0: np.ndarray, y0: np.ndarray, size: float, coordinate_system: str) -> gpd.GeoDataFrame:
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    polys = shapely.box(x0, y0, x0 + size, y0 + size)
    gdf = gpd.GeoDataFrame(geometry=polys, index=pd.RangeIndex(x0.size, name=Keys.TILE_ID))
    return ShapesModel.parse(gdf, transformations={coordinate_system: Identity()})


def _tile_table(
    summed: sparse.csr_matrix,
    table: AnnData,
    shapes_key: str,
    t_row: np.ndarray,
    t_col: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    member: sparse.csr_matrix,
    tissue: np.ndarray,
    split: pd.Categorical,
    region: np.ndarray,
    params: dict,
) -> AnnData:
    import anndata as ad
    from spatialdata.models import TableModel

    n = t_row.size
    obs = pd.DataFrame(
        {
            Keys.TILE_ID: np.arange(n),
            Keys.REGION: pd.Categorical([shapes_key] * n),
            Keys.TILE_ROW: t_row,
            Keys.TILE_COL: t_col,
            Keys.TILE_X0: x0,
            Keys.TILE_Y0: y0,
            Keys.N_CELLS: np.asarray(member.sum(1)).ravel().astype(np.int64),
            Keys.TISSUE_FRACTION: tissue.astype(np.float32),
            Keys.SPLIT: split,
            Keys.SPLIT_REGION: region.astype(np.int64),
        },
        index=pd.Index([f"tile_{i}" for i in range(n)]),
    )
    adata = ad.AnnData(X=summed, obs=obs, var=pd.DataFrame(index=table.var_names.copy()))
    adata.uns[params["key_added"]] = {"tile": params}
    return TableModel.parse(adata, region=shapes_key, region_key=Keys.REGION, instance_key=Keys.TILE_ID)


def _floor(value: float, digits: int = 2) -> str:
    """``value`` rounded down, so that a number just below a limit never prints as the limit (3.9995 -> 3.99)."""
    import math

    return f"{math.floor(value * 10**digits) / 10**digits:g}"
