"""Preprocessing: tiles, per-tile cell graphs and node features, stain normalisation."""

from ._cell_graph import cell_graph
from ._stain import stain_normalize
from ._tile import tile

__all__ = ["cell_graph", "stain_normalize", "tile"]
