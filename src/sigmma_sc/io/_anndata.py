"""Bring your own section: an AnnData with cell (or spot) coordinates plus an image, into SpatialData in µm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from sigmma_sc._utils._validate import check_positive

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

CELLS_KEY = "cell_circles"
TABLE_KEY = "table"
_CHUNK = 1024
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ndpi", ".qptiff")


def from_anndata(
    adata: AnnData,
    image: Any,
    *,
    pixel_size_um: float,
    coordinates: Literal["pixels", "um"] = "pixels",
    spatial_key: str = "spatial",
    image_key: str | None = None,
    image_axes: str | None = None,
    cell_radius_um: float = 5.0,
    cells_outside: Literal["raise", "drop"] = "raise",
    fluorescence: bool | None = None,
) -> SpatialData:
    """Build a SpatialData section in µm from an AnnData with cell (or spot) coordinates and an image.

    The result has the layout of :func:`sigmma_sc.io.xenium`, so every ``sg`` step accepts it: the image
    element registered to the coordinate system ``'global'``, whose unit is the micrometre, by a scale of
    ``pixel_size_um``; the cells as circles ``'cell_circles'`` (in µm) annotated by the table ``'table'``;
    ``sdata.attrs['sigmma']['um_per_unit'] = {'global': 1.0}``. Image files are read lazily (a TIFF, tiled
    or not, OME-TIFF pyramids level by level, through tifffile's zarr store), so a whole slide is never
    loaded into memory.

    Before building, the cells are checked against the image: cells off the image raise an error with a hint
    (x and y swapped, another unit or scale); cells that all fit but sit on the image's nuclei only in the
    other unit, or cover a corner of the tissue that another unit or scale matches clearly better, get a
    WARNING naming ``coordinates=`` (see the inputs page of the documentation).

    Parameters
    ----------
    adata
        Cells (or spots) x genes, raw counts in ``.X``, a layer or ``.raw`` (scanpy's convention: see ``layer`` of
        :func:`sigmma_sc.pp.tile`); ``adata.obsm[spatial_key]`` holds their centroids (x, y) in image pixels of
        ``image``'s full resolution, or in µm: an array (read by position) or a DataFrame (read by column name,
        e.g. ``['y', 'x']``, ``x_centroid``, ``pxl_col_in_fullres``). It is copied, not changed.
    image
        H&E (RGB) or a 1-channel morphology image (e.g. DAPI): a numpy or dask array (``(y, x)``, ``(y, x, c)``
        or ``(c, y, x)``), a file (TIFF/OME-TIFF, including pyramids; PNG/JPEG are read whole), or a spatialdata
        image element (``DataArray`` or multiscale ``DataTree``; its own transformations are replaced).
        A 4-channel uint8 image is taken as RGBA and its alpha channel is dropped.
    pixel_size_um
        Size of one full-resolution image pixel in µm (e.g. 0.2125 for Xenium morphology, ~0.25 for a 40x H&E scan).
    coordinates
        Unit of ``adata.obsm[spatial_key]``: ``'pixels'`` (full-resolution pixels of ``image``) or ``'um'``.
    spatial_key
        Key of the centroids in ``adata.obsm``.
    image_key
        Name of the image element. Default: ``'he'`` for a 3-channel brightfield image, ``'morphology'`` for 1
        channel or a fluorescence composite.
    image_axes
        Axis order of an array image, e.g. ``'yxc'`` or ``'cyx'``; inferred when ``None``.
    cell_radius_um
        Radius of the cell circles in µm (for display; tiling uses the centroids). For Visium spots, 27.5.
    cells_outside
        Cells whose centroid lies off the image: ``'raise'`` an error, or ``'drop'`` them from the table.
    fluorescence
        Whether the image is a fluorescence image (dark background: filled with 0 outside the image, each
        channel's intensities stretched by its own percentiles, tissue brighter than the background) or
        brightfield (white glass, e.g. H&E). ``None``: brightfield for 3 channels (RGB), fluorescence for 1.
        Pass ``True`` for a 3-channel fluorescence composite (e.g. DAPI + two markers); it is recorded in
        ``sdata.attrs['sigmma']['fluorescence']``, which every ``sg`` step reads.

    Returns
    -------
    SpatialData with

    - ``images[image_key]``: the image, ``{'global': Scale(pixel_size_um)}``.
    - ``shapes['cell_circles']``: one circle per cell, in µm (``'global'``).
    - ``tables['table']``: a copy of ``adata`` annotating ``'cell_circles'``, with ``.obs['cell_id']`` (the
      obs names unless present) and ``.obsm[spatial_key]`` the centroids in µm.
    - ``attrs['sigmma']['um_per_unit']``: ``{'global': 1.0}``.
    """
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}; read it with `anndata.read_h5ad`.")
    pixel_size_um = check_positive(pixel_size_um, "pixel_size_um")
    cell_radius_um = check_positive(cell_radius_um, "cell_radius_um")
    if coordinates not in ("pixels", "um"):
        raise ValueError(f"`coordinates` must be 'pixels' or 'um', got {coordinates!r}.")
    if cells_outside not in ("raise", "drop"):
        raise ValueError(f"`cells_outside` must be 'raise' or 'drop', got {cells_outside!r}.")
    if fluorescence not in (None, True, False):
        raise ValueError(f"`fluorescence` must be True, False or None, got {fluorescence!r}.")
    xy = spatial_coordinates(adata, spatial_key, coordinates=coordinates)
    if not adata.obs_names.is_unique:
        raise ValueError("`adata.obs_names` are not unique; call `adata.obs_names_make_unique()` first.")

    levels, c_coords = image_levels(image, image_axes=image_axes)
    n_channels = levels[0].shape[0]
    if fluorescence is False and n_channels == 1:
        raise ValueError("A 1-channel image is a fluorescence (or morphology) stain; `fluorescence=False` needs RGB.")
    brightfield = n_channels == 3 if fluorescence is None else not fluorescence
    height, width = levels[0].shape[1:]
    transformation = Scale(np.array([pixel_size_um, pixel_size_um]), axes=("x", "y"))
    element = parse_image(levels, c_coords, {"global": transformation})
    px = xy / pixel_size_um if coordinates == "um" else xy
    inside = check_placement(
        px, element, brightfield=brightfield, pixel_size_um=pixel_size_um, coordinates=coordinates,
        drop=cells_outside == "drop",
    )  # fmt: skip
    if image_key is None:
        image_key = "he" if n_channels == 3 and brightfield else "morphology"

    table = adata[inside].copy() if not inside.all() else adata.copy()
    xy_um = (px * pixel_size_um)[inside]
    region_key = "region" if "region" not in table.obs else "sigmma_region"
    instance_key = "cell_index" if "cell_index" not in table.obs else "sigmma_cell_index"
    ids = np.arange(table.n_obs)
    if not any(str(c).lower() == "cell_id" for c in table.obs):  # spatialdata refuses case variants
        table.obs["cell_id"] = table.obs_names.astype(str)
    table.obs[region_key] = pd.Categorical([CELLS_KEY] * table.n_obs)
    table.obs[instance_key] = ids
    table.obsm[spatial_key] = xy_um
    for key in [k for k in table.uns if k == TableModel.ATTRS_KEY]:
        del table.uns[key]
    table = TableModel.parse(table, region=CELLS_KEY, region_key=region_key, instance_key=instance_key)
    circles = ShapesModel.parse(
        xy_um, geometry=0, radius=np.full(len(ids), cell_radius_um), index=pd.Index(ids),
        transformations={"global": Identity()},
    )  # fmt: skip
    sdata = sd.SpatialData(images={image_key: element}, shapes={CELLS_KEY: circles}, tables={TABLE_KEY: table})
    sdata.attrs["sigmma"] = {"um_per_unit": {"global": 1.0}}
    if n_channels == 3 and not brightfield:
        sdata.attrs["sigmma"]["fluorescence"] = [image_key]
    logger.info(
        "Built a section of %d cells on image %r (%d x %d px at %.4g µm/px) in µm (coordinate system 'global').",
        table.n_obs, image_key, width, height, pixel_size_um,
    )  # fmt: skip
    return sdata


def spatial_coordinates(adata: AnnData, spatial_key: str, *, coordinates: str | None = None) -> np.ndarray:
    """``adata.obsm[spatial_key]`` as finite float ``(n, 2)`` (x, y), or one clear error.

    An array is read by position (x, y). A DataFrame with named columns is read by name (:func:`xy_columns`):
    ``['y', 'x']`` is not transposed; a unit in the names (``x_um``, ``x_px``) must agree with ``coordinates``.
    """
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"No cell coordinates in `adata.obsm[{spatial_key!r}]` (obsm keys: {sorted(adata.obsm)}). Pass "
            "`spatial_key=` naming the (x, y) centroids, e.g. adata.obsm['spatial'] = adata.obs[['x', 'y']].to_numpy()."
        )
    value = adata.obsm[spatial_key]
    if isinstance(value, pd.DataFrame) and not _positional(value.columns):
        (x, y), unit = xy_columns(value.columns, spatial_key)
        if unit is not None and coordinates is not None and unit != coordinates:
            raise ValueError(
                f"The columns of `adata.obsm[{spatial_key!r}]` ({x!r}, {y!r}) say the coordinates are in "
                f"{'µm' if unit == 'um' else 'pixels'}, but coordinates={coordinates!r}; pass coordinates={unit!r}."
            )
        logger.info("Reading adata.obsm[%r] by column name: x = %r, y = %r.", spatial_key, x, y)
        value = value[[x, y]]
    xy = np.asarray(value, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"`adata.obsm[{spatial_key!r}]` has shape {xy.shape}; expected (n_cells, 2) x, y centroids.")
    if xy.shape[1] > 2:
        logger.info("adata.obsm[%r] has %d columns; using the first two as (x, y).", spatial_key, xy.shape[1])
    xy = xy[:, :2]
    if len(xy) == 0:
        raise ValueError("`adata` has no cells.")
    if not np.isfinite(xy).all():
        raise ValueError(
            f"`adata.obsm[{spatial_key!r}]` has {int((~np.isfinite(xy)).any(axis=1).sum())} cells with NaN or infinite "
            "coordinates; drop them first (e.g. adata = adata[np.isfinite(adata.obsm['spatial']).all(1)].copy())."
        )
    return xy


_X_WORDS = {"x", "col", "column", "imagecol", "cx", "centerx", "centrex", "centroidx", "globalx", "posx", "xcoord"}
_Y_WORDS = {"y", "row", "imagerow", "cy", "centery", "centrey", "centroidy", "globaly", "posy", "ycoord"}
_UM_WORDS = {"um", "µm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres"}
_PX_WORDS = {"px", "pxl", "pixel", "pixels", "fullres"}
_GRID_WORDS = {"array"}  # Visium's array_row / array_col: spot grid indices, not positions


def _positional(columns: pd.Index) -> bool:
    """Columns without names (0, 1, ...): read by position like an array."""
    return all(isinstance(c, int | np.integer) for c in columns)


def _words(name: Any) -> list[str]:
    import re

    return [w for w in re.split(r"[^0-9a-zµ]+", str(name).lower()) if w]


def xy_columns(columns: pd.Index, spatial_key: str = "spatial") -> tuple[tuple[Any, Any], str | None]:
    """The x and y columns of a coordinate DataFrame, by name, and the unit the names state (``'um'``, ``'pixels'``).

    The unit is ``None`` when the names state none. x: a word ``x`` (``x``, ``X``, ``x_centroid``, ``center_x``, ``x_global_px``, ``CenterX_global_px``), ``col``
    (``pxl_col_in_fullres``, ``imagecol``); y likewise (``y``, ``row``). Ambiguous names (several candidates,
    none, or Visium's grid indices ``array_row``/``array_col``) raise a ValueError that says how to pass them.
    """
    xs, ys = [], []
    for c in columns:
        words = set(_words(c))
        if words & _GRID_WORDS and words & {"row", "col", "column"}:
            raise ValueError(
                f"`adata.obsm[{spatial_key!r}]` has column {c!r}: a spot grid index, not a position. Use the "
                "spots' pixel coordinates (e.g. Visium's pxl_col_in_fullres, pxl_row_in_fullres)."
            )
        is_x, is_y = bool(words & _X_WORDS), bool(words & _Y_WORDS)
        if is_x != is_y:
            (xs if is_x else ys).append(c)
    if len(xs) != 1 or len(ys) != 1:
        raise ValueError(
            f"Cannot tell the x and y columns of `adata.obsm[{spatial_key!r}]` from their names {list(columns)} "
            f"(x candidates {xs}, y candidates {ys}). Store the two columns as an (n, 2) array in (x, y) order, e.g. "
            f"adata.obsm[{spatial_key!r}] = adata.obsm[{spatial_key!r}][['<x column>', '<y column>']].to_numpy()."
        )
    units = set()
    for c in (xs[0], ys[0]):
        words = set(_words(c))
        units |= {"um"} if words & _UM_WORDS else set()
        units |= {"pixels"} if words & _PX_WORDS else set()
    return (xs[0], ys[0]), units.pop() if len(units) == 1 else None


def check_placement(
    px: np.ndarray, element: Any, *, brightfield: bool, pixel_size_um: float, coordinates: str, drop: bool
) -> np.ndarray:
    """Which cells (full-resolution pixel coordinates ``px``) lie on the image; raise with a hint unless ``drop``.

    When every cell lies on the image, a WARNING names the other unit when the cells sit on the image's nuclei
    only when read in it (:func:`._placement.nuclear_contrast`); and the cells are compared with the image's
    tissue (:mod:`._placement`): a WARNING names the unit (or scale) that makes them match the tissue when the
    given one covers little of it and another matches clearly better (µm coordinates read as pixels land in a
    corner of the tissue), unless the cells sit on the nuclei as given and not at that scale (a region of
    interest). When
    cells lie off the image, the error's hint names the other unit only when it makes the cells match the tissue.
    """
    from sigmma_sc.data._image import ImageReader

    from ._placement import ON_IMAGE, TissueMatch, clearly_better, describe, on_their_nuclei

    reader = ImageReader(element, "global", 1.0, brightfield=brightfield)
    height, width = reader.shape
    other_unit = "um" if coordinates == "pixels" else "pixels"
    other = 1 / pixel_size_um if coordinates == "pixels" else pixel_size_um  # factor to the other unit's pixels

    tol = 1e-6 * max(width, height)  # µm -> px round trips land a cell on the border a rounding error off it

    def on(p: np.ndarray) -> np.ndarray:
        return (p[:, 0] >= -tol) & (p[:, 0] <= width + tol) & (p[:, 1] >= -tol) & (p[:, 1] <= height + tol)

    def match() -> Any:
        m = TissueMatch(reader, px)
        return m if m.usable else None

    def preferred(m: Any) -> Any:
        return _preferred_fit(m, other)

    def unit_hint(fit: Any) -> str:
        return _unit_hint(fit, other, other_unit, pixel_size_um=pixel_size_um, coordinates=coordinates)

    inside = on(px)
    if inside.all():
        m = TissueMatch(reader, px)
        if m.on_image(other) >= ON_IMAGE:  # the other unit fits too: which one puts the cells on their nuclei?
            c_given, c_other = m.contrast(1.0), m.contrast(other)
            if on_their_nuclei(c_other, c_given):
                logger.warning(
                    "The cells sit on the image's nuclei only when read as %s (nuclear contrast %.2f, vs %s as given "
                    "with coordinates=%r and pixel_size_um=%g): pass coordinates=%r.",
                    other_unit, c_other, "n/a" if c_given is None else f"{c_given:.2f}", coordinates, pixel_size_um,
                    other_unit,
                )  # fmt: skip
                return inside
        if m.usable:
            best, fits = preferred(m)
            given = fits.get(1.0)
            if best is not None and given is not None and clearly_better(best, given):
                c_given, c_best = m.contrast(1.0), m.contrast(best.factor)
                if on_their_nuclei(c_given, c_best):
                    logger.info(
                        "The cells cover only part of the image's tissue (%s), but they sit on nuclei as given "
                        "(contrast %.2f vs %.2f scaled by %.3g): taken as a region of interest.",
                        describe(given), c_given, -1.0 if c_best is None else c_best, best.factor,
                    )  # fmt: skip
                    return inside
                logger.warning(
                    "The cells cover only part of the image's tissue as given (coordinates=%r, pixel_size_um=%g: %s); "
                    "with their coordinates scaled by %.3g they match it (%s): %s. If the cells cover only part of "
                    "the section (a region of interest), ignore this.",
                    coordinates, pixel_size_um, describe(given), best.factor, describe(best), unit_hint(best),
                )  # fmt: skip
        return inside
    n_off = int((~inside).sum())
    if drop:
        logger.warning("%d of %d cells lie off the image and are dropped (cells_outside='drop').", n_off, len(px))
        if not inside.any():
            raise ValueError("No cell lies on the image; check `coordinates`, `pixel_size_um` and the image.")
        return inside
    lo, hi = px.min(0), px.max(0)
    hints = []
    if on(px[:, ::-1]).all():
        hints.append(
            "they all fit with x and y swapped: the columns look transposed; swap them "
            "(adata.obsm[spatial_key] = adata.obsm[spatial_key][:, ::-1])"
        )
    m = match()
    best = preferred(m)[0] if m is not None else None
    if best is not None and best.score >= 0.5:
        if abs(np.log(best.factor / other)) <= np.log(1.1):
            hints.append(
                f"they all fit when read as {other_unit}, and then match the image's tissue ({describe(best)}): "
                f"pass coordinates={other_unit!r}"
            )
        else:
            hints.append(f"they match the image's tissue when scaled by {best.factor:.3g} ({describe(best)}): "
                         + unit_hint(best))  # fmt: skip
    elif m is None and on(px * other).all():
        hints.append(
            f"they all fit on the image when read as {other_unit} (no tissue was detected to confirm it): "
            f"check `coordinates` ({coordinates!r})"
        )
    if not hints:
        ratio = max(hi[0] / width, hi[1] / height)
        hints.append(
            f"they reach {ratio:.3g}x the image size; if the coordinates refer to another resolution of the image "
            "(e.g. Visium's full-resolution pixels with the hires PNG), pass the full-resolution image or rescale "
            "the coordinates by the scale factor, and check `pixel_size_um`; or pass cells_outside='drop'"
        )
    raise ValueError(
        f"{n_off} of {len(px)} cells lie outside the image ({width} x {height} px): their pixel coordinates span "
        f"x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f} (coordinates={coordinates!r}, "
        f"pixel_size_um={pixel_size_um:g}). " + "; ".join(hints) + "."
    )


def _preferred_fit(m: Any, other: float) -> Any:
    """``(fit, fits)``: the best tissue fit, or the other unit's when it matches the tissue about as well."""
    best, fits = m.best((other,))
    if best is not None and other in fits and fits[other].score >= best.score - 0.05:
        return fits[other], fits
    return best, fits


def _unit_hint(fit: Any, other: float, other_unit: str, *, pixel_size_um: float, coordinates: str) -> str:
    """The fix a tissue fit at ``fit.factor`` points to: the other unit, or the pixel size / resolution."""
    if abs(np.log(fit.factor / other)) <= np.log(1.1):
        return f"pass coordinates={other_unit!r}"
    return (
        f"check `pixel_size_um` ({pixel_size_um:g}) and `coordinates` ({coordinates!r}), or whether the "
        "coordinates refer to another resolution of the image"
    )


def image_levels(image: Any, *, image_axes: str | None = None) -> tuple[list[Any], list[str] | None]:
    """Lazy ``(c, y, x)`` dask arrays of the levels of an image (finest first) and its channel names."""
    import dask.array as da

    if isinstance(image, str | Path):
        return _file_levels(Path(image))
    if (hasattr(image, "children") and hasattr(image, "ds")) or (hasattr(image, "dims") and hasattr(image, "coords")):
        return _element_levels(image)
    if not hasattr(image, "shape") or not hasattr(image, "ndim"):
        raise TypeError(
            f"`image` must be an array, an image file path or a spatialdata image element, got {type(image).__name__}."
        )
    axes = image_axes or _infer_axes(image.shape)
    arr = image if isinstance(image, da.Array) else da.from_array(image, chunks=_chunks(axes, image.shape))
    return _channels([arr.transpose(_order(axes))])


MAX_CHANNELS = 64  # an axis this short next to two much longer ones is the channel axis (multiplexed IF too)


def _infer_axes(shape: tuple[int, ...]) -> str:
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3:
        first, last = shape[0], shape[-1]
        if last in (3, 4) and first not in (1, 3, 4):
            return "yxc"
        if first <= 4 < min(shape[1:]):
            return "cyx"
        if last <= 4 < min(shape[:2]):
            return "yxc"
        # more channels (e.g. a 5-channel immunofluorescence stack): the short axis, when the others are 8x longer
        if first <= MAX_CHANNELS and 8 * first <= min(shape[1:]) and not 8 * last <= min(shape[:2]):
            return "cyx"
        if last <= MAX_CHANNELS and 8 * last <= min(shape[:2]) and not 8 * first <= min(shape[1:]):
            return "yxc"
    raise ValueError(
        f"Cannot tell the axes of an image of shape {tuple(shape)}; pass image_axes='yxc' (RGB as height x width "
        "x 3) or 'cyx' (channels first)."
    )


def _order(axes: str) -> tuple[int, ...]:
    axes = axes.lower()
    if sorted(axes) not in (["x", "y"], ["c", "x", "y"]):
        raise ValueError(f"`image_axes` must be a permutation of 'yx' or 'cyx', got {axes!r}.")
    if "c" not in axes:
        return (axes.index("y"), axes.index("x"))
    return tuple(axes.index(a) for a in "cyx")


def _chunks(axes: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-1 if a == "c" else _CHUNK for a in axes.lower()[: len(shape)])


def _channels(levels: list[Any], c_coords: list[str] | None = None) -> tuple[list[Any], list[str] | None]:
    """Check the channel count (1 or 3; RGBA loses alpha) and add a channel axis to 2D levels."""
    levels = [lv[None] if lv.ndim == 2 else lv for lv in levels]
    n, dtype = levels[0].shape[0], levels[0].dtype
    if n == 4 and dtype == np.uint8:
        logger.info("The image has 4 uint8 channels; taking it as RGBA and dropping the alpha channel.")
        levels, c_coords = [lv[:3] for lv in levels], None
    elif n not in (1, 3):
        raise ValueError(
            f"The image has {n} channels ({dtype}); sigmma_sc needs an H&E (RGB, 3 channels) or one morphology "
            "channel. Select one channel, e.g. the nuclear stain (DAPI) as image[[0]] for a (c, y, x) array "
            "(image[..., [0]] for (y, x, c); for a file, read that channel into an array or a spatialdata element "
            "first), or three channels with `fluorescence=True` (a fluorescence composite)."
        )
    if c_coords is None or len(c_coords) != levels[0].shape[0]:
        c_coords = ["r", "g", "b"] if levels[0].shape[0] == 3 else None
    return levels, c_coords


def _file_levels(path: Path) -> tuple[list[Any], list[str] | None]:
    from ._xenium import _tiff_levels

    if not path.exists():
        raise FileNotFoundError(f"Image file {str(path)!r} does not exist; check `image`.")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        try:
            levels, dims = _tiff_levels(path, tiled_only=False)
        except (tifffile.TiffFileError, ValueError) as e:
            raise ValueError(f"{path.name} is not a readable TIFF ({e}); check `image`.") from e
        order = [dims.index(d) for d in ("c", "y", "x")]
        return _channels([lv.transpose(order) for lv in levels])
    from dask_image.imread import imread

    arr = imread(str(path))  # PNG/JPEG: one frame, read whole when computed
    arr = arr[0] if arr.ndim >= 3 and arr.shape[0] == 1 else arr
    axes = _infer_axes(arr.shape)
    return _channels([arr.transpose(_order(axes)).rechunk(_chunks("cyx" if arr.ndim == 3 else "yx", arr.shape))])


def _element_levels(element: Any) -> tuple[list[Any], list[str] | None]:
    from sigmma_sc.data._image import _levels

    arrays = _levels(element)
    if set(arrays[0].dims) != {"c", "y", "x"}:
        raise ValueError(f"Expected a 2D image element with axes ('c', 'y', 'x'), got {arrays[0].dims}.")
    c_coords = [str(c) for c in arrays[0].coords["c"].values] if "c" in arrays[0].coords else None
    return _channels([a.transpose("c", "y", "x").data for a in arrays], c_coords)


def parse_image(levels: list[Any], c_coords: list[str] | None, transformations: dict) -> Any:
    """A spatialdata image element (multiscale when there are several levels) with ``transformations``."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation

    from ._xenium import _datatree

    if len(levels) == 1:
        return Image2DModel.parse(levels[0], dims=("c", "y", "x"), c_coords=c_coords, transformations=transformations)
    tree = _datatree(levels, ("c", "y", "x"), c_coords)
    set_transformation(tree, transformations, set_all=True)
    Image2DModel().validate(tree)
    return tree
