"""Preprocessing: tiles, per-tile cell graphs and node features."""

from ._cell_graph import cell_graph
from ._tile import tile

__all__ = ["cell_graph", "tile"]
