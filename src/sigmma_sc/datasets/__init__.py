"""Synthetic and demo datasets: a realistic 10x Xenium output folder with a registered H&E image."""

from ._demo import demo
from ._synthetic import synthetic_xenium

__all__ = ["demo", "synthetic_xenium"]
