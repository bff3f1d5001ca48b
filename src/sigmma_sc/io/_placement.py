"""Do the cells sit on the tissue? Which unit or scale of their coordinates makes them match the image's tissue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

MASK_SIDE = 256  # long side of the tissue mask the cells are compared with (pixels)
MAX_CELLS = 20_000  # cells compared (a random subset of larger tables)
FACTORS = 2.0 ** (np.arange(-20, 21) / 4)  # scale factors tried, 1/32 .. 32 in steps of 2^(1/4)
ON_IMAGE = 0.99  # a reading places at least this share of the cells on the image
MIN_CELLS = 50  # fewer cells say little about the tissue they cover: no extent warning


@dataclass(frozen=True)
class Fit:
    """How well cell coordinates (full-resolution pixels, scaled by ``factor``) match the image's tissue."""

    factor: float
    on_tissue: float  # share of the cells on tissue
    coverage: float  # share of the tissue within reach of a cell (reach: ~1.5x the cells' median spacing)
    n_cells: int = 0  # cells compared

    @property
    def score(self) -> float:
        """Harmonic mean of ``on_tissue`` and ``coverage`` (1: the cells and the tissue match)."""
        s = self.on_tissue + self.coverage
        return 2 * self.on_tissue * self.coverage / s if s > 0 else 0.0


class TissueMatch:
    """Compare cell positions with the tissue mask of a low-resolution view of the image.

    Parameters
    ----------
    reader
        An :class:`~sigmma_sc.data._image.ImageReader` on the image in µm (``um_per_unit=1``).
    px
        ``(n, 2)`` cell coordinates (x, y) in full-resolution pixels of the image, as the user's unit reads them.
    seed
        Seed of the cell subset.
    """

    def __init__(self, reader: Any, px: np.ndarray, *, seed: int = 0) -> None:
        from sigmma_sc.pp._tile import tissue_mask

        self.reader = reader
        self.shape = reader.shape
        h, w = self.shape
        extent_um = max(h, w) * reader.pixel_size_um
        thumb, to_cs = reader.thumbnail(
            max_pixel_size_um=max(reader.pixel_size_um, extent_um / MASK_SIDE), background_artefacts=True
        )
        stride = max(1, int(np.ceil(max(thumb.shape[1:]) / (2 * MASK_SIDE))))
        thumb, to_cs = thumb[:, ::stride, ::stride], to_cs @ np.diag([stride, stride, 1.0])
        mask_px_um = float(np.sqrt(abs(np.linalg.det(to_cs[:2, :2]))))
        self.mask = tissue_mask(thumb, mask_px_um, brightfield=reader.brightfield)
        # full-resolution pixel -> mask pixel
        self._to_mask = np.linalg.inv(to_cs) @ np.diag([reader.pixel_size_um, reader.pixel_size_um, 1.0])
        self._near = ndimage.binary_dilation(self.mask, iterations=1)
        self._all = px
        if len(px) > MAX_CELLS:
            px = px[np.random.default_rng(seed).choice(len(px), MAX_CELLS, replace=False)]
        self.px = px
        d, _ = cKDTree(px).query(px, k=2) if len(px) > 1 else (np.zeros((1, 2)), None)
        spacing = float(np.median(d[:, 1])) if len(px) > 1 else 0.0
        self._reach = 1.5 * spacing * float(np.sqrt(abs(np.linalg.det(self._to_mask[:2, :2]))))

    @property
    def usable(self) -> bool:
        """Whether a tissue mask was found (some tissue, some background or a full image)."""
        return bool(self.mask.any())

    def on_image(self, factor: float) -> float:
        """Share of the cells on the image when their coordinates are scaled by ``factor``."""
        q = self.px * factor
        h, w = self.shape
        return float(np.mean((q[:, 0] >= 0) & (q[:, 0] <= w) & (q[:, 1] >= 0) & (q[:, 1] <= h)))

    def fit(self, factor: float) -> Fit:
        """How well the cells scaled by ``factor`` match the tissue."""
        q = np.c_[self.px * factor, np.ones(len(self.px))] @ self._to_mask.T
        mh, mw = self.mask.shape
        ix = np.floor(q[:, 0]).astype(np.int64)
        iy = np.floor(q[:, 1]).astype(np.int64)
        inside = (ix >= 0) & (ix < mw) & (iy >= 0) & (iy < mh)
        on_tissue = float(self._near[iy[inside], ix[inside]].sum() / max(len(q), 1))
        occupied = np.zeros(self.mask.shape, dtype=bool)
        occupied[iy[inside], ix[inside]] = True
        reach = max(1.0, self._reach * factor)
        covered = ndimage.distance_transform_edt(~occupied) <= reach if occupied.any() else occupied
        coverage = float((covered & self.mask).sum() / max(self.mask.sum(), 1))
        return Fit(float(factor), on_tissue, coverage, len(self.px))

    def contrast(self, factor: float) -> float | None:
        """:func:`nuclear_contrast` of all the cells (not the subset) scaled by ``factor``."""
        return nuclear_contrast(self.reader, self._all, factor)

    def best(self, extra: tuple[float, ...] = ()) -> tuple[Fit | None, dict[float, Fit]]:
        """The best-matching scale among ``FACTORS`` and ``extra`` that keep the cells on the image, and all fits."""
        fits: dict[float, Fit] = {}

        def add(factors: Any) -> Fit | None:
            for f in factors:
                if float(f) not in fits and self.on_image(f) >= ON_IMAGE:
                    fits[float(f)] = self.fit(f)
            return max(fits.values(), key=lambda f: (round(f.score, 3), -abs(np.log(f.factor)))) if fits else None

        best = add((*FACTORS, 1.0, *extra))
        if best is not None:  # refine between the grid's steps
            best = add(best.factor * 2.0 ** (np.arange(-7, 8) / 32))
        return best, fits


def clearly_better(best: Fit, given: Fit) -> bool:
    """Whether ``best`` matches the tissue clearly better than ``given`` while ``given`` covers little of it."""
    return (
        best.n_cells >= MIN_CELLS
        and best.score >= 0.8
        and best.on_tissue >= 0.9
        and given.coverage <= 0.5
        and best.score >= given.score + 0.25
        and abs(np.log(best.factor / given.factor)) > np.log(1.25)
    )


WINDOW_UM = 160.0  # side of the window where the cells are compared with the nuclei
NUCLEI_PX_UM = 0.5  # pixel size the window is read at (or the image's, if coarser)
OFFSET_UM = 6.0  # the baseline: the signal this far from each cell (8 directions), between the nuclei


def nuclear_contrast(reader: Any, px: np.ndarray, factor: float) -> float | None:
    """How much brighter (fluorescence) or darker (brightfield) the image is at the cells than next to them.

    In a ``WINDOW_UM`` window at the cells' median position (the cells' coordinates, full-resolution pixels,
    scaled by ``factor``), read at ``NUCLEI_PX_UM`` µm/px and smoothed over ~1 µm: the mean nuclear signal at the
    cells minus its mean ``OFFSET_UM`` away from them (8 directions), in standard deviations of the latter. Cells
    placed right sit on their nuclei (about 1 on the bone-marrow DAPI); misplaced cells land anywhere (about 0),
    however dense and wherever the window lies. ``None`` when fewer than 10 cells fall in the window.
    """
    um = px * factor * reader.pixel_size_um
    centre = um[np.argmin(((um - np.median(um, 0)) ** 2).sum(1))]
    x0, y0 = (float(v) for v in centre - WINDOW_UM / 2)
    step = max(NUCLEI_PX_UM, reader.pixel_size_um)
    n = int(round(WINDOW_UM / step))
    gray = reader.read_square(x0, y0, WINDOW_UM, n).astype(np.float32).mean(0)
    signal = ndimage.gaussian_filter(255.0 - gray if reader.brightfield else gray, 1.0 / step)
    rel = (um - [x0, y0]) / step
    margin = OFFSET_UM / step + 1
    inside = (rel >= margin).all(1) & (rel < n - margin).all(1)
    if inside.sum() < 10:
        return None
    at = rel[inside]
    angles = np.arange(8) * np.pi / 4
    ring = at[:, None, :] + OFFSET_UM / step * np.c_[np.cos(angles), np.sin(angles)][None]
    centre_values = ndimage.map_coordinates(signal, [at[:, 1], at[:, 0]], order=1)
    ring_values = ndimage.map_coordinates(signal, [ring[..., 1].ravel(), ring[..., 0].ravel()], order=1)
    return float((centre_values.mean() - ring_values.mean()) / (ring_values.std() + 1e-6))


MIN_CONTRAST = 0.2  # cells on their nuclei: 0.36-0.49 on the bone-marrow DAPI; misplaced cells: 0.00-0.10
CONTRAST_MARGIN = 0.15


def on_their_nuclei(given: float | None, best: float | None) -> bool:
    """Whether cells sit on nuclei as ``given`` and clearly less so in the other reading (``best``)."""
    return given is not None and given >= MIN_CONTRAST and (best is None or given >= best + CONTRAST_MARGIN)


def describe(fit: Fit) -> str:
    """``'73% of the cells on tissue, covering 24% of it'``."""
    return f"{fit.on_tissue:.0%} of the cells on tissue, covering {fit.coverage:.0%} of it"
