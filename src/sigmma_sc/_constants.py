"""Every key that ``sigmma_sc`` reads or writes, in one place."""

from __future__ import annotations

from typing import Final

SCALES: Final[tuple[str, ...]] = ("micro", "meso", "macro")
"""The three scales of SIGMMA, finest first."""

GRID: Final[dict[str, int]] = {"micro": 4, "meso": 2, "macro": 1}
"""Blocks per tile side at each scale (4x4 micro, 2x2 meso, 1 macro)."""

SPLITS: Final[tuple[str, ...]] = ("train", "val", "test")

SPLIT_BUFFER: Final = "buffer"
"""Split label of the tiles ``sg.pp.tile(split_buffer=...)`` takes out of training (next to a val/test region)."""


class Keys:
    """Names of SpatialData elements and AnnData fields written by ``sigmma_sc``.

    The key contract (``docs/keys.md``): a writer's ``key_added`` is the stem of every key it writes, and the
    keys derive from it by one function here (:meth:`tiling`, :meth:`graph`, :meth:`embedding`,
    :meth:`microenvironments`); the constants are the default names and the fixed columns of the tile table.
    """

    # elements
    TILE_TABLE: Final = "sigmma_tiles"

    # uns
    UNS: Final = "sigmma"
    PREFIX: Final = "sigmma"  # default ``key_added`` of every writer; all keys below derive from a prefix

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

    # cell table .obsm
    FEATURES: Final = "sigmma_features"  # default node features (PCA of log-normalised counts)

    # cell table .obsp
    GRAPH: Final = "sigmma"  # -> f"{GRAPH}_connectivities", f"{GRAPH}_distances"

    # tile table .obsm
    BACKBONE: Final = "sigmma_backbone_{scale}"  # cached frozen-backbone features per scale
    PREDICTED_EXPRESSION: Final = "sigmma_expression_pred"  # tile table .obsm / .uns of sg.tl.predict_expression

    @staticmethod
    def tiling(prefix: str = "sigmma", image_key: str = "{image_key}") -> dict[str, object]:
        """Every key :func:`sigmma_sc.pp.tile` with ``key_added=prefix`` writes (defaults: the names above)."""
        return {
            "tile_table": f"{prefix}_tiles",
            "shapes": f"{image_key}_{prefix}_tiles",
            "cell_tile": f"{prefix}_tile",
            "cell_blocks": {s: f"{prefix}_{s}_block" for s in ("micro", "meso")},
            "cell_spatial": f"{prefix}_spatial",
        }

    @staticmethod
    def graph(prefix: str = "sigmma") -> dict[str, str]:
        """Every key :func:`sigmma_sc.pp.cell_graph` with ``key_added=prefix`` writes into the cell table."""
        return {
            "connectivities": f"{prefix}_connectivities",
            "distances": f"{prefix}_distances",
            "features": f"{prefix}_features",
        }

    @staticmethod
    def embedding(prefix: str = "sigmma", scales: tuple[str, ...] = SCALES) -> dict[str, dict[str, str]]:
        """Every ``.obsm`` key :func:`sigmma_sc.tl.embed` with ``key_added=prefix`` writes, per scale.

        ``'image'`` and ``'st'``: tile table; ``'cell'``: cell table (default ``X_sigmma_{scale}[_image|_st]``).
        """
        return {
            "image": {s: f"X_{prefix}_{s}_image" for s in scales},
            "st": {s: f"X_{prefix}_{s}_st" for s in scales},
            "cell": {s: f"X_{prefix}_{s}" for s in scales},
        }

    @staticmethod
    def microenvironments(
        key_added: str | None = None, scales: tuple[str, ...] = SCALES, *, use_rep: str = "sigmma"
    ) -> dict[str, str]:
        """Scale -> ``.obs`` key of the labels :func:`sigmma_sc.tl.microenvironments` with ``key_added`` writes.

        ``key_added=None``: its default, ``f'{use_rep}_microenv'``.
        """
        stem = f"{use_rep}_microenv" if key_added is None else key_added
        return {s: f"{stem}_{s}" for s in scales}

    @staticmethod
    def tiling_prefix(tile_key: str) -> str:
        """The ``key_added`` of :func:`sigmma_sc.pp.tile` that names the tile table ``tile_key``."""
        if not tile_key.endswith("_tiles") or len(tile_key) <= len("_tiles"):
            raise ValueError(
                f"A tile table is named '{{key_added}}_tiles' by `sg.pp.tile`, got {tile_key!r}; pass "
                f"`key_added={tile_key!r}` to `sg.pp.tile` and `tile_key={tile_key + '_tiles'!r}` downstream."
            )
        return tile_key[: -len("_tiles")]
