"""The bridge between SpatialData and the pure-torch model: tile images, training bundles."""

from ._build import build_bundle
from ._cohort import cohort_tile_table
from ._image import ImageReader
from ._tiles import iter_tile_images, tile_params

__all__ = ["ImageReader", "build_bundle", "cohort_tile_table", "iter_tile_images", "tile_params"]
