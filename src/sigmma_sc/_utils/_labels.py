"""Microenvironment labels of a cell table, as every reader of them finds them (tl, pl and metrics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from .._constants import SCALES, Keys
from ._record import read_record

if TYPE_CHECKING:
    from anndata import AnnData


def microenvironment_labels(
    cells: AnnData, *, scale: str = "micro", key: str | None = None, table_key: str = "table"
) -> tuple[pd.Series, str]:
    """The microenvironment labels of ``scale`` as a categorical Series, and their ``.obs`` key.

    ``key``: an ``.obs`` column, or the prefix (``use_rep``) of a :func:`sigmma_sc.tl.microenvironments` run whose
    recorded key of ``scale`` is read; ``None`` is the default prefix ``'sigmma'``. Raises a KeyError naming
    :func:`sigmma_sc.tl.microenvironments` when they have not been computed.
    """
    if key is not None and key in cells.obs:
        pass
    elif key is None or read_record(cells, key, "microenvironments") is not None:
        prefix = Keys.PREFIX if key is None else key
        if scale not in SCALES:
            raise ValueError(f"`scale` must be one of {SCALES}, got {scale!r}.")
        record = read_record(cells, prefix, "microenvironments") or {}
        key = (record.get("keys") or {}).get(scale, Keys.microenvironments(use_rep=prefix)[scale])
        if key not in cells.obs:
            raise KeyError(
                f"Table {table_key!r} lacks `.obs[{key!r}]`; run `sg.tl.microenvironments(sdata, scale={scale!r}"
                + ("" if prefix == Keys.PREFIX else f", use_rep={prefix!r}")
                + ")` first."
            )
    else:
        raise KeyError(
            f"Table {table_key!r} has no `.obs[{key!r}]` and no microenvironments recorded under {key!r}; "
            f"available columns: {list(cells.obs.columns)}."
        )
    labels = cells.obs[key]
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        labels = labels.astype("category")
    return labels, key
