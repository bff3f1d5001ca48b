"""The real Xenium bone-marrow section in ``../shared/data/xenium-bonemarrow`` (see :func:`sigmma_sc.datasets.xenium_bonemarrow`)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "xenium-bonemarrow"


def load_bonemarrow(folder: Path = DATA, *, n_levels: int = 6):
    """The whole section: DAPI image ``'dapi'``, circles ``'cell_circles'`` and table ``'table'`` (477 genes)."""
    import sigmma_sc as sg

    return sg.datasets.xenium_bonemarrow(folder, n_levels=n_levels)
