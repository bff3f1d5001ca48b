"""Readers: Xenium (with H&E), MERSCOPE, CosMx, Visium HD, or your own AnnData + image, into SpatialData in µm."""

from ._anndata import from_anndata
from ._cosmx import cosmx
from ._merscope import merscope
from ._visium_hd import visium_hd
from ._xenium import xenium

__all__ = ["cosmx", "from_anndata", "merscope", "visium_hd", "xenium"]
