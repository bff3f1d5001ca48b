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
) -> SpatialData:
    """Build a SpatialData section in µm from an AnnData with cell (or spot) coordinates and an image.

    The result has the layout of :func:`sigmma_sc.io.xenium`, so every ``sg`` step accepts it: the image
    element registered to the coordinate system ``'global'``, whose unit is the micrometre, by a scale of
    ``pixel_size_um``; the cells as circles ``'cell_circles'`` (in µm) annotated by the table ``'table'``;
    ``sdata.attrs['sigmma']['um_per_unit'] = {'global': 1.0}``. Image files are read lazily (a TIFF, tiled
    or not, OME-TIFF pyramids level by level, through tifffile's zarr store), so a whole slide is never
    loaded into memory.

    Parameters
    ----------
    adata
        Cells (or spots) x genes, raw counts in ``.X`` or a layer; ``adata.obsm[spatial_key]`` holds their
        centroids (x, y) in image pixels of ``image``'s full resolution, or in µm. It is copied, not changed.
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
        Name of the image element. Default: ``'he'`` for a 3-channel image, ``'morphology'`` for 1 channel.
    image_axes
        Axis order of an array image, e.g. ``'yxc'`` or ``'cyx'``; inferred when ``None``.
    cell_radius_um
        Radius of the cell circles in µm (for display; tiling uses the centroids). For Visium spots, 27.5.
    cells_outside
        Cells whose centroid lies off the image: ``'raise'`` an error, or ``'drop'`` them from the table.

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
    xy = spatial_coordinates(adata, spatial_key)
    if not adata.obs_names.is_unique:
        raise ValueError("`adata.obs_names` are not unique; call `adata.obs_names_make_unique()` first.")

    levels, c_coords = image_levels(image, image_axes=image_axes)
    height, width = levels[0].shape[1:]
    px = xy / pixel_size_um if coordinates == "um" else xy
    inside = check_inside(px, (height, width), pixel_size_um=pixel_size_um, coordinates=coordinates, xy=xy,
                          drop=cells_outside == "drop")  # fmt: skip
    if image_key is None:
        image_key = "he" if levels[0].shape[0] == 3 else "morphology"

    transformation = Scale(np.array([pixel_size_um, pixel_size_um]), axes=("x", "y"))
    element = parse_image(levels, c_coords, {"global": transformation})

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
    logger.info(
        "Built a section of %d cells on image %r (%d x %d px at %.4g µm/px) in µm (coordinate system 'global').",
        table.n_obs, image_key, width, height, pixel_size_um,
    )  # fmt: skip
    return sdata


def spatial_coordinates(adata: AnnData, spatial_key: str) -> np.ndarray:
    """``adata.obsm[spatial_key]`` as finite float ``(n, 2)`` (x, y), or one clear error."""
    if spatial_key not in adata.obsm:
        raise KeyError(
            f"No cell coordinates in `adata.obsm[{spatial_key!r}]` (obsm keys: {sorted(adata.obsm)}). Pass "
            "`spatial_key=` naming the (x, y) centroids, e.g. adata.obsm['spatial'] = adata.obs[['x', 'y']].to_numpy()."
        )
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
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


def check_inside(
    px: np.ndarray, shape: tuple[int, int], *, pixel_size_um: float, coordinates: str, xy: np.ndarray, drop: bool
) -> np.ndarray:
    """Which cells (full-resolution pixel coordinates ``px``) lie on the image; raise with a hint unless ``drop``."""
    height, width = shape

    def on(p: np.ndarray, w: float = width, h: float = height) -> np.ndarray:
        return (p[:, 0] >= 0) & (p[:, 0] <= w) & (p[:, 1] >= 0) & (p[:, 1] <= h)

    inside = on(px)
    if inside.all():
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
    other = xy / pixel_size_um if coordinates == "pixels" else xy
    if on(other).all():
        unit = "um" if coordinates == "pixels" else "pixels"
        hints.append(f"they all fit when read as {unit}: pass coordinates={unit!r}")
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
            f"The image has {n} channels; sigmma_sc needs an H&E (RGB, 3 channels) or one morphology channel. "
            "Select one channel (e.g. image[0] for DAPI) or three."
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
