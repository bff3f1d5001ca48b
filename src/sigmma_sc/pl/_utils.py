"""Shared plotting helpers: cell coordinates in µm, image backgrounds, rasterised scatter, palettes, scale bars."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._constants import Keys
from .._utils._validate import get_table

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

NA_COLOR = "#d3d3d3"
"""Colour of cells without a label (e.g. untiled cells)."""


def tiling(sdata: SpatialData, tile_key: str = Keys.TILE_TABLE) -> dict:
    """Tile parameters recorded by ``sg.pp.tile`` (coordinate system, µm per unit, image key, tile size)."""
    from ..data import tile_params

    return tile_params(sdata, tile_key)


def cell_xy_um(cells: AnnData, params: Mapping[str, Any], table_key: str) -> np.ndarray:
    """Cell centroids ``(n, 2)`` in µm of the tiling coordinate system (NaN where unknown)."""
    from .._utils._record import tiling_keys

    key = tiling_keys(params)["cell_spatial"]
    if key not in cells.obsm:
        raise KeyError(f"Table {table_key!r} lacks `.obsm[{key!r}]`; run `sg.pp.tile` first.")
    return np.asarray(cells.obsm[key], dtype=np.float64) * float(params["um_per_unit"])


def new_axes(
    n: int,
    *,
    ax: Axes | Sequence[Axes] | None,
    figsize: tuple[float, float] | None,
    panel: tuple[float, float],
    ncols=None,
) -> tuple[Figure, list[Axes]]:
    """``n`` axes: the given ones (checked) or a new figure with a grid of panels of size ``panel`` (inches)."""
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = [ax] if not isinstance(ax, Sequence | np.ndarray) else list(np.ravel(ax))
        if len(axes) != n:
            raise ValueError(f"Expected {n} axes in `ax`, got {len(axes)}.")
        return axes[0].figure, axes
    ncols = max(1, min(n, ncols or n))
    nrows = int(np.ceil(n / ncols))
    figsize = figsize or (panel[0] * ncols, panel[1] * nrows)
    fig, grid = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    axes = list(grid.ravel())
    for extra in axes[n:]:
        extra.remove()
    return fig, axes[:n]


def save_figure(fig: Figure, save: str | Path | None, dpi: int = 150) -> None:
    """Write ``fig`` to ``save`` (format from the suffix; ``.png`` when there is none)."""
    if save is None:
        return
    path = Path(save)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    logger.info("Saved figure to %s.", path)


def default_palette(n: int) -> list[str]:
    """Scanpy's default categorical palettes (20, 28 or 102 colours), then a repeating ``tab20``."""
    from scanpy.plotting import palettes

    for pal in (palettes.default_20, palettes.default_28, palettes.default_102):
        if n <= len(pal):
            return list(pal[:n])
    import matplotlib as mpl

    cmap = mpl.colormaps["tab20"]
    return [mpl.colors.to_hex(cmap(i % 20)) for i in range(n)]


def category_colors(
    categories: Sequence[str],
    palette: str | Sequence[str] | Mapping[str, str] | None = None,
    stored: Sequence[str] | None = None,
) -> dict[str, str]:
    """Colour per category.

    From ``palette`` (a colormap name, list or dict), else the table's stored scanpy colours
    (``.uns['{key}_colors']``) when they fit, else scanpy's defaults.
    """
    import matplotlib as mpl

    cats = [str(c) for c in categories]
    if isinstance(palette, Mapping):
        missing = [c for c in cats if c not in palette]
        if missing:
            raise ValueError(f"`palette` has no colour for categories {missing}.")
        return {c: mpl.colors.to_hex(palette[c]) for c in cats}
    if isinstance(palette, str):
        cmap = mpl.colormaps[palette]
        n = getattr(cmap, "N", 256)
        if n <= 32:  # a qualitative map: cycle through its colours
            return {c: mpl.colors.to_hex(cmap(i % n)) for i, c in enumerate(cats)}
        return {c: mpl.colors.to_hex(cmap(x)) for c, x in zip(cats, np.linspace(0, 1, max(len(cats), 2)), strict=False)}
    if palette is not None:
        palette = list(palette)
        if len(palette) < len(cats):
            raise ValueError(f"`palette` has {len(palette)} colours for {len(cats)} categories.")
        return {c: mpl.colors.to_hex(p) for c, p in zip(cats, palette, strict=False)}
    if stored is not None and len(stored) == len(cats):
        return {c: mpl.colors.to_hex(p) for c, p in zip(cats, stored, strict=True)}
    return dict(zip(cats, default_palette(len(cats)), strict=True))


def auto_point_size(n_points: int, ax: Axes, fill: float = 1.0) -> float:
    """Marker area (pt²) so that ``n_points`` markers would cover ``fill`` times the axes, within [0.4, 30].

    The lower bound keeps a marker about one pixel wide at 150 dpi, so dense sections stay visible.
    """
    bbox = ax.get_window_extent().transformed(ax.figure.dpi_scale_trans.inverted())
    area_pt2 = bbox.width * bbox.height * 72.0**2
    return float(np.clip(fill * area_pt2 / max(n_points, 1), 0.4, 30.0))


def scatter_categorical(
    ax: Axes,
    xy: np.ndarray,
    labels: pd.Series,
    colors: Mapping[str, str],
    *,
    point_size: float | None,
    alpha: float = 1.0,
    na_label: str = "no label",
    legend: bool = True,
    legend_title: str | None = None,
    legend_loc: str = "right",
) -> None:
    """Rasterised scatter of cells coloured by category; unlabelled cells in light grey underneath."""
    import matplotlib as mpl
    from matplotlib.lines import Line2D

    labels = labels if isinstance(labels.dtype, pd.CategoricalDtype) else labels.astype("category")
    codes = labels.cat.codes.to_numpy()
    cats = [str(c) for c in labels.cat.categories]
    lut = np.array([mpl.colors.to_rgba(colors[c]) for c in cats] + [mpl.colors.to_rgba(NA_COLOR)])
    finite = np.isfinite(xy).all(1)
    na = (codes < 0) & finite
    s = point_size if point_size is not None else auto_point_size(int(finite.sum()), ax)
    if na.any():
        p = xy[na]
        ax.scatter(p[:, 0], p[:, 1], s=s, c=NA_COLOR, linewidths=0, rasterized=True, alpha=alpha)
    idx = np.flatnonzero((codes >= 0) & finite)
    if idx.size:
        idx = idx[np.random.default_rng(0).permutation(idx.size)]  # no category systematically on top
        ax.scatter(xy[idx, 0], xy[idx, 1], s=s, c=lut[codes[idx]], linewidths=0, rasterized=True, alpha=alpha)
    if not legend:
        return
    present = {cats[c] for c in np.unique(codes[idx])}
    handles = [
        Line2D([], [], marker="o", ls="", markersize=6, markerfacecolor=col, markeredgewidth=0, label=c)
        for c, col in colors.items()
        if c in present
    ]
    if na.any():
        handles.append(
            Line2D([], [], marker="o", ls="", markersize=6, markerfacecolor=NA_COLOR, markeredgewidth=0, label=na_label)
        )
    ncol = int(np.ceil(len(handles) / 16))
    kw = {"frameon": False, "handletextpad": 0.1, "columnspacing": 0.6, "borderaxespad": 0.3, "fontsize": "small"}
    if legend_loc == "right":
        ax.legend(handles=handles, title=legend_title, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=ncol, **kw)
    else:
        ax.legend(handles=handles, title=legend_title, loc=legend_loc, ncol=ncol, **kw)


def axis_label(key: str | None) -> str:
    """``'sigmma_microenv_micro'`` -> ``'micro microenvironment'``; other keys unchanged."""
    scale = {k: s for s, k in Keys.microenvironments().items()}.get(key or "")
    return f"{scale} microenvironment" if scale else key or ""


def nice_length(span: float) -> float:
    """A round length (1, 2 or 5 x 10^k) near a fifth of ``span``."""
    if not np.isfinite(span) or span <= 0:
        return 1.0
    target = span / 5
    base = 10 ** np.floor(np.log10(target))
    for m in (5, 2, 1):
        if m * base <= target:
            return float(m * base)
    return float(base)


def add_scale_bar(ax: Axes, *, units_per_um: float = 1.0, length_um: float | None = None, color: str = "black") -> None:
    """Draw a scale bar in µm in the lower right corner (data units are ``units_per_um`` per µm)."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, x1 = ax.get_xlim()
    span_um = abs(x1 - x0) / units_per_um
    length_um = length_um or nice_length(span_um)
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
    bar = AnchoredSizeBar(
        ax.transData,
        length_um * units_per_um,
        label,
        "lower right",
        pad=0.4,
        sep=3,
        color=color,
        frameon=True,
        size_vertical=0,
        fontproperties=FontProperties(size="small"),
    )
    bar.patch.set_alpha(0.7)
    bar.patch.set_edgecolor("none")
    # AnchoredSizeBar draws a zero-height rectangle; give it a visible thickness in points
    for child in bar.size_bar.get_children():
        child.set_linewidth(2.5)
        child.set_edgecolor(color)
    ax.add_artist(bar)


def draw_image(
    ax: Axes,
    sdata: SpatialData,
    params: Mapping[str, Any],
    *,
    image_key: str | None,
    bounds_um: tuple[float, float, float, float],
    alpha: float = 1.0,
    max_pixels: int = 1500,
) -> None:
    """Draw the image under the cells over ``bounds_um`` (``(xmin, ymin, xmax, ymax)`` in µm), registered.

    The window is resampled onto the coordinate grid (rotations and shears of the registration are
    honoured) at about ``max_pixels`` pixels per side, from the coarsest pyramid level fine enough; only
    the window of that level is read. An image without a pyramid level near that resolution is shown
    from a strided view of the whole image instead (never the full-resolution image).
    """
    import matplotlib as mpl

    from ..data._tiles import tile_reader

    reader = tile_reader(sdata, image_key=image_key)
    upu = float(params["um_per_unit"])
    xmin, ymin, xmax, ymax = bounds_um
    side_um = max(xmax - xmin, ymax - ymin)
    target_um = max(side_um / max_pixels, reader.pixel_size_um)
    level = reader.level_for(target_um)
    kw = {"origin": "upper", "interpolation": "antialiased", "alpha": alpha, "zorder": 0}
    if reader.levels[level].pixel_size_um * 4 >= target_um:  # a pyramid level close enough: read the window
        out_px = max(2, int(np.ceil(side_um / target_um)))
        img = reader.read_square(xmin / upu, ymin / upu, side_um / upu, out_px, level=level)
        kw["extent"] = (xmin, xmin + side_um, ymin + side_um, ymin)
        _imshow(ax, img, kw)
        return
    img, affine = reader.thumbnail(target_um)
    to_um = np.diag([upu, upu, 1.0]) @ affine
    h, w = img.shape[1:]
    kw["extent"] = (0, w, h, 0)
    im = _imshow(ax, img, kw)
    im.set_transform(mpl.transforms.Affine2D(to_um) + ax.transData)


def _imshow(ax: Axes, img: np.ndarray, kw: dict):
    if img.shape[0] >= 3:
        return ax.imshow(np.moveaxis(img[:3], 0, -1), **kw)
    return ax.imshow(img[0], cmap="gray", vmin=0, vmax=255, **kw)


def spatial_frame(ax: Axes, bounds_um: tuple[float, float, float, float], *, title: str | None = None) -> None:
    """Limits (image orientation: y down), equal aspect, no ticks, a scale bar and a title."""
    xmin, ymin, xmax, ymax = bounds_um
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymax, ymin)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    add_scale_bar(ax)


def data_bounds(xy: np.ndarray, crop: Sequence[float] | None = None, pad: float = 0.02) -> tuple[float, ...]:
    """``(xmin, ymin, xmax, ymax)`` of the finite points (padded), or ``crop``."""
    if crop is not None:
        if len(crop) != 4 or crop[0] >= crop[2] or crop[1] >= crop[3]:
            raise ValueError(f"`crop` must be (xmin, ymin, xmax, ymax) in µm with min < max, got {crop!r}.")
        return tuple(float(c) for c in crop)
    p = xy[np.isfinite(xy).all(1)]
    if not len(p):
        raise ValueError("No cell has finite coordinates to plot.")
    lo, hi = p.min(0), p.max(0)
    d = max(float((hi - lo).max()) * pad, 1e-6)
    return (lo[0] - d, lo[1] - d, hi[0] + d, hi[1] + d)


def in_bounds(xy: np.ndarray, bounds: Sequence[float]) -> np.ndarray:
    """Whether each point lies inside ``bounds`` (``(xmin, ymin, xmax, ymax)``)."""
    return (xy[:, 0] >= bounds[0]) & (xy[:, 0] <= bounds[2]) & (xy[:, 1] >= bounds[1]) & (xy[:, 1] <= bounds[3])


def cells_and_tiling(sdata: SpatialData, table_key: str, tile_key: str) -> tuple[AnnData, dict, np.ndarray]:
    """The cell table, the tiling parameters and the cells' µm coordinates."""
    cells = get_table(sdata, table_key)
    params = tiling(sdata, tile_key)
    return cells, params, cell_xy_um(cells, params, table_key)
