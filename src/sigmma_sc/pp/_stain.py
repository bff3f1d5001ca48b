"""``sg.pp.stain_normalize``: Macenko stain normalisation of an H&E image, lazily, level by level.

Macenko et al. (ISBI 2009): optical densities ``OD = -log((I + 1) / Io)`` of stained pixels lie in the plane
of the hematoxylin and eosin stain vectors; the two vectors are the extreme angles (``alpha``-th and
``100 - alpha``-th percentiles) of the OD pixels projected on the plane of the two largest eigenvectors of
their covariance; each pixel's stain concentrations solve ``OD = HE @ C``; concentrations are scaled so that
their 99th percentiles match the reference's and the image is rebuilt with the reference stain vectors.
The arithmetic follows torchstain's ``MacenkoNormalizer`` (numpy backend; the tests compare the two), with
one change: the stain vectors are estimated once per slide, on its tissue at low resolution, and then
applied to every pixel of every pyramid level, instead of being re-estimated on every tile (a tile with
little tissue or one stain only gives unstable vectors).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Keys
from .._utils._validate import get_image
from .._utils._write import save_output

if TYPE_CHECKING:
    from spatialdata import SpatialData

logger = logging.getLogger(__name__)

IO = 240.0  # transmitted light intensity
ALPHA = 1.0  # percentile of the extreme angles
BETA = 0.15  # OD threshold of "stained" pixels
# Macenko's reference (as in torchstain and the original HEnorm code)
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_C = np.array([1.9705, 1.0308])


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / IO)


def macenko_stains(pixels: np.ndarray, *, alpha: float = ALPHA, beta: float = BETA) -> dict[str, Any]:
    """Stain vectors and maximal concentrations of RGB pixels (Macenko).

    Parameters
    ----------
    pixels
        ``(..., 3)`` uint8 RGB pixels (an image ``(h, w, 3)`` or a pixel list ``(n, 3)``).
    alpha
        Percentile of the extreme projected angles.
    beta
        Pixels with an OD below ``beta`` in any channel are background and ignored.

    Returns
    -------
    ``{'stain_matrix': (3, 2) array, hematoxylin first, 'max_concentrations': (2,) array}`` (99th percentiles of
    the concentrations of all pixels).
    """
    od = _od(pixels)
    stained = od[~np.any(od < beta, axis=1)]
    if stained.shape[0] < 10:
        raise ValueError(
            f"Only {stained.shape[0]} stained pixels (OD >= {beta} in every channel): the image holds too little "
            "tissue to estimate its stains. Use an image with tissue, or skip stain normalisation."
        )
    _, eigvecs = np.linalg.eigh(np.cov(stained.T))
    plane = eigvecs[:, 1:3]
    proj = stained @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_min, v_max], 1) if v_min[0] > v_max[0] else np.stack([v_max, v_min], 1)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.array([np.percentile(conc[0], 99), np.percentile(conc[1], 99)])
    return {"stain_matrix": he, "max_concentrations": max_c}


def macenko_apply(rgb: np.ndarray, source: Mapping[str, Any], reference: Mapping[str, Any]) -> np.ndarray:
    """Re-stain RGB pixels from ``source`` stains to ``reference`` stains (both from :func:`macenko_stains`).

    Parameters
    ----------
    rgb
        ``(..., 3)`` uint8 image.
    source, reference
        ``stain_matrix`` (3, 2) and ``max_concentrations`` (2,) of the image and of the target appearance.

    Returns
    -------
    uint8 array of the shape of ``rgb``.
    """
    he_src = np.asarray(source["stain_matrix"], dtype=np.float64)
    he_ref = np.asarray(reference["stain_matrix"], dtype=np.float64)
    scale = np.asarray(reference["max_concentrations"], np.float64) / np.asarray(
        source["max_concentrations"], np.float64
    )
    # C = pinv(HE_src) OD; OD_out = HE_ref diag(scale) C: one 3x3 matrix per pixel
    m = he_ref @ np.diag(scale) @ np.linalg.pinv(he_src)
    od = _od(rgb)
    out = IO * np.exp(-(od @ m.T))
    return np.clip(out, 0, 255).astype(np.uint8).reshape(rgb.shape)


def _as_stains(reference: Any) -> dict[str, np.ndarray]:
    if reference is None:
        return {"stain_matrix": REFERENCE_STAINS, "max_concentrations": REFERENCE_MAX_C}
    if isinstance(reference, Mapping):
        try:
            he = np.asarray(reference["stain_matrix"], dtype=np.float64)
            mc = np.asarray(reference["max_concentrations"], dtype=np.float64)
        except KeyError as e:
            raise ValueError(
                "A stain `reference` mapping needs 'stain_matrix' (3, 2) and 'max_concentrations' (2,)."
            ) from e
        if he.shape != (3, 2) or mc.shape != (2,) or not (np.isfinite(he).all() and (mc > 0).all()):
            raise ValueError(f"Bad stain reference: stain_matrix {he.shape}, max_concentrations {mc.tolist()}.")
        return {"stain_matrix": he, "max_concentrations": mc}
    arr = np.asarray(reference)
    if arr.dtype != np.uint8 or arr.ndim != 3 or 3 not in (arr.shape[0], arr.shape[-1]):
        raise ValueError(
            "`reference` must be None (Macenko's standard H&E), a mapping from `macenko_stains`, or a uint8 RGB "
            f"image (h, w, 3) or (3, h, w); got {arr.dtype} {arr.shape}."
        )
    if arr.shape[-1] != 3 and arr.shape[0] == 3:
        arr = np.moveaxis(arr, 0, -1)
    return macenko_stains(arr)


def slide_stains(sdata: SpatialData, image_key: str | None = None, *, coordinate_system: str = "global",
                 um_per_unit: float | None = None, max_pixel_size_um: float = 4.0) -> dict[str, np.ndarray]:  # fmt: skip
    """Macenko stains of an image's tissue, estimated on a low-resolution level (about ``max_pixel_size_um``).

    Parameters
    ----------
    sdata
        SpatialData object.
    image_key
        RGB uint8 image (optional if there is one image).
    coordinate_system
        Coordinate system of the image.
    um_per_unit
        Micrometres per coordinate unit (default: the recorded value).
    max_pixel_size_um
        Pixel size of the level the stains are estimated on.

    Returns
    -------
    ``{'stain_matrix', 'max_concentrations'}`` of the tissue pixels (brightfield tissue mask).
    """
    from .._utils._validate import um_per_unit as _um_per_unit
    from ..data._image import ImageReader, image_is_brightfield
    from ._tile import tissue_mask

    key, image = get_image(sdata, image_key)
    reader = ImageReader(
        image, coordinate_system, _um_per_unit(sdata, coordinate_system, um_per_unit),
        brightfield=image_is_brightfield(sdata, key),
    )  # fmt: skip
    _check_rgb(reader, key)
    thumb, to_cs = reader.thumbnail(max_pixel_size_um=max(max_pixel_size_um, reader.pixel_size_um))
    px = float(np.sqrt(abs(np.linalg.det(to_cs[:2, :2])))) * reader.um_per_unit
    mask = tissue_mask(thumb, px)
    pixels = np.moveaxis(thumb, 0, -1)[mask] if mask.any() else np.moveaxis(thumb, 0, -1).reshape(-1, 3)
    return macenko_stains(pixels)


def _check_rgb(reader: Any, key: str) -> None:
    if reader.n_channels != 3 or reader.dtype != np.uint8 or not reader.brightfield:
        raise ValueError(
            f"Stain normalisation needs an RGB uint8 brightfield image (H&E); {key!r} has {reader.n_channels} "
            f"channel(s) of {reader.dtype}" + ("" if reader.brightfield else ", recorded as fluorescence") + "."
        )


def stain_normalize(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    reference: Any = None,
    coordinate_system: str = "global",
    um_per_unit: float | None = None,
    key_added: str | None = None,
    inplace: bool = True,
) -> Any:
    """Macenko-normalise an H&E image to a reference stain appearance, as a new lazy image element.

    The image's stain vectors are estimated once on its tissue at low resolution (``sigmma_sc.pp._stain.slide_stains``);
    every pixel of every pyramid level is then re-stained with the same 3x3 optical-density map, lazily
    (dask, block by block), so a whole slide is never in memory. Tile and featurize the new element
    (``sg.pp.tile(sdata, image_key=key_added, ...)``); :func:`sigmma_sc.tl.predict_slide` does this with
    ``stain_normalize=True``, to the stains of the model's training section.

    Parameters
    ----------
    sdata
        SpatialData object with an RGB uint8 image.
    image_key
        Image to normalise (optional if there is one image).
    reference
        Target appearance: ``None`` (Macenko's standard H&E reference), a mapping with ``stain_matrix`` (3, 2)
        and ``max_concentrations`` (2,) (e.g. ``model.meta['stain_reference']``), or a uint8 RGB image.
    coordinate_system
        Coordinate system of the image (for its physical scale).
    um_per_unit
        Micrometres per coordinate unit (default: the recorded value).
    key_added
        Key of the new image in ``sdata.images`` (default ``f"{image_key}_stain_normalized"``).
    inplace
        Write the image into ``sdata`` and return ``None``; ``False`` returns it.

    Returns
    -------
    ``None`` if ``inplace`` (writes ``sdata.images[key_added]``, same levels and transformations as the source,
    with ``attrs['sigmma']['stain_normalize'][key_added]`` holding the source and reference stains), else the
    image element.
    """
    key, image = get_image(sdata, image_key)
    ref = _as_stains(reference)
    src = slide_stains(sdata, key, coordinate_system=coordinate_system, um_per_unit=um_per_unit)
    key_added = key_added or f"{key}_stain_normalized"
    out = _map_image(image, lambda block: _normalize_block(block, src, ref))
    if not inplace:
        return out
    save_output(sdata, "images", key_added, out, what=f"Macenko-normalised {key!r}")
    attrs = sdata.attrs.setdefault(Keys.UNS, {})
    attrs.setdefault("stain_normalize", {})[key_added] = {
        "source_image": key,
        "source": {k: np.asarray(v).tolist() for k, v in src.items()},
        "reference": {k: np.asarray(v).tolist() for k, v in ref.items()},
    }
    return None


def _normalize_block(block: np.ndarray, src: Mapping, ref: Mapping) -> np.ndarray:
    """``(3, h, w)`` uint8 block -> normalised block."""
    return np.moveaxis(macenko_apply(np.moveaxis(block, 0, -1), src, ref), -1, 0)


def _map_image(image: Any, fn) -> Any:
    """Apply a per-pixel ``(3, h, w) -> (3, h, w)`` uint8 function lazily to every level of an image element."""
    from spatialdata.models import Image2DModel
    from xarray import DataArray, Dataset, DataTree

    def one(arr: DataArray) -> DataArray:
        data = arr.data.rechunk({0: -1})
        mapped = data.map_blocks(fn, dtype=np.uint8)
        return DataArray(mapped, dims=arr.dims, coords=arr.coords, attrs=dict(arr.attrs))

    if isinstance(image, DataTree):
        nodes = {}
        for name in image.children:
            (var,) = image[name].ds.data_vars
            nodes[name] = Dataset({var: one(image[name].ds[var])})
        out = DataTree.from_dict(nodes)
    else:
        out = one(image)
    Image2DModel().validate(out)
    return out
