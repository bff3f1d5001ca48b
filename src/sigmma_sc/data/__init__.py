"""The bridge between SpatialData and the pure-torch model: tile images, training bundles.

Readers resolve the records of ``sg.pp.tile`` / ``sg.pp.cell_graph`` once (``_records.py``), turn them into
per-cell arrays and build bundles with one array-level constructor (``_build.py``). Not to be confused with
:mod:`sigmma_sc.datasets`, which makes and reads example sections.
"""

from ._build import build_bundle
from ._cohort import cohort_tile_table
from ._image import ImageReader
from ._tiles import iter_tile_images, tile_params

__all__ = ["ImageReader", "build_bundle", "cohort_tile_table", "iter_tile_images", "tile_params"]
