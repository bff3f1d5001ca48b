"""``sg.tl.microenvironment_composition``: fractions of a categorical ``.obs`` column per microenvironment."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._utils._labels import microenvironment_labels
from .._utils._validate import get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData


def microenvironment_composition(
    sdata: SpatialData,
    *,
    scale: str = "micro",
    groupby: str = "cell_type",
    table_key: str = "table",
    normalize: bool = True,
    key: str | None = None,
) -> pd.DataFrame:
    """Composition of each microenvironment in the categories of ``.obs[groupby]`` (paper Fig. 3b).

    Cells without a microenvironment (untiled) or without a ``groupby`` value are left out.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.tl.microenvironments`.
    scale
        Scale of the microenvironments (``.obs['sigmma_microenv_{scale}']``).
    groupby
        Categorical ``.obs`` column of the cell table, e.g. a cell-type annotation.
    table_key
        Cell table.
    normalize
        Return fractions (each row sums to 1) instead of cell counts.
    key
        Which labels: an ``.obs`` column, or the ``use_rep`` of a :func:`sigmma_sc.tl.microenvironments` run whose
        column of ``scale`` is read (default: the run of ``'sigmma'``).

    Returns
    -------
    Microenvironment x category table (index named after the microenvironment column, columns after
    ``groupby``), in the categories' order. Its ``attrs['n_cells']`` holds each microenvironment's number
    of cells (a dict label -> count). Nothing is written to ``sdata``.
    """
    cells = get_table(sdata, table_key)
    labels, key = microenvironment_labels(cells, scale=scale, key=key, table_key=table_key)
    if groupby not in cells.obs:
        raise KeyError(
            f"Table {table_key!r} has no `.obs[{groupby!r}]`; pass `groupby=` naming a categorical column "
            f"(available: {list(cells.obs.columns)})."
        )
    other = cells.obs[groupby]
    if not isinstance(other.dtype, pd.CategoricalDtype):
        other = other.astype("category")
    counts = pd.crosstab(labels, other, dropna=True)
    counts = counts.reindex(
        index=[c for c in labels.cat.categories if c in counts.index],
        columns=[c for c in other.cat.categories if c in counts.columns],
        fill_value=0,
    )
    counts.index.name, counts.columns.name = key, groupby
    n_cells = counts.sum(axis=1)
    out = counts.div(n_cells.where(n_cells > 0, 1), axis=0) if normalize else counts
    out.attrs["n_cells"] = {str(k): int(v) for k, v in n_cells.items()}
    return out
