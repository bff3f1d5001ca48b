"""Macenko stain normalisation: the reference implementation (torchstain) and the lazy image element."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_DATA

import sigmma_sc as sg
from sigmma_sc.pp._stain import macenko_apply, macenko_stains

HE = SHARED_DATA / "he-images"


def _png(name):
    from skimage.io import imread

    return np.ascontiguousarray(imread(HE / name)[..., :3])


@pytest.mark.data
def test_macenko_matches_torchstain():
    torchstain = pytest.importorskip("torchstain")
    source, target = _png("torchstain_source.png"), _png("torchstain_target.png")
    ref = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ref.fit(target)
    expected, _, _ = ref.normalize(I=source, stains=False)
    t, s = macenko_stains(target), macenko_stains(source)
    assert np.allclose(t["stain_matrix"], ref.HERef)
    assert np.allclose(t["max_concentrations"], ref.maxCRef)
    out = macenko_apply(source, s, t)
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1  # the same arithmetic (a pseudo-inverse instead of lstsq: last-bit rounding)
    assert (diff > 0).mean() < 0.01
    # normalising moves the source's colour statistics towards the target's
    tissue = source.mean(-1) < 200
    assert (
        np.abs(out[tissue].mean(0) - target[target.mean(-1) < 200].mean(0)).sum()
        < np.abs(source[tissue].mean(0) - target[target.mean(-1) < 200].mean(0)).sum()
    )


def _stained(rng, n=128):
    """Pink tissue with purple nuclei on glass (H&E-like optical densities)."""
    od_h, od_e = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
    yy, xx = np.mgrid[0:n, 0:n]
    tissue = (xx - n / 2) ** 2 + (yy - n / 2) ** 2 < (0.4 * n) ** 2
    ch = np.where(tissue, rng.gamma(2, 0.3, (n, n)) * (rng.random((n, n)) < 0.3), 0)
    ce = np.where(tissue, rng.gamma(4, 0.15, (n, n)), 0)
    od = ch[..., None] * od_h + ce[..., None] * od_e
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


def test_recovers_known_stains_and_inverts_a_restaining():
    rng = np.random.default_rng(0)
    img = _stained(rng)
    s = macenko_stains(img)
    he = s["stain_matrix"] / np.linalg.norm(s["stain_matrix"], axis=0)
    true_h = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
    assert he[:, 0] @ true_h > 0.97  # hematoxylin first
    other = {"stain_matrix": np.array([[0.75, 0.15], [0.62, 0.85], [0.25, 0.50]]),  # another lab's H&E
             "max_concentrations": s["max_concentrations"] * np.array([1.5, 0.6])}  # fmt: skip
    shifted = macenko_apply(img, s, other)
    assert np.abs(shifted.astype(int) - img.astype(int)).mean() > 5
    back = macenko_apply(shifted, macenko_stains(shifted), s)
    assert np.abs(back.astype(int) - img.astype(int)).mean() < 4
    with pytest.raises(ValueError, match="too little"):
        macenko_stains(np.full((20, 20, 3), 245, np.uint8))


def test_stain_normalize_adds_a_lazy_image_with_the_same_levels(section):
    import dask.array as da
    from spatialdata.transformations import get_transformation

    rng = np.random.default_rng(1)
    from spatialdata.models import Image2DModel

    img = np.moveaxis(_stained(rng, 256), -1, 0)
    section.images["he"] = Image2DModel.parse(img, dims=("c", "y", "x"), scale_factors=[2],
                                              transformations={"global": get_transformation(section.images["he"], "global")})  # fmt: skip
    sg.pp.stain_normalize(section, image_key="he")
    out = section.images["he_stain_normalized"]
    assert list(out.children) == ["scale0", "scale1"]
    arr = out["scale0"]["image"]
    assert isinstance(arr.data, da.Array)
    assert arr.shape == (3, 256, 256)
    assert get_transformation(arr, "global") == get_transformation(section.images["he"]["scale0"]["image"], "global")
    res = arr.data.compute()
    assert res.dtype == np.uint8
    assert np.abs(res.astype(int) - img.astype(int)).mean() > 1  # re-stained towards Macenko's reference
    rec = section.attrs["sigmma"]["stain_normalize"]["he_stain_normalized"]
    assert np.array(rec["source"]["stain_matrix"]).shape == (3, 2)
    section.images["dapi"] = Image2DModel.parse(np.zeros((1, 32, 32), np.uint16), dims=("c", "y", "x"))
    with pytest.raises(ValueError, match="RGB uint8"):
        sg.pp.stain_normalize(section, image_key="dapi")
