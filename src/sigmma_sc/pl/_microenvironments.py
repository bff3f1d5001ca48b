"""``sg.pl.microenvironments``: one spatial panel per scale, cells coloured by microenvironment (paper Fig. 3a)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._constants import SCALES, Keys
from .._utils._labels import microenvironment_labels
from .._utils._record import read_record
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
    scale: str | Sequence[str] | None = None,
    table_key: str = "table",
    tile_key: str = Keys.TILE_TABLE,
    key: str | None = None,
    image_key: str | None = None,
    show_image: bool = True,
    image_alpha: float = 0.5,
    crop: Sequence[float] | None = None,
    zoom: Sequence[float] | Literal["auto"] | None = "auto",
    zoom_um: float = 400.0,
    point_size: float | None = None,
    alpha: float = 0.9,
    palette: str | Sequence[str] | Mapping[str, str] | None = None,
    ncols: int | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Axes | Figure:
    """Cells on the section coloured by microenvironment, one panel per scale (paper Fig. 3a), and a close-up.

    Cells are drawn at their centroids in µm (rasterised, so sections of hundreds of thousands of cells
    render quickly and stay light in vector formats) over the section's image, read at a resolution
    matched to the panel (one pyramid level, never the full-resolution image) and placed by its
    registration. Each panel has its own legend; cells without a microenvironment (untiled) are grey. Under
    each whole-section panel, a close-up window (outlined on the panel above) shows the same labels over the
    image at a finer resolution, where single cells and the tissue under them can be told apart.

    Parameters
    ----------
    sdata
        SpatialData object processed by :func:`sigmma_sc.tl.microenvironments`.
    scale
        Scale(s) to show, one panel each (as in :func:`sigmma_sc.tl.microenvironments`); default: the scales
        clustered (all three if unknown).
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
        ``(xmin, ymin, xmax, ymax)`` in µm of the tiling coordinate system: the extent of the main panels.
    zoom
        The close-up window ``(xmin, ymin, xmax, ymax)`` in µm, ``'auto'`` (a ``zoom_um`` square around the
        median cell of the main panels; none when the panels are no larger than it, or when ``ax`` holds one
        Axes per scale) or ``None`` (no close-up).
    zoom_um
        Side of the ``'auto'`` close-up window, in µm.
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
        Axes to draw into: one per scale, or with a close-up window two per scale (the whole-section panels,
        then the close-ups).
    figsize
        Figure size in inches (default: 5.5 x 4.5 per panel).
    save
        Path to save the figure to (format from the suffix).

    Returns
    -------
    One scale without a close-up: the :class:`~matplotlib.axes.Axes`; otherwise the
    :class:`~matplotlib.figure.Figure` of the panels (whole-section panels in the first row, close-ups below).
    """
    cells, params, xy = cells_and_tiling(sdata, table_key, tile_key)
    if scale is None:
        record = read_record(cells, Keys.PREFIX if key is None else key, "microenvironments") or {}
        scale = tuple(s for s in SCALES if s in (record.get("keys") or {})) or SCALES
    scales = (scale,) if isinstance(scale, str) else tuple(scale)
    bad = [s for s in scales if s not in SCALES]
    if bad or not scales:
        raise ValueError(f"`scale` must be among {SCALES}, got {scales!r}.")
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
    window = _zoom_window(zoom, zoom_um, xy[shown], bounds, ax=ax, n_scales=len(scales))
    n_panels = len(scales) * (2 if window is not None else 1)
    if window is not None and ax is None:
        fig, axes = new_axes(n_panels, ax=None, figsize=figsize, panel=(5.5, 4.5), ncols=len(scales))
    else:
        fig, axes = new_axes(n_panels, ax=ax, figsize=figsize, panel=(5.5, 4.5), ncols=ncols)
    for i, (s, k) in enumerate(zip(scales, keys, strict=True)):
        labels = cells.obs[k]
        cats = list(labels.cat.categories) if hasattr(labels, "cat") else sorted(labels.dropna().unique())
        colors = category_colors(cats, palette, cells.uns.get(f"{k}_colors"))
        views = [(axes[i], bounds, shown, True)]
        if window is not None:
            views.append((axes[len(scales) + i], window, in_bounds(xy, window), False))
        for a, box, inside, main in views:
            if show_image:
                draw_image(a, sdata, params, image_key=image_key, bounds_um=box, alpha=image_alpha)
            a.set_xlim(box[0], box[2])  # size the markers on the final limits
            a.set_ylim(box[3], box[1])
            a.set_aspect("equal")
            scatter_categorical(
                a,
                xy[inside],
                labels[inside],
                colors,
                point_size=point_size if main or point_size is None else point_size * 4,
                alpha=alpha,
                na_label="untiled",
                legend=main,
                legend_title=s if microenv else k,
            )
            n = len([c for c in cats if (labels[inside] == c).any()])
            if main:
                title = f"{s} scale: {n} microenvironments" if microenv else f"{k}"
            else:
                title = f"{s} scale, close-up: {n} in view"
            spatial_frame(a, box, title=title)
        if window is not None:
            _outline(axes[i], window)
    save_figure(fig, save)
    return axes[0] if n_panels == 1 else fig


def _zoom_window(zoom, zoom_um: float, xy: np.ndarray, bounds, *, ax, n_scales: int) -> tuple[float, ...] | None:
    """The close-up window ``(xmin, ymin, xmax, ymax)`` in µm, or ``None``."""
    if zoom is None:
        return None
    if isinstance(zoom, str):
        if zoom != "auto":
            raise ValueError(f"`zoom` must be 'auto', None or (xmin, ymin, xmax, ymax) in µm, got {zoom!r}.")
        n_ax = None if ax is None else len(np.ravel(ax)) if isinstance(ax, Sequence | np.ndarray) else 1
        if n_ax == n_scales or not zoom_um > 0:
            return None
        if max(bounds[2] - bounds[0], bounds[3] - bounds[1]) <= zoom_um:
            return None  # the panels are no larger than the close-up
        finite = xy[np.isfinite(xy).all(1)]
        if not len(finite):
            return None
        cx, cy = np.median(finite, axis=0)
        half = zoom_um / 2
        return (float(cx - half), float(cy - half), float(cx + half), float(cy + half))
    return data_bounds(np.empty((0, 2)), zoom)


def _outline(ax, box) -> None:
    """The close-up window as a rectangle on the whole-section panel."""
    from matplotlib.patches import Rectangle

    ax.add_patch(
        Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec="black", lw=1.2, zorder=5)
    )
