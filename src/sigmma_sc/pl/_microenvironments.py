"""``sg.pl.microenvironments``: one spatial panel per scale, cells coloured by microenvironment (paper Fig. 3a)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._constants import SCALES, Keys
from ..tl._composition import microenvironment_labels
from ._utils import (
    category_colors,
    cells_and_tiling,
    data_bounds,
    draw_image,
    in_bounds,
    new_axes,
    save_figure,
    scatter_categorical,
    spatial_frame,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def microenvironments(
    sdata: SpatialData,
    *,
    scale: str | Sequence[str] = SCALES,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    key: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    image_alpha: float = 0.5,
    crop: Sequence[float] | None = None,
    point_size: float | None = None,
    alpha: float = 0.9,
    palette: str | Sequence[str] | Mapping[str, str] | None = None,
    ncols: int | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Axes | Figure:
    """Cells on the section coloured by microenvironment, one panel per scale (paper Fig. 3a).

    Cells are drawn at their centroids in µm (rasterised, so sections of hundreds of thousands of cells
    render quickly and stay light in vector formats) over the section's image, read at a resolution
    matched to the panel (one pyramid level, never the full-resolution image) and placed by its
    registration. Each panel has its own legend; cells without a microenvironment (untiled) are grey.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.tl.microenvironments`.
    scale
        Scale(s) to show, one panel each (as in :func:`sigmma_sc.tl.microenvironments`).
    table_key
        Cell table.
    tile_key
        Tile table (gives the coordinate system and µm per unit).
    key
        Which labels: the ``use_rep`` of a :func:`sigmma_sc.tl.microenvironments` run (default ``'sigmma'``; its
        recorded ``.obs`` key of each scale is shown), an ``.obs`` key pattern with ``{scale}``, or an ``.obs``
        column (e.g. ``'cell_type'``).
    image_key
        Background image (default: the tiled image, e.g. the H&E).
    show_image
        Whether to draw the background image.
    image_alpha
        Opacity of the image.
    crop
        ``(xmin, ymin, xmax, ymax)`` in µm of the tiling coordinate system, for a close-up.
    point_size
        Marker area in pt² (default: from the number of cells and the panel size).
    alpha
        Opacity of the cells.
    palette
        Colormap name, list of colours or dict label -> colour (default: colours stored in
        ``.uns['{key}_colors']`` by scanpy, else scanpy's default palette).
    ncols
        Panels per row (default: all in one row).
    ax
        Axes to draw into, one per scale.
    figsize
        Figure size in inches (default: 5.5 x 4.5 per panel).
    save
        Path to save the figure to (format from the suffix).

    Returns
    -------
    One scale: the :class:`~matplotlib.axes.Axes`; several: the :class:`~matplotlib.figure.Figure` of the panels.
    """
    scales = (scale,) if isinstance(scale, str) else tuple(scale)
    bad = [s for s in scales if s not in SCALES]
    if bad or not scales:
        raise ValueError(f"`scale` must be among {SCALES}, got {scales!r}.")
    cells, params, xy = cells_and_tiling(sdata, table_key, tile_key)
    microenv = key is None or (key not in cells.obs and "{scale}" not in key)  # labels of tl.microenvironments
    if key is not None and "{scale}" in key:
        keys = [key.format(scale=s) for s in scales]
        for k in keys:
            if k not in cells.obs:
                raise KeyError(f"Table {table_key!r} lacks `.obs[{k!r}]`.")
    else:
        keys = [microenvironment_labels(cells, scale=s, key=key, table_key=table_key)[1] for s in scales]
    bounds = data_bounds(xy, crop)
    shown = in_bounds(xy, bounds)
    fig, axes = new_axes(len(scales), ax=ax, figsize=figsize, panel=(5.5, 4.5), ncols=ncols)
    for s, k, a in zip(scales, keys, axes, strict=True):
        labels = cells.obs[k]
        cats = list(labels.cat.categories) if hasattr(labels, "cat") else sorted(labels.dropna().unique())
        colors = category_colors(cats, palette, cells.uns.get(f"{k}_colors"))
        if show_image:
            draw_image(a, sdata, params, image_key=image_key, bounds_um=bounds, alpha=image_alpha)
        a.set_xlim(bounds[0], bounds[2])  # size the markers on the final limits
        a.set_ylim(bounds[3], bounds[1])
        a.set_aspect("equal")
        scatter_categorical(
            a,
            xy[shown],
            labels[shown],
            colors,
            point_size=point_size,
            alpha=alpha,
            na_label="untiled",
            legend_title=s if microenv else k,
        )
        n = len([c for c in cats if (labels[shown] == c).any()])
        title = f"{s} scale: {n} microenvironments" if microenv else f"{k}"
        spatial_frame(a, bounds, title=title)
    save_figure(fig, save)
    return axes[0] if len(scales) == 1 else fig
