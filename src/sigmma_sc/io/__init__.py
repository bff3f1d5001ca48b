"""Readers: 10x Xenium runs with a registered H&E image, your own AnnData + image, into SpatialData."""

from ._anndata import from_anndata
from ._xenium import xenium

__all__ = ["from_anndata", "xenium"]
