"""The bridge between SpatialData and the pure-torch model: tile images, training bundles."""

from ._bundle import build_bundle
from ._image import ImageReader
from ._tiles import iter_tile_images, tile_params

__all__ = ["ImageReader", "build_bundle", "iter_tile_images", "tile_params"]
