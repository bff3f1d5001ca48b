"""Tile images of a tiled section, read lazily at the tiling's physical pixel size."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from sigmma_sc._constants import Keys

from ._image import ImageReader
from ._records import Tiling

if TYPE_CHECKING:
    from spatialdata import SpatialData


def tile_params(sdata: SpatialData, tile_key: str = Keys.TILE_TABLE) -> dict:
    """The parameters ``sg.pp.tile`` recorded in the tile table, or a clear error (see ``sigmma_sc.data._records.Tiling``)."""
    return dict(Tiling.resolve(sdata, tile_key).params)


def tile_reader(sdata: SpatialData, tile_key: str = Keys.TILE_TABLE, image_key: str | None = None) -> ImageReader:
    """An :class:`ImageReader` on the tiled image (or on ``image_key``, e.g. an H&E of the same section)."""
    return Tiling.resolve(sdata, tile_key).reader(sdata, image_key)


def image_modality(sdata: SpatialData, tile_key: str = Keys.TILE_TABLE, image_key: str | None = None) -> str:
    """``'brightfield'`` (RGB(A), e.g. H&E) or ``'fluorescence'`` (one channel, e.g. DAPI) of the tiled image."""
    return "brightfield" if tile_reader(sdata, tile_key, image_key).brightfield else "fluorescence"


def iter_tile_images(
    sdata: SpatialData,
    *,
    tile_key: str = Keys.TILE_TABLE,
    image_key: str | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    n_workers: int = 4,
) -> Iterator[np.ndarray]:
    """Yield each tile's image as a ``(C, tile_px, tile_px)`` uint8 array, in tile-table order.

    Only the window of the best pyramid level under each tile is read (see :class:`ImageReader`);
    ``n_workers`` threads read ahead (image decoding and resampling release the GIL).
    """
    tiling = Tiling.resolve(sdata, tile_key)
    reader = tiling.reader(sdata, image_key)
    x0, y0 = tiling.origins().T
    size, out_px = tiling.tile_size, int(tiling.params["tile_px"])
    level = reader.level_for(tiling.pixel_size_um)
    order = np.arange(tiling.n_tiles) if indices is None else np.asarray(indices, dtype=np.int64)
    read = lambda i: reader.read_square(float(x0[i]), float(y0[i]), size, out_px, level=level)
    if n_workers <= 1:
        yield from map(read, order)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n_workers) as pool:
        window = 4 * n_workers  # bounded read-ahead: memory stays O(window) tiles
        futures = [pool.submit(read, i) for i in order[:window]]
        for j in range(order.size):
            if j + window < order.size:
                futures.append(pool.submit(read, order[j + window]))
            yield futures[j].result()
            futures[j] = None
