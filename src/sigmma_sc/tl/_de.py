"""``sg.tl.microenvironment_de``: differential expression between microenvironments, as a tidy table."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._utils._labels import microenvironment_labels
from .._utils._validate import counts_matrix, get_table

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_COLUMNS = {
    "group": "group",
    "names": "gene",
    "scores": "score",
    "logfoldchanges": "logfoldchange",
    "pvals": "pval",
    "pvals_adj": "pval_adj",
    "pct_nz_group": "pct_in",
    "pct_nz_reference": "pct_out",
}


def microenvironment_de(
    sdata: SpatialData,
    *,
    scale: str = "micro",
    groups: Sequence[str] | None = None,
    reference: str = "rest",
    n_genes: int | None = 100,
    table_key: str = "table",
    layer: str | None = None,
    key: str | None = None,
    method: str = "wilcoxon",
    target_sum: float | None = 1e4,
) -> pd.DataFrame:
    """Rank the genes that distinguish each microenvironment (scanpy's ``rank_genes_groups``).

    Counts are library-size normalised (``target_sum`` per cell) and ``log1p``-transformed in a private
    copy: the cell table is not modified. Cells without a microenvironment (untiled cells) are left out,
    as are microenvironments with fewer than 2 cells.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.tl.microenvironments`.
    scale
        Scale whose microenvironments are compared (``.obs['sigmma_microenv_{scale}']``).
    groups
        Microenvironments to test (default: all); each is compared with ``reference``.
    reference
        ``'rest'`` (all other microenvironments) or one microenvironment, e.g. an immune-excluded one.
    n_genes
        Genes reported per microenvironment, best first (``None``: all genes).
    table_key
        Cell table.
    layer
        Layer holding raw counts (default ``.X``).
    key
        Which labels: an ``.obs`` column (any categorical), or the ``use_rep`` of a
        :func:`sigmma_sc.tl.microenvironments` run whose column of ``scale`` is read (default: the run of
        ``'sigmma'``).
    method
        Test of :func:`scanpy.tl.rank_genes_groups` (``'wilcoxon'``, ``'t-test'``, ``'logreg'`` ...).
    target_sum
        Counts per cell after normalisation (``None``: the median library size).

    Returns
    -------
    Tidy table, one row per (microenvironment, gene), ranked by ``score`` within each group: columns
    ``group``, ``gene``, ``score``, ``logfoldchange`` (log2), ``pval``, ``pval_adj`` (Benjamini-Hochberg),
    ``pct_in`` / ``pct_out`` (fraction of cells with non-zero counts in the group / in the reference).
    Nothing is written to ``sdata``.
    """
    import anndata as ad
    import scanpy as sc

    cells = get_table(sdata, table_key)
    labels, key = microenvironment_labels(cells, scale=scale, key=key, table_key=table_key)
    counts = counts_matrix(cells, layer, table_key)
    ok = labels.notna().to_numpy()
    labels = labels[ok].astype(str)
    sizes = labels.value_counts()
    testable = sorted(sizes.index[sizes >= 2], key=_natural)
    if reference != "rest" and str(reference) not in testable:
        raise ValueError(
            f"Reference {reference!r} is not a group of `.obs[{key!r}]` with at least 2 cells: {testable}."
        )
    if groups is None:
        groups = [g for g in testable if g != str(reference)]
    else:
        groups = [str(g) for g in groups]
        missing = sorted(set(groups) - set(testable))
        if missing:
            raise ValueError(f"Groups {missing} are not groups of `.obs[{key!r}]` with at least 2 cells: {testable}.")
    dropped = sorted(set(sizes.index) - set(testable))
    if dropped:
        logger.warning("Leaving out groups with fewer than 2 cells: %s.", dropped)
    if not groups or (reference == "rest" and len(testable) < 2):
        raise ValueError(f"`.obs[{key!r}]` needs at least two groups of 2 or more cells to compare; found {testable}.")

    keep = labels.isin(testable).to_numpy()
    adata = ad.AnnData(
        X=counts[np.flatnonzero(ok)[keep]],
        obs=pd.DataFrame({"group": pd.Categorical(labels[keep], categories=testable)}, index=labels.index[keep]),
        var=pd.DataFrame(index=cells.var_names.astype(str)),
    )
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    with warnings.catch_warnings():
        # scanpy fills its result frame column by column: pandas warns about fragmentation once per group
        # (noise about scanpy's internals, nothing a user can act on)
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(
            adata,
            "group",
            groups=groups,
            reference=str(reference),
            method=method,
            n_genes=adata.n_vars,
            pts=True,
            use_raw=False,
        )
    out = sc.get.rank_genes_groups_df(adata, group=groups)
    if "group" not in out:  # a single group comes back without the group column
        out.insert(0, "group", groups[0])
    if "pct_nz_reference" not in out and reference != "rest":
        pts = adata.uns["rank_genes_groups"]["pts"]
        out["pct_nz_reference"] = pts[str(reference)].reindex(out["names"]).to_numpy()
    out = out.rename(columns=_COLUMNS)
    out = out[[c for c in _COLUMNS.values() if c in out.columns]]
    out["group"] = pd.Categorical(out["group"].astype(str), categories=groups)
    out = out.sort_values(["group", "score"], ascending=[True, False], kind="stable")
    if n_genes is not None:
        out = out.groupby("group", observed=True, sort=False).head(int(n_genes))
    logger.info(
        "Ranked %d genes for %d groups of `.obs[%r]` against %r (%s).",
        adata.n_vars,
        len(groups),
        key,
        reference,
        method,
    )
    return out.reset_index(drop=True)


def _natural(label: str) -> tuple[int, int | str]:
    """Sort key: integer-like labels numerically, then the rest alphabetically."""
    return (0, int(label)) if str(label).lstrip("-").isdigit() else (1, str(label))
