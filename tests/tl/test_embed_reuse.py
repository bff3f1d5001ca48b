"""``sg.tl.embed`` reuses the bundle training built when its inputs are the same, and rebuilds it otherwise."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64, "lr": 1e-3}
REUSED = "Reusing the bundle training built"


@pytest.fixture(scope="module")
def _trained():
    sdata = make_section(n_cells=500, image_px=160, rotation_deg=8.0)
    sg.pp.tile(sdata, image_key="he", tile_size_um=12.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    model = sg.tl.train_sigmma(sdata, epochs=1, **TINY)
    return sdata, model


@pytest.fixture
def trained(_trained):
    import spatialdata as sd

    sdata, model = _trained
    return sd.deepcopy(sdata), model


def _embed(sdata, model, caplog, **kwargs):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        out = sg.tl.embed(sdata, model, shifts=None, inplace=False, **kwargs)
    return out, REUSED in caplog.text


def test_embed_reuses_the_training_bundle_with_the_same_embeddings(trained, caplog):
    sdata, model = trained
    assert model.training_bundle is not None
    assert model.training_bundle.tiles is None
    reused, was_reused = _embed(sdata, model, caplog)
    assert was_reused
    kept = model.training_bundle
    model.training_bundle = None  # no bundle kept: embed builds its own
    try:
        built, was_reused = _embed(sdata, model, caplog)
    finally:
        model.training_bundle = kept
    assert not was_reused
    for kind in ("st", "cell"):
        for s in SCALES:
            assert np.array_equal(reused[kind][s], built[kind][s], equal_nan=True)


def test_changed_node_features_rebuild_the_bundle(trained, caplog):
    sdata, model = trained
    cells = sdata.tables["table"]
    key = cells.uns["sigmma"]["cell_graph"]["features_key"]
    before, _ = _embed(sdata, model, caplog)
    cells.obsm[key] = cells.obsm[key] * 2.0
    after, was_reused = _embed(sdata, model, caplog)
    assert not was_reused
    assert not np.allclose(before["cell"]["micro"], after["cell"]["micro"], equal_nan=True)


def test_another_section_does_not_reuse_the_bundle(trained, caplog):
    _, model = trained
    other = make_section(n_cells=500, image_px=160, rotation_deg=8.0, seed=1)
    sg.pp.tile(other, image_key="he", tile_size_um=12.0, pixel_size_um=0.25)
    sg.pp.cell_graph(other, pca_from=model.meta["pca"])
    sg.tl.featurize(other, backbone="test_efficientnet", pretrained=False)
    out, was_reused = _embed(other, model, caplog)
    assert not was_reused
    assert out["cell"]["micro"].shape[0] == other.tables["table"].n_obs
    assert Keys.BACKBONE.format(scale="micro") in other.tables[Keys.TILE_TABLE].obsm
