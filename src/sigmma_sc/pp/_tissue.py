"""Tissue detection on a low-resolution brightfield (H&E) view: background, pen marks and dust out, folds in."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PEN_MARGIN = 15  # green channel above red by this much: ink (H&E absorbs green most, so G is its lowest channel)
MIN_OBJECT_UM2 = 2_500.0  # specks smaller than a 50 x 50 µm square are dust or debris
MAX_HOLE_UM2 = 40_000.0  # holes smaller than a 200 x 200 µm square are filled (nuclei-free gaps, thin tears)
MIN_PEN_UM2 = 10_000.0  # ink strokes are at least ~0.1 mm wide and long


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` (256-bin histogram)."""
    hist, edges = np.histogram(values, bins=256)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    return float(centers[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def pen_mask(rgb: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Pen and marker ink of a uint8 ``(3, h, w)`` brightfield image with pixels of ``pixel_size_um`` µm.

    Hematoxylin and eosin both absorb green most, so stained tissue has green as its lowest channel (pink,
    purple, blue-purple). Green, blue and cyan markers are saturated with green above red; black marker is
    near-black and grey (tissue as dark as that, e.g. a fold, stays purple). The colours are judged after
    smoothing over ~8 µm, and only strokes of at least ``MIN_PEN_UM2`` count (JPEG colour noise and single
    dark nuclei are not ink).
    """
    img = ndimage.uniform_filter(rgb.astype(np.float32), size=(1, *(2 * [max(1, round(8.0 / pixel_size_um))])))
    r, g, b = img
    mx, mn = img.max(0), img.min(0)
    ink = ((g > r + PEN_MARGIN) & (mx - mn > 30)) | ((mx < 60) & (mx - mn < 20))
    labels, n = ndimage.label(ink)
    if n:
        big = np.bincount(labels.ravel()) * float(pixel_size_um) ** 2 >= MIN_PEN_UM2
        big[0] = False
        ink = big[labels]
    return ink


WORK_UM = 2.0  # masks are computed at no finer than this pixel size (finer views are block-averaged)


def brightfield_tissue_mask(rgb: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Tissue mask of a low-resolution uint8 ``(3, h, w)`` brightfield image with pixels of ``pixel_size_um`` µm.

    Tissue is darker than the glass (below Otsu's threshold of the grey level, capped at 235, so that a slide
    almost fully covered by tissue is not split in two) or clearly coloured (saturation > 25). Pen and
    marker ink (:func:`pen_mask`, dilated by ~8 µm to its anti-aliased rim) is removed, specks smaller than
    ``MIN_OBJECT_UM2`` (and than 5% of the largest piece) are dropped, and holes smaller than ``MAX_HOLE_UM2`` are filled. Folds (darker,
    more saturated tissue) stay tissue. Views finer than ``WORK_UM`` µm/px are block-averaged towards it first
    (keeping at least 256 px on the short side).

    Parameters
    ----------
    rgb
        ``(3, h, w)`` uint8 image.
    pixel_size_um
        Its pixel size in µm.

    Returns
    -------
    ``(h, w)`` boolean mask.
    """
    h, w = rgb.shape[1:]
    f = max(1, min(int(WORK_UM // pixel_size_um), min(h, w) // 256))  # keep >= 256 px on the short side
    if f > 1:
        hh, ww = -(-h // f) * f, -(-w // f) * f
        padded = np.pad(rgb, ((0, 0), (0, hh - h), (0, ww - w)), mode="edge").astype(np.float32)
        small = padded.reshape(3, hh // f, f, ww // f, f).mean((2, 4)).round().astype(np.uint8)
        mask = brightfield_tissue_mask(small, pixel_size_um * f)
        return np.repeat(np.repeat(mask, f, 0), f, 1)[:h, :w]
    img = rgb.astype(np.float32)
    gray = img.mean(0)
    sat = img.max(0) - img.min(0)
    thr = min(otsu(gray), 235.0) if np.ptp(gray) > 10 else 235.0
    mask = (gray < thr) | (sat > 25)
    px_area = float(pixel_size_um) ** 2
    ink = pen_mask(rgb, pixel_size_um)
    if ink.any():
        ink = ndimage.binary_dilation(ink, iterations=max(1, round(8.0 / pixel_size_um)))
        mask &= ~ink
    mask = ndimage.binary_closing(mask, iterations=max(1, min(4, round(8.0 / pixel_size_um))))
    if mask.mean() >= 0.999:
        return mask
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        small = (sizes * px_area < MIN_OBJECT_UM2) & (sizes < 0.05 * sizes[1:].max())  # specks, not a tiny section
        small[0] = False
        mask[small[labels]] = False
    holes, n = ndimage.label(~mask)
    if n:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.r_[holes[0], holes[-1], holes[:, 0], holes[:, -1]])
        fill = sizes * px_area < MAX_HOLE_UM2
        fill[0] = False
        fill[border] = False
        if ink.any():  # a hole under a pen stroke is ink, not tissue
            fill[np.unique(holes[ink])] = False
        mask[fill[holes]] = True
    return mask
