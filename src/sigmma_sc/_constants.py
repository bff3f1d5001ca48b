"""Every key that ``sigmma_sc`` reads or writes, in one place."""

from __future__ import annotations

from typing import Final

SCALES: Final[tuple[str, ...]] = ("micro", "meso", "macro")
"""The three scales of SIGMMA, finest first."""

GRID: Final[dict[str, int]] = {"micro": 4, "meso": 2, "macro": 1}
"""Blocks per tile side at each scale (4x4 micro, 2x2 meso, 1 macro)."""

SPLITS: Final[tuple[str, ...]] = ("train", "val", "test")


class Keys:
    """Names of SpatialData elements and AnnData fields written by ``sigmma_sc``."""

    # elements
    TILE_TABLE: Final = "sigmma_tiles"
    TILE_SHAPES_SUFFIX: Final = "_sigmma_tiles"  # shapes key is f"{image_key}{TILE_SHAPES_SUFFIX}"

    # uns
    UNS: Final = "sigmma"

    # tile table .obs
    TILE_ID: Final = "tile_id"
    REGION: Final = "region"
    N_CELLS: Final = "n_cells"
    TISSUE_FRACTION: Final = "tissue_fraction"
    SPLIT: Final = "split"
    SPLIT_REGION: Final = "split_region"
    TILE_ROW: Final = "tile_row"
    TILE_COL: Final = "tile_col"
    TILE_X0: Final = "x0"
    TILE_Y0: Final = "y0"
    SECTION: Final = "sigmma_section"  # section name of each tile in a cohort (sg.tl.train_sigmma on sections)
    SPLIT_SPATIAL: Final = "split_spatial"  # the spatial split, kept when split="section" overwrites `split`

    # cell table .obs
    CELL_TILE: Final = "sigmma_tile"
    CELL_BLOCK: Final = "sigmma_{scale}_block"  # .format(scale=...) for micro / meso

    # cell table .obsm
    CELL_SPATIAL: Final = "sigmma_spatial"  # centroid in the tiling coordinate system
    FEATURES: Final = "sigmma_features"  # default node features (PCA of log-normalised counts)

    # cell table .obsp
    GRAPH: Final = "sigmma"  # -> f"{GRAPH}_connectivities", f"{GRAPH}_distances"

    # tile table .obsm
    BACKBONE: Final = "sigmma_backbone_{scale}"  # cached frozen-backbone features per scale
    EMB_IMAGE: Final = "X_sigmma_{scale}_image"
    EMB_ST: Final = "X_sigmma_{scale}_st"

    # cell table .obsm / .obs
    EMB_CELL: Final = "X_sigmma_{scale}"
    MICROENV: Final = "sigmma_microenv_{scale}"
    PREDICTED_EXPRESSION: Final = "sigmma_expression_pred"  # tile table .obsm / .uns of sg.tl.predict_expression

    @staticmethod
    def connectivities(key_added: str = "sigmma") -> str:
        """Key of the connectivity matrix in ``.obsp``."""
        return f"{key_added}_connectivities"

    @staticmethod
    def distances(key_added: str = "sigmma") -> str:
        """Key of the distance matrix in ``.obsp``."""
        return f"{key_added}_distances"

    @staticmethod
    def tile_shapes(image_key: str) -> str:
        """Key of the tile shapes element made from ``image_key``."""
        return f"{image_key}{Keys.TILE_SHAPES_SUFFIX}"

    @staticmethod
    def block(scale: str) -> str:
        """Key of a cell's block id at ``scale`` in the cell table's ``.obs``."""
        return Keys.CELL_BLOCK.format(scale=scale)
