"""Readers into SpatialData in µm: Xenium (with H&E), MERSCOPE, CosMx, Visium HD, whole-slide images, or your own AnnData + image."""

from ._anndata import from_anndata
from ._cosmx import cosmx
from ._merscope import merscope
from ._visium_hd import visium_hd
from ._wsi import wsi
from ._xenium import xenium

__all__ = ["cosmx", "from_anndata", "merscope", "visium_hd", "wsi", "xenium"]
