"""``sg.io.wsi``: a whole-slide image (Aperio SVS, NDPI, OME-TIFF, ...) into SpatialData, lazy and multiscale."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Keys
from .._utils._validate import check_positive

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

_CHUNK_PX = 1024  # target dask chunk side; rounded to a multiple of the file's tile side


def _tiffslide():
    try:
        import tiffslide
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Reading whole-slide images needs `tiffslide`: `pip install 'sigmma-sc[wsi]'` (or `pip install tiffslide`)."
        ) from e
    return tiffslide


def wsi(
    path: str | Path,
    *,
    pixel_size_um: float | None = None,
    image_key: str = "he",
    coordinate_system: str = "global",
) -> SpatialData:
    """Read a whole-slide image lazily into a SpatialData object, one multiscale level per pyramid level.

    The slide is opened with `tiffslide <https://github.com/Bayer-Group/tiffslide>`_ (pure Python on tifffile:
    Aperio SVS, Hamamatsu NDPI, Leica SCN, Ventana BIF, Philips TIFF, generic tiled and OME-TIFF). Pixels are
    only decoded when a window is read (dask arrays over the file's tiles), so a 100,000 x 100,000 px slide
    costs no memory until it is tiled. The coordinate system is in micrometres: the image carries a
    ``Scale`` by its pixel size, so tiles and shapes drawn on it are in µm.

    Parameters
    ----------
    path
        Whole-slide image file.
    pixel_size_um
        Level-0 pixel size in µm (MPP). Default: read from the file (``tiffslide.mpp-x``); an error asks for
        it when the file records none. Given for a file that records one, this value wins (with a warning if
        they differ).
    image_key
        Name of the image element.
    coordinate_system
        Coordinate system the image is placed in (units: µm).

    Returns
    -------
    A SpatialData object with

    - ``images[image_key]``: RGB ``(c, y, x)`` uint8 image (multiscale when the slide has several levels),
      transformation ``Scale([mpp, mpp])`` to ``coordinate_system``;
    - ``attrs['sigmma']['um_per_unit'][coordinate_system] = 1.0`` (read by :func:`sigmma_sc.pp.tile`) and
      ``attrs['sigmma']['slide']``: path, vendor, MPP and its source, objective power, level shapes.
    """
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, set_transformation

    from ._xenium import _datatree

    if pixel_size_um is not None:
        pixel_size_um = check_positive(pixel_size_um, "pixel_size_um")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such slide: {path}")
    tiffslide = _tiffslide()
    try:
        slide = tiffslide.TiffSlide(path)
    except Exception as e:
        raise ValueError(
            f"{path} is not a whole-slide image that tiffslide can read ({type(e).__name__}: {e}). Supported: "
            "Aperio SVS, Hamamatsu NDPI, Leica SCN, Ventana BIF, Philips TIFF, tiled (OME-)TIFF; convert other "
            "formats (e.g. MIRAX .mrxs) to a pyramidal OME-TIFF first (e.g. `bfconvert` or `vips tiffsave --tile "
            "--pyramid`)."
        ) from e
    props = dict(slide.properties)
    mpp_x, mpp_y = _mpp(props)
    if pixel_size_um is None:
        if mpp_x is None:
            raise ValueError(
                f"{path} records no pixel size (MPP, micrometres per pixel); pass it: "
                "`sg.io.wsi(path, pixel_size_um=0.25)` (or `sigmma predict --pixel-size-um 0.25`). 40x scanners "
                "give about 0.25 µm/px, 20x about 0.5."
            )
        mpp, source = (mpp_x, mpp_y if mpp_y is not None else mpp_x), "file"
    else:
        if mpp_x is not None and not np.isclose(mpp_x, pixel_size_um, rtol=0.01):
            logger.warning("%s records %.4g µm/px; using pixel_size_um=%.4g as asked.", path.name, mpp_x, pixel_size_um)
        mpp, source = (pixel_size_um, pixel_size_um), "argument"

    levels = _levels(slide)
    transformation = Scale([float(mpp[0]), float(mpp[1])], axes=("x", "y"))
    if len(levels) == 1:
        image = Image2DModel.parse(
            levels[0],
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={coordinate_system: transformation},
        )
    else:
        image = _datatree(levels, ("c", "y", "x"), ["r", "g", "b"])
        set_transformation(image, {coordinate_system: transformation}, set_all=True)
        Image2DModel().validate(image)
    sdata = sd.SpatialData(images={image_key: image})
    sdata.attrs[Keys.UNS] = {
        "um_per_unit": {coordinate_system: 1.0},
        "slide": {
            "path": str(path.resolve()),
            "vendor": str(props.get("tiffslide.vendor") or "unknown"),
            "mpp": [float(mpp[0]), float(mpp[1])],
            "mpp_source": source,
            "objective_power": _float_or_none(props.get("tiffslide.objective-power")),
            "level_shapes": [[int(s) for s in lv.shape[1:]] for lv in levels],
        },
    }
    logger.info(
        "Read %s: %d x %d px, %d level(s), %.4g µm/px (%s).",
        path.name, levels[0].shape[2], levels[0].shape[1], len(levels), mpp[0], source,
    )  # fmt: skip
    return sdata


def _float_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def _mpp(props: dict) -> tuple[float | None, float | None]:
    return _float_or_none(props.get("tiffslide.mpp-x")), _float_or_none(props.get("tiffslide.mpp-y"))


def _levels(slide: Any) -> list:
    """Lazy ``(3, h, w)`` uint8 dask arrays of the slide's levels (alpha dropped), finest first."""
    import dask.array as da

    group = slide.zarr_group
    keys = sorted(group.keys(), key=int) if hasattr(group, "keys") else [None]
    levels = []
    for key in keys:
        arr = group[key] if key is not None else group
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(
                f"Expected an RGB(A) brightfield slide (y, x, 3|4), got a level of shape {arr.shape}; fluorescence "
                "slides are not supported by `sg.io.wsi` (read them with spatialdata-io)."
            )
        tile = max(int(arr.chunks[0]), 1)
        chunk = max(tile, tile * round(_CHUNK_PX / tile))
        lazy = da.from_array(arr, chunks=(chunk, chunk, -1), lock=False, asarray=True)
        levels.append(lazy[:, :, :3].transpose(2, 0, 1).astype(np.uint8))
    return levels
