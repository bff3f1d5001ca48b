"""Datasets: synthetic Xenium, MERSCOPE, CosMx and Visium HD output folders, the demo, and a reader for a real section.

Example sections to run the package on; the code that turns any section into tensors is :mod:`sigmma_sc.data`.
"""

from ._arrangement import synthetic_arrangement
from ._bonemarrow import xenium_bonemarrow
from ._demo import demo
from ._domains import add_truth
from ._layouts import synthetic_cosmx, synthetic_merscope, synthetic_visium_hd
from ._synthetic import synthetic_xenium

__all__ = [
    "add_truth",
    "demo",
    "synthetic_arrangement",
    "synthetic_cosmx",
    "synthetic_merscope",
    "synthetic_visium_hd",
    "synthetic_xenium",
    "xenium_bonemarrow",
]
