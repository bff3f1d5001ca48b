"""Readers: 10x Xenium runs with a registered H&E image, and whole-slide images, into SpatialData."""

from ._wsi import wsi
from ._xenium import xenium

__all__ = ["wsi", "xenium"]
