"""Brightfield tissue detection: background, pen marks and dust out, folds in."""

from __future__ import annotations

import numpy as np

from sigmma_sc.pp._tile import tissue_mask
from sigmma_sc.pp._tissue import pen_mask


def _slide(px_um: float = 4.0, n: int = 400):
    """A 1.6 mm square slide at 4 µm/px: pink tissue with a purple fold, a blue and a green pen stroke, dust."""
    rng = np.random.default_rng(0)
    img = np.empty((3, n, n), np.float32)
    img[:] = np.array([238.0, 236.0, 240.0])[:, None, None]  # slightly grey glass
    yy, xx = np.mgrid[0:n, 0:n]
    tissue = (xx - 200) ** 2 / 150**2 + (yy - 200) ** 2 / 110**2 < 1
    img[:, tissue] = np.array([200.0, 120.0, 170.0])[:, None]  # eosin pink
    nuclei = tissue & (rng.random((n, n)) < 0.15)
    img[:, nuclei] = np.array([110.0, 70.0, 150.0])[:, None]  # hematoxylin
    fold = tissue & (np.abs(yy - xx) < 6)
    img[:, fold] = np.array([90.0, 40.0, 110.0])[:, None]  # fold: darker, more saturated purple
    blue = (np.abs(yy - 360) < 5) & (xx > 40) & (xx < 360)  # a pen line below the tissue, crossing into it
    img[:, blue] = np.array([40.0, 70.0, 190.0])[:, None]
    green = (np.abs(xx - 30) < 6) & (yy > 50) & (yy < 350)
    img[:, green] = np.array([60.0, 160.0, 90.0])[:, None]
    dust = np.zeros((n, n), bool)
    dust[20:23, 380:383] = True  # a 12 µm speck
    img[:, dust] = 60.0
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), tissue, fold, blue | green, dust


def test_brightfield_mask_keeps_tissue_and_folds_drops_pen_and_dust():
    img, tissue, fold, pen, dust = _slide()
    mask = tissue_mask(img, 4.0)
    assert mask[tissue].mean() > 0.97
    assert mask[fold].mean() > 0.95  # folds are tissue
    assert mask[pen & ~tissue].mean() < 0.02  # ink is not
    assert not mask[dust].any()
    assert mask[~tissue & ~pen].mean() < 0.02  # background
    ink = pen_mask(img, 4.0)
    assert ink[pen].mean() > 0.9
    assert ink[tissue & ~pen].mean() < 0.01


def test_brightfield_mask_on_a_fine_view_is_computed_at_coarse_resolution():
    img, tissue, *_ = _slide()
    fine = np.repeat(np.repeat(img, 4, 1), 4, 2)  # the same slide at 1 µm/px
    mask = tissue_mask(fine, 1.0)
    assert mask.shape == fine.shape[1:]
    coarse = mask[::4, ::4]
    assert coarse[tissue].mean() > 0.97
    assert coarse[~tissue].mean() < 0.05


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(240, 2, (3, 200, 200)), 0, 255).astype(np.uint8)
    assert tissue_mask(img, 4.0).mean() < 0.01
