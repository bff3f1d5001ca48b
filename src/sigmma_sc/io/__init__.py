"""Readers: 10x Xenium runs with a registered H&E image, into SpatialData."""

from ._xenium import xenium

__all__ = ["xenium"]
