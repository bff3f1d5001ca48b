"""The bridge between SpatialData and the pure-torch model: tile images, training bundles."""

from ._image import ImageReader
from ._tiles import iter_tile_images, tile_params

__all__ = ["ImageReader", "iter_tile_images", "tile_params"]
