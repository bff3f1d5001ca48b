"""Lazy, physically scaled access to a SpatialData image element.

The reader maps squares given in a coordinate system (e.g. a tile) onto the image pyramid level whose
pixel size is closest to the requested one without being coarser, reads only the needed window
(dask), and resamples it bilinearly onto the requested grid, so rotated or sheared registrations
(an H&E aligned to Xenium) are handled exactly. The whole full-resolution image is never loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

RANGE_SAMPLE_PX = 4_000_000  # pixels read to compute a fluorescence image's intensity range


@dataclass(frozen=True)
class _Level:
    data: Any  # dask array (c, y, x)
    to_cs: np.ndarray  # 3x3 affine: level pixel (x, y, 1) -> coordinate system
    pixel_size_um: float


def _levels(element: Any) -> list[Any]:
    if hasattr(element, "children") and len(getattr(element, "children", {})):  # DataTree
        keys = sorted(element.children, key=lambda k: int(k.replace("scale", "")))
        return [next(iter(element[k].ds.data_vars.values())) for k in keys]
    return [element]


class ImageReader:
    """Read physically scaled, registered windows of an image element.

    Parameters
    ----------
    element
        A SpatialData image (single-scale ``DataArray`` or multiscale ``DataTree``) with axes ``(c, y, x)``.
    coordinate_system
        The coordinate system windows are given in.
    um_per_unit
        Micrometres per unit of that coordinate system.
    brightfield
        Whether the image is brightfield (white glass, e.g. H&E) or fluorescence (dark background, each channel's
        intensities stretched by its percentiles). ``None``: brightfield when it has 3 (RGB) or 4 (RGBA) channels;
        ``image_is_brightfield`` reads what ``sg.io.from_anndata(..., fluorescence=True)`` recorded.
    """

    def __init__(
        self, element: Any, coordinate_system: str, um_per_unit: float, *, brightfield: bool | None = None
    ) -> None:
        from spatialdata.transformations import get_transformation

        systems = get_transformation(element, get_all=True)
        if coordinate_system not in systems:
            raise ValueError(
                f"The image is not in coordinate system {coordinate_system!r} (it is in {sorted(systems)}): "
                "the image and the cells share no coordinate system. Register the image to the cells "
                "(e.g. `sg.io.xenium(..., he_alignment=...)` or `spatialdata.transformations.set_transformation`)."
            )
        base = systems[coordinate_system].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        arrays = _levels(element)
        if arrays[0].dims != ("c", "y", "x"):
            raise ValueError(f"Expected a 2D image with axes ('c', 'y', 'x'), got {arrays[0].dims}.")
        h0, w0 = arrays[0].shape[1:]
        self.um_per_unit = float(um_per_unit)
        n_channels, self.dtype = int(arrays[0].shape[0]), np.dtype(arrays[0].dtype)
        self.rgba = n_channels == 4 and self.dtype == np.uint8  # brightfield with alpha: composited over white
        if n_channels not in (1, 3) and not self.rgba:
            names = (
                [str(c) for c in arrays[0].coords["c"].values] if "c" in arrays[0].coords else list(range(n_channels))
            )
            raise ValueError(
                f"The image has {n_channels} channels ({names}, {self.dtype}); sigmma_sc reads a 1-channel "
                "morphology stain (e.g. DAPI), an RGB or an RGBA (uint8) image. Store the channel to use as its own "
                "image element and tile that, e.g. `img = spatialdata.get_pyramid_levels(sdata.images[KEY], n=0)"
                f".sel(c=[{names[0]!r}]); sdata.images['stain'] = Image2DModel.parse(img, scale_factors=[2, 2, 2, 2])`."
            )
        self.n_channels = 3 if self.rgba else n_channels
        self.shape = (h0, w0)
        self.levels: list[_Level] = []
        unit_per_px0 = float(np.sqrt(abs(np.linalg.det(base[:2, :2]))))
        if unit_per_px0 <= 0:
            raise ValueError("The image's transformation to the coordinate system is singular.")
        for arr in arrays:
            h, w = arr.shape[1:]
            fx, fy = w0 / w, h0 / h
            level_to_px0 = np.diag([fx, fy, 1.0])
            self.levels.append(
                _Level(
                    data=arr.data,
                    to_cs=base @ level_to_px0,
                    pixel_size_um=unit_per_px0 * float(np.sqrt(fx * fy)) * self.um_per_unit,
                )
            )
        self.pixel_size_um = self.levels[0].pixel_size_um
        # RGB(A): white glass; 1 channel (or a composite recorded as fluorescence): dark background
        self.brightfield = self.n_channels == 3 if brightfield is None or self.rgba else bool(brightfield)
        self.fill = 255 if self.brightfield else 0
        self._intensity_range: tuple[float, float] | None = None

    # geometry ---------------------------------------------------------------------------------
    def extent(self) -> tuple[float, float, float, float]:
        """Axis-aligned bounding box ``(xmin, ymin, xmax, ymax)`` of the image in the coordinate system."""
        h, w = self.shape
        corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], dtype=float).T
        xy = (self.levels[0].to_cs @ corners)[:2]
        return float(xy[0].min()), float(xy[1].min()), float(xy[0].max()), float(xy[1].max())

    def to_pixels(self, xy: np.ndarray, level: int = 0) -> np.ndarray:
        """Map coordinate-system points ``(n, 2)`` to continuous pixel coordinates (x, y) of ``level``."""
        inv = np.linalg.inv(self.levels[level].to_cs)
        pts = np.c_[xy, np.ones(len(xy))] @ inv.T
        return pts[:, :2]

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """Whether each coordinate-system point ``(n, 2)`` lies on the image."""
        px = self.to_pixels(xy)
        h, w = self.shape
        return (px[:, 0] >= 0) & (px[:, 0] <= w) & (px[:, 1] >= 0) & (px[:, 1] <= h)

    def level_for(self, pixel_size_um: float) -> int:
        """Index of the coarsest level whose pixels are not coarser than ``pixel_size_um`` (1% tolerance)."""
        ok = [i for i, lv in enumerate(self.levels) if lv.pixel_size_um <= pixel_size_um * 1.01]
        return ok[-1] if ok else 0

    # intensity --------------------------------------------------------------------------------
    def intensity_range(self) -> tuple[Any, Any]:
        """Range of raw intensities mapped to 0..255 by :meth:`to_uint8`.

        Brightfield: the full scale of the values (``[0, 1]`` for floats up to 1, ``[0, 255]`` for values up to 255,
        else ``[0, 65535]`` or the maximum), so that white glass stays white. Fluorescence: the 0.5th-99.9th
        percentile of the coarsest pyramid level (strided to at most ``RANGE_SAMPLE_PX`` pixels), per channel (floats for one channel, ``(C,)`` arrays for several). A saturated
        plateau (0.1-5% of the pixels at the maximum, e.g. a bright artefact) is left out together with its rim (the
        pixels connected to it that are brighter than the rest of the image), which a downsampled pyramid level or
        the optics blur to values below the maximum.
        """
        if self._intensity_range is None:
            if self.dtype == np.uint8 and self.brightfield:
                self._intensity_range = (0.0, 255.0)
            else:
                arr = self._range_sample()
                if self.brightfield:
                    self._intensity_range = self._robust_range(arr)
                else:
                    ranges = [self._robust_range(arr[c : c + 1]) for c in range(arr.shape[0])]
                    lo, hi = (np.array(v, dtype=np.float64) for v in zip(*ranges, strict=True))
                    self._intensity_range = (float(lo[0]), float(hi[0])) if lo.size == 1 else (lo, hi)
        return self._intensity_range

    def _range_sample(self) -> np.ndarray:
        """The raw pixels the intensity range is computed on: the coarsest level, strided to ``RANGE_SAMPLE_PX``."""
        data = self.levels[-1].data[: self.n_channels]
        stride = max(1, int(np.ceil(np.sqrt(np.prod(data.shape[1:]) / RANGE_SAMPLE_PX))))
        if stride > 1:
            data = data[:, ::stride, ::stride]
        return np.asarray(data.compute() if hasattr(data, "compute") else data)

    def _robust_range(self, arr: np.ndarray) -> tuple[float, float]:
        finite = np.isfinite(arr).all(0) if np.issubdtype(arr.dtype, np.floating) else np.ones(arr.shape[1:], bool)
        if not finite.any():
            return 0.0, 1.0
        values = arr[:, finite]
        top = float(values.max())
        if self.brightfield:
            hi = 1.0 if top <= 1 else 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
            return 0.0, hi
        keep = finite & self._outside_saturation(arr, finite, top)
        lo, hi = (float(v) for v in np.percentile(arr[:, keep], [0.5, 99.9]))
        if hi <= lo:  # a flat image: any positive span (floats in [0, 1] must not get a span of 1)
            hi = lo + (1.0 if np.issubdtype(self.dtype, np.integer) else max(abs(lo), 1e-6) * 1e-3 + 1e-6)
        return lo, hi

    def _outside_saturation(self, arr: np.ndarray, finite: np.ndarray, top: float) -> np.ndarray:
        """``(h, w)`` mask of the pixels outside a saturated plateau and its rim (all True when there is none)."""
        artefact = saturated_artefact(arr, finite, top)
        if artefact is None:
            return np.ones(arr.shape[1:], dtype=bool)
        logger.warning(
            "%.1f%% of the image's pixels are saturated at %g (an artefact?); they and their rim (%.1f%% of the "
            "pixels in all) are left out of its intensity range and of the tissue.",
            100 * float(((arr == top).any(0) & finite).sum() / finite.sum()), top,
            100 * float(artefact.sum() / finite.sum()),
        )  # fmt: skip
        return ~artefact

    def to_uint8(self, arr: np.ndarray) -> np.ndarray:
        """Map raw intensities of a window ``(C, h, w)`` to uint8 with :meth:`intensity_range` (RGB uint8 passes).

        RGBA windows (4 channels) are composited over white first.
        """
        if self.rgba:
            alpha = arr[3:4].astype(np.float32) / 255.0
            arr = (arr[:3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
        if arr.dtype == np.uint8 and self.brightfield:
            return arr
        lo, hi = self.intensity_range()
        if np.ndim(lo):  # one range per channel (a fluorescence composite)
            lo, hi = np.reshape(lo, (-1, 1, 1)), np.reshape(hi, (-1, 1, 1))
        arr = arr.astype(np.float32)
        arr = np.where(np.isnan(arr), lo, arr).astype(np.float32)
        return np.clip((arr - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)

    # reading ----------------------------------------------------------------------------------
    def read_square(self, x0: float, y0: float, size: float, out_px: int, *, level: int | None = None) -> np.ndarray:
        """Read the square ``[x0, x0+size) x [y0, y0+size)`` (coordinate-system units) as ``(C, out_px, out_px)`` uint8.

        Output pixel ``(i, j)`` samples the point ``(x0 + (j + 0.5) * size / out_px, y0 + (i + 0.5) * size / out_px)``;
        points off the image get the background value (white for RGB, 0 otherwise).
        """
        if level is None:
            level = self.level_for(size * self.um_per_unit / out_px)
        lv = self.levels[level]
        step = size / out_px
        centers = x0 + (np.arange(out_px) + 0.5) * step, y0 + (np.arange(out_px) + 0.5) * step
        gx, gy = np.meshgrid(centers[0], centers[1])
        px = self.to_pixels(np.c_[gx.ravel(), gy.ravel()], level) - 0.5  # pixel centres sit at index + 0.5
        h, w = lv.data.shape[1:]
        lo = np.floor(px.min(0)).astype(int) - 1
        hi = np.ceil(px.max(0)).astype(int) + 2
        cx0, cy0 = max(lo[0], 0), max(lo[1], 0)
        cx1, cy1 = min(hi[0], w), min(hi[1], h)
        out = np.full((self.n_channels, out_px, out_px), self.fill, dtype=np.uint8)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        window = lv.data[:, cy0:cy1, cx0:cx1]
        window = np.asarray(window.compute() if hasattr(window, "compute") else window)
        window = self.to_uint8(window)
        coords = np.stack([px[:, 1] - cy0, px[:, 0] - cx0])
        for c in range(self.n_channels):
            out[c] = (
                ndimage.map_coordinates(
                    window[c].astype(np.float32), coords, order=1, mode="constant", cval=float(self.fill)
                )
                .reshape(out_px, out_px)
                .round()
                .clip(0, 255)
                .astype(np.uint8)
            )
        return out

    def thumbnail(
        self, max_pixel_size_um: float = 16.0, *, background_artefacts: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """A low-resolution uint8 ``(C, h, w)`` view of the image and its 3x3 affine (pixel ``(x, y, 1)`` -> coordinates).

        Uses the coarsest pyramid level not coarser than ``max_pixel_size_um``; without a pyramid, the
        level is strided so that at most ~16 megapixels are read. With ``background_artefacts``, a saturated
        plateau of a fluorescence image and its rim (``saturated_artefact``) are shown as background, so
        that tissue detection does not take the artefact for tissue nor let it shift its threshold.
        """
        level = self.level_for(max_pixel_size_um)
        lv = self.levels[level]
        data = lv.data
        h, w = data.shape[1:]
        stride = max(1, int(np.ceil(np.sqrt(h * w / 16e6))))
        if stride > 1:
            if len(self.levels) == 1:  # a single-level image (JPEG, PNG, flat TIFF): expected, not a problem
                logger.info(
                    "The image has one resolution level; reading it subsampled by %d for a %.1f µm/px view (a "
                    "pyramidal OME-TIFF reads faster).",
                    stride, max_pixel_size_um,
                )  # fmt: skip
            else:
                logger.warning(
                    "The image's pyramid has no level near %.1f µm/px; subsampling level %d by %d.",
                    max_pixel_size_um, level, stride,
                )  # fmt: skip
            data = data[:, ::stride, ::stride]
        arr = np.asarray(data.compute() if hasattr(data, "compute") else data)
        out = self.to_uint8(arr)
        if background_artefacts and not self.brightfield:
            channels = arr[: self.n_channels]
            finite = np.isfinite(channels).all(0) if np.issubdtype(channels.dtype, np.floating) else None
            finite = np.ones(channels.shape[1:], bool) if finite is None else finite
            for c in range(self.n_channels):
                if finite.any():
                    artefact = saturated_artefact(channels[c : c + 1], finite, float(channels[c][finite].max()))
                    if artefact is not None:
                        out[c][artefact] = self.fill
        return out, lv.to_cs @ np.diag([stride, stride, 1.0])


def image_is_brightfield(sdata: Any, image_key: str) -> bool | None:
    """``False`` for an image recorded as fluorescence, else ``None`` (brightfield is decided by the channels).

    ``sg.io.from_anndata(..., fluorescence=True)`` lists the image in ``sdata.attrs['sigmma']['fluorescence']``.
    """
    recorded = ((getattr(sdata, "attrs", None) or {}).get("sigmma") or {}).get("fluorescence") or []
    return False if image_key in recorded else None


def saturated_artefact(arr: np.ndarray, finite: np.ndarray, top: float) -> np.ndarray | None:
    """``(h, w)`` mask of a saturated plateau (0.1-5% of the pixels at ``top``) and its rim, or ``None``.

    The rim: the pixels connected to the plateau that are brighter than the image without it (a downsampled
    pyramid level or the optics blur the plateau's border to values below the maximum).
    """
    saturated = (arr == top).any(0) & finite
    share = float(saturated.sum() / max(finite.sum(), 1))
    if not 1e-3 <= share <= 0.05 or not (arr[:, finite] < top).any():
        return None
    artefact = ndimage.binary_dilation(saturated, iterations=2) & finite
    for _ in range(2):  # two rounds suffice
        hi = float(np.percentile(arr[:, finite & ~artefact], 99.9))
        artefact = ndimage.binary_propagation(artefact, mask=((arr > hi).any(0) & finite) | artefact)
        artefact = ndimage.binary_dilation(artefact, iterations=1) & finite
    return artefact
