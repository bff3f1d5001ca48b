"""The small embedded demo section used by the README and the tutorials."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ._synthetic import GENERATOR_VERSION, synthetic_xenium

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

DEMO_N_CELLS = 15_000


def demo(
    *, n_cells: int = DEMO_N_CELLS, seed: int = 0, cache_dir: str | Path | None = None, truth: bool = False
) -> SpatialData:
    """Synthetic Xenium section with a registered H&E, read as SpatialData (written once, then cached).

    With the defaults the section spans about 1.5 x 1.3 mm (tissue with a blank margin and holes), so
    128 µm tiles give on the order of 100 tissue tiles; see :func:`sigmma_sc.datasets.synthetic_xenium`
    for the tissue model and the ground truth file ``sigmma_truth.parquet``.

    Parameters
    ----------
    n_cells
        Number of cells.
    seed
        Random seed of the section.
    cache_dir
        Folder holding the cached Xenium folders; default ``$SIGMMA_SC_CACHE`` or ``~/.cache/sigmma_sc``.
        The section is written to ``<cache_dir>/demo_<n_cells>_<seed>``.
    truth
        Also join the planted ground truth into the cell table (:func:`sigmma_sc.datasets.add_truth`):
        ``.obs['truth_domain']`` (the contiguous tissue domains microenvironments should recover),
        ``.obs['truth_cell_type']`` and the programme memberships.

    Returns
    -------
    SpatialData from :func:`sigmma_sc.io.xenium` with ``he_image="auto"``: images ``'morphology_focus'`` and
    ``'he'``, shapes ``'cell_circles'`` (annotated by ``tables['table']``), ``'cell_boundaries'`` and
    ``'nucleus_boundaries'``, labels ``'cell_labels'`` and ``'nucleus_labels'``; with ``truth``, the cell table's
    ``.obs['truth_*']`` columns.
    """
    from ..io import xenium

    if cache_dir is None:
        cache_dir = os.environ.get("SIGMMA_SC_CACHE") or Path.home() / ".cache" / "sigmma_sc"
    folder = Path(cache_dir).expanduser() / f"demo_{n_cells}_{seed}"
    if not _is_current(folder):
        logger.info("Writing the demo section to %s (once)", folder)
        synthetic_xenium(folder, n_cells=n_cells, seed=seed, transcripts=False, overwrite=True)
    sdata = xenium(folder, he_image="auto")
    if truth:
        from ._domains import add_truth

        add_truth(sdata, folder)
    return sdata


def _is_current(folder: Path) -> bool:
    """Whether ``folder`` holds a complete section from this generator version (experiment.xenium is written last)."""
    try:
        specs = json.loads((folder / "experiment.xenium").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (specs.get("sigmma_synthetic") or {}).get("generator_version") == GENERATOR_VERSION
