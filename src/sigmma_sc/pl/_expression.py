"""``sg.pl.expression``: expression of chosen genes per microenvironment (violins) or on the section (paper Fig. 3c)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import Keys
from .._utils._labels import microenvironment_labels
from .._utils._validate import get_table
from ._utils import (
    NA_COLOR,
    auto_point_size,
    axis_label,
    category_colors,
    cells_and_tiling,
    data_bounds,
    draw_image,
    in_bounds,
    new_axes,
    save_figure,
    spatial_frame,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_MAX_KDE = 20_000  # cells per violin used for the density estimate


def expression(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    kind: Literal["violin", "spatial"] = "violin",
    scale: str = "micro",
    groupby: str | None = None,
    groups: Sequence[str] | None = None,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    layer: str | None = None,
    normalize: bool = True,
    target_sum: float = 1e4,
    palette: str | Sequence[str] | Mapping[str, str] | None = None,
    cmap: str = "viridis",
    image_key: str | None = None,
    show_image: bool = False,
    crop: Sequence[float] | None = None,
    point_size: float | None = None,
    ncols: int | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Axes | Figure:
    """Expression of ``genes`` per microenvironment (violins) or on the section (paper Fig. 3c), one panel per gene.

    Values are ``log1p`` of counts normalised to ``target_sum`` per cell, computed for these genes only
    (the table is not modified).

    Parameters
    ----------
    sdata
        SpatialData object with a cell table (and, for violins, microenvironments from
        :func:`sigmma_sc.tl.microenvironments`).
    genes
        Gene name(s) from the cell table's ``var_names``.
    kind
        ``'violin'``: distribution per group; ``'spatial'``: cells on the section coloured by expression.
    scale
        Scale of the microenvironments used as groups.
    groupby
        Categorical ``.obs`` column to group by instead of the microenvironments of ``scale``.
    groups
        Groups to show, in this order (default: all), e.g. tumour-associated vs immune-excluded
        microenvironments. With ``kind='spatial'``, only cells of these groups are coloured.
    table_key
        Cell table.
    tile_key
        Tile table (coordinate system and µm per unit, for ``kind='spatial'``).
    layer
        Layer holding raw counts (default ``.X``).
    normalize
        Normalise and log-transform the counts; ``False`` shows the values as stored.
    target_sum
        Counts per cell after normalisation.
    palette
        Colours of the groups (violins).
    cmap
        Colormap of the expression (spatial).
    image_key
        Background image (spatial; default: the tiled image).
    show_image
        Whether to draw the background image (spatial).
    crop
        ``(xmin, ymin, xmax, ymax)`` in µm (spatial).
    point_size
        Marker area in pt² (spatial).
    ncols
        Panels per row.
    ax
        Axes to draw into, one per gene.
    figsize
        Figure size in inches.
    save
        Path to save the figure to.

    Returns
    -------
    One gene: the :class:`~matplotlib.axes.Axes`; several: the :class:`~matplotlib.figure.Figure` of the panels.
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    if kind not in ("violin", "spatial"):
        raise ValueError(f"`kind` must be 'violin' or 'spatial', got {kind!r}.")
    cells = get_table(sdata, table_key)
    values = gene_values(cells, genes, layer=layer, normalize=normalize, target_sum=target_sum, table_key=table_key)
    ylabel = "log1p(normalised counts)" if normalize else (layer or "X")
    labels = None
    if kind == "violin" or groups is not None or groupby is not None:
        labels, key = microenvironment_labels(cells, scale=scale, key=groupby, table_key=table_key)
        cats = [str(c) for c in labels.cat.categories]
        if groups is not None:
            groups = [str(g) for g in groups]
            missing = sorted(set(groups) - set(cats))
            if missing:
                raise ValueError(f"Groups {missing} are not in `.obs[{key!r}]` (groups: {cats}).")
            cats = groups
    if kind == "violin":
        present = set(labels.dropna().astype(str))
        cats = [c for c in cats if c in present]
        all_cats = [str(c) for c in labels.cat.categories]
        if isinstance(palette, Mapping) or (
            palette is not None and not isinstance(palette, str) and groups is not None
        ):
            colors = category_colors(cats, palette)  # colours given for the shown groups
        else:  # the same colours as sg.pl.microenvironments, whichever groups are shown
            colors = category_colors(all_cats, palette, cells.uns.get(f"{key}_colors"))
        width = max(3.0, 0.45 * len(cats) + 1.5)
        fig, axes = new_axes(len(genes), ax=ax, figsize=figsize, panel=(width, 3.2), ncols=ncols)
        lab = labels.astype(object).astype(str).to_numpy()
        for g, a in zip(genes, axes, strict=True):
            _violins(a, values[g], lab, cats, colors)
            a.set_title(g, style="italic")
            a.set_ylabel(ylabel)
            a.set_xlabel(axis_label(key))
        save_figure(fig, save)
        return axes[0] if len(genes) == 1 else fig

    _, params, xy = cells_and_tiling(sdata, table_key, tile_key)
    bounds = data_bounds(xy, crop)
    fig, axes = new_axes(len(genes), ax=ax, figsize=figsize, panel=(5.0, 4.3), ncols=ncols)
    shown = in_bounds(xy, bounds)
    if labels is not None:
        selected = labels.astype(object).astype(str).isin(cats).to_numpy() & labels.notna().to_numpy()
    else:
        selected = np.ones(len(xy), bool)
    for g, a in zip(genes, axes, strict=True):
        if show_image:
            draw_image(a, sdata, params, image_key=image_key, bounds_um=bounds)
        a.set_xlim(bounds[0], bounds[2])
        a.set_ylim(bounds[3], bounds[1])
        a.set_aspect("equal")
        s = point_size if point_size is not None else auto_point_size(int(shown.sum()), a)
        other = shown & ~selected
        if other.any():
            a.scatter(*xy[other].T, s=s, c=NA_COLOR, linewidths=0, rasterized=True)
        idx = np.flatnonzero(shown & selected)
        v = values[g].to_numpy()[idx]
        order = np.argsort(v, kind="stable")  # high expression on top
        top = float(np.nanpercentile(v, 99.5)) if v.size else 1.0
        sc = a.scatter(
            *xy[idx[order]].T,
            s=s,
            c=v[order],
            cmap=cmap,
            vmin=0,
            vmax=max(top, 1e-6),
            linewidths=0,
            rasterized=True,
        )
        cb = fig.colorbar(sc, ax=a, shrink=0.7, pad=0.02)
        cb.set_label(ylabel, fontsize="small")
        spatial_frame(a, bounds, title=g)
        a.title.set_style("italic")
    save_figure(fig, save)
    return axes[0] if len(genes) == 1 else fig


def gene_values(
    cells: AnnData,
    genes: Sequence[str],
    *,
    layer: str | None = None,
    normalize: bool = True,
    target_sum: float = 1e4,
    table_key: str = "table",
) -> pd.DataFrame:
    """Per-cell values of ``genes`` (``log1p`` of library-normalised counts), as a cells x genes DataFrame."""
    names = cells.var_names.astype(str)
    missing = [g for g in genes if g not in names]
    if missing:
        raise KeyError(f"Genes {missing} are not in `var_names` of table {table_key!r}.")
    if layer is not None and layer not in cells.layers:
        raise KeyError(f"No layer {layer!r} in table {table_key!r}; available layers: {sorted(cells.layers)}.")
    X = cells.X if layer is None else cells.layers[layer]
    if hasattr(X, "compute"):
        X = X.compute()
    cols = names.get_indexer(genes)
    sub = X[:, cols]
    sub = np.asarray(sub.toarray() if sparse.issparse(sub) else sub, dtype=np.float64)
    if normalize:
        lib = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
        sub = np.log1p(sub / np.where(lib > 0, lib, 1.0)[:, None] * target_sum)
    return pd.DataFrame(sub, index=cells.obs_names, columns=list(genes))


def _violins(ax: Axes, values: pd.Series, labels: np.ndarray, cats: list[str], colors: Mapping[str, str]) -> None:
    rng = np.random.default_rng(0)
    data, pos = [], []
    for i, c in enumerate(cats):
        v = values.to_numpy()[labels == c]
        v = v[np.isfinite(v)]
        if v.size > _MAX_KDE:
            v = rng.choice(v, _MAX_KDE, replace=False)
        if v.size:
            data.append(v if np.ptp(v) > 0 else v + rng.normal(0, 1e-3, v.size))
            pos.append(i)
    if data:
        parts = ax.violinplot(data, positions=pos, widths=0.8, showextrema=False, showmedians=False)
        for body, p in zip(parts["bodies"], pos, strict=True):
            body.set_facecolor(colors[cats[p]])
            body.set_edgecolor("0.2")
            body.set_linewidth(0.5)
            body.set_alpha(0.9)
        means = [float(np.mean(d)) for d in data]
        ax.scatter(pos, means, marker="_", s=120, color="black", zorder=3, label="mean")
        ax.legend(loc="upper right", frameon=False, fontsize="x-small", handletextpad=0.2)
    ax.set_xticks(range(len(cats)), cats, rotation=90 if max(map(len, cats), default=0) > 3 else 0)
    ax.set_xlim(-0.6, len(cats) - 0.4)
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
