"""Planted ground truth of a synthetic section (domains, cell types) joined into its cell table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .._utils._validate import get_table
from ._synthetic import TRUTH_FILE

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)


def add_truth(sdata: SpatialData, path: str | Path, *, table_key: str = "table", prefix: str = "truth_") -> None:
    """Join the planted ground truth of a synthetic section into its cell table, matched by cell id.

    The sections of :func:`sigmma_sc.datasets.synthetic_xenium` (and so :func:`sigmma_sc.datasets.demo`) are
    drawn from a tissue layout of contiguous domains (stroma, tumour stroma, tumour nests, hypoxic nests,
    necrosis, immune aggregates, vessels) that differ in cell density, cell-type composition and expression
    programmes, and are rendered in the H&E (per-domain eosin, fibre texture, background and debris). The
    domains are what microenvironments should recover; the file ``sigmma_truth.parquet`` holds them per cell.

    Parameters
    ----------
    sdata
        The section read from ``path`` (e.g. by :func:`sigmma_sc.io.xenium`).
    path
        Its folder, written by :func:`sigmma_sc.datasets.synthetic_xenium`.
    table_key
        Cell table (with ``.obs['cell_id']``).
    prefix
        Prefix of the ``.obs`` columns written.

    Returns
    -------
    ``None``; writes into the cell table:

    `.obs['truth_domain' | f'{prefix}domain']`
        Planted domain of each cell (categorical).
    `.obs['truth_cell_type']`, `.obs['truth_region']`, `.obs['truth_chemokine_high']`, `.obs['truth_contact']`
        Planted cell type, macro region (tumour or stroma), and membership of the chemokine and contact
        programmes (with ``prefix`` in place of ``'truth_'``).
    """
    file = Path(path) / TRUTH_FILE
    if not file.exists():
        raise FileNotFoundError(f"No {TRUTH_FILE} in {path}; pass a folder written by sg.datasets.synthetic_xenium.")
    cells = get_table(sdata, table_key)
    if "cell_id" not in cells.obs:
        raise KeyError(f"The cell table {table_key!r} has no .obs['cell_id'] to match the truth by.")
    truth = pd.read_parquet(file).set_index("cell_id")
    ids = cells.obs["cell_id"].astype(str).to_numpy()
    missing = pd.Index(ids).difference(truth.index)
    if len(missing):
        raise ValueError(
            f"{len(missing)} cells of table {table_key!r} (e.g. {missing[0]!r}) are not in {file}; "
            "was the section read from another folder?"
        )
    rows = truth.loc[ids]
    written = []
    for col in rows.columns:
        key = f"{prefix}{col}"
        values = rows[col].to_numpy()
        cells.obs[key] = (
            pd.Categorical(values, categories=rows[col].cat.categories)
            if isinstance(rows[col].dtype, pd.CategoricalDtype)
            else values
        )
        written.append(key)
    logger.info("Wrote cell table %r .obs%s.", table_key, written)
