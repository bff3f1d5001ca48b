"""``sg.pl.composition``: stacked bars of category fractions per microenvironment (paper Fig. 3b)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..tl._composition import microenvironment_composition
from ._utils import axis_label, category_colors, new_axes, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from spatialdata import SpatialData


def composition(
    data: pd.DataFrame | SpatialData,
    *,
    scale: str = "micro",
    groupby: str = "cell_type",
    table_key: str = "table",
    palette: str | Sequence[str] | Mapping[str, str] | None = None,
    horizontal: bool = False,
    show_counts: bool = True,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Stacked bars: the composition of each microenvironment in the categories of ``groupby`` (paper Fig. 3b).

    Parameters
    ----------
    data
        A table from :func:`sigmma_sc.tl.microenvironment_composition` (microenvironments x categories;
        counts are turned into fractions), or a SpatialData object, from which it is computed.
    scale
        Scale of the microenvironments (with a SpatialData object).
    groupby
        Categorical ``.obs`` column (with a SpatialData object).
    table_key
        Cell table (with a SpatialData object).
    palette
        Colormap name, list of colours or dict category -> colour (default: colours stored in
        ``.uns['{groupby}_colors']``, else scanpy's default palette).
    horizontal
        Horizontal bars (one row per microenvironment).
    show_counts
        Write each microenvironment's number of cells at the end of its bar (when known).
    ax
        Axes to draw into.
    figsize
        Figure size in inches.
    save
        Path to save the figure to.

    Returns
    -------
    The axes.
    """
    stored = None
    if isinstance(data, pd.DataFrame):
        df = data
    else:
        df = microenvironment_composition(data, scale=scale, groupby=groupby, table_key=table_key, normalize=True)
        stored = data.tables[table_key].uns.get(f"{groupby}_colors")
        if stored is not None and len(stored) != len(
            data.tables[table_key].obs[groupby].astype("category").cat.categories
        ):
            stored = None
        elif stored is not None:
            cats = list(data.tables[table_key].obs[groupby].astype("category").cat.categories)
            stored = [stored[cats.index(c)] for c in df.columns]
    if df.empty:
        raise ValueError("The composition table is empty: no cell has both a microenvironment and a category.")
    n_cells = df.attrs.get("n_cells")
    if n_cells is None and np.allclose(df.sum(axis=1), np.round(df.sum(axis=1))) and df.to_numpy().max() > 1:
        n_cells = {str(k): int(v) for k, v in df.sum(axis=1).items()}
    frac = df.div(df.sum(axis=1).replace(0, 1), axis=0)
    colors = category_colors([str(c) for c in frac.columns], palette, stored)
    n = len(frac)
    panel = (max(4.0, 0.45 * n + 2.5), 4.0) if not horizontal else (5.5, max(3.0, 0.35 * n + 1.2))
    fig, (a,) = new_axes(1, ax=ax, figsize=figsize, panel=panel)
    pos = np.arange(n)
    bottom = np.zeros(n)
    bar = a.barh if horizontal else a.bar
    for c in frac.columns:
        vals = frac[c].to_numpy(dtype=float)
        kw = {"left": bottom} if horizontal else {"bottom": bottom}
        bar(pos, vals, 0.8, color=colors[str(c)], label=str(c), edgecolor="white", linewidth=0.3, **kw)
        bottom += vals
    labels = [str(i) for i in frac.index]
    name_axis = axis_label(frac.index.name) or "microenvironment"
    if horizontal:
        a.set_yticks(pos, labels)
        a.set_ylabel(name_axis)
        a.set_xlabel("fraction of cells")
        a.set_xlim(0, 1.12 if show_counts and n_cells else 1)
        a.invert_yaxis()
    else:
        a.set_xticks(pos, labels, rotation=90 if max(map(len, labels)) > 3 else 0)
        a.set_xlabel(name_axis)
        a.set_ylabel("fraction of cells")
        a.set_ylim(0, 1.1 if show_counts and n_cells else 1)
    if show_counts and n_cells:
        for p, label in zip(pos, labels, strict=True):
            count = n_cells.get(label)
            if count is None:
                continue
            if horizontal:
                a.text(1.01, p, f"{count:,}", va="center", ha="left", fontsize="x-small")
            else:
                a.text(p, 1.01, f"{count:,}", va="bottom", ha="center", fontsize="x-small", rotation=90)
    for side in ("top", "right"):
        a.spines[side].set_visible(False)
    a.legend(
        title=frac.columns.name,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        frameon=False,
        fontsize="small",
        ncol=int(np.ceil(len(frac.columns) / 18)),
    )
    title = f"{frac.columns.name or 'category'} per {name_axis}"
    a.set_title(
        title + ("\n(number of cells at the end of each bar)" if show_counts and n_cells else ""), fontsize="medium"
    )
    save_figure(fig, save)
    return a
