"""Datasets: a synthetic 10x Xenium output folder with a registered H&E image, the demo, and a reader for a real section."""

from ._bonemarrow import xenium_bonemarrow
from ._demo import demo
from ._synthetic import synthetic_xenium

__all__ = ["demo", "synthetic_xenium", "xenium_bonemarrow"]
