"""``sg.tl.embed(..., shifts=...)``: cell embeddings averaged over shifted tile grids."""

from __future__ import annotations

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64, "lr": 1e-3}


@pytest.fixture(scope="module")
def _trained():
    sdata = make_section(n_cells=700, image_px=200, rotation_deg=8.0)
    sg.pp.tile(sdata, image_key="he", tile_size_um=12.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    sg.tl.featurize(sdata, backbone="test_efficientnet", pretrained=False)
    model = sg.tl.train_sigmma(sdata, epochs=2, **TINY)
    return sdata, model


@pytest.fixture
def trained(_trained):
    import spatialdata as sd

    sdata, model = _trained
    return sd.deepcopy(sdata), model


def _cells(sdata, **kwargs):
    sdata, model = sdata
    sg.tl.embed(sdata, model, **kwargs)
    cells = sdata.tables["table"]
    return {s: cells.obsm[Keys.EMB_CELL.format(scale=s)].copy() for s in SCALES}, sdata


def test_no_shift_is_the_plain_embedding(trained):
    plain, _ = _cells(trained)
    none, _ = _cells(trained, shifts=None)
    same, sdata = _cells(trained, shifts=[(0, 0)])  # re-tiled in memory, graph rebuilt: the same grid
    tiled = sdata.tables["table"].obs[Keys.CELL_TILE].to_numpy() >= 0
    for s in SCALES:
        np.testing.assert_array_equal(none[s], plain[s])
        np.testing.assert_allclose(same[s][tiled], plain[s][tiled], atol=1e-5)
        assert np.isnan(same[s][~tiled]).all()
    assert sdata.tables["table"].uns["sigmma"]["embed"]["shifts"] == [[0.0, 0.0]]


def test_shifted_embedding_is_the_mean_of_per_shift_embeddings(trained):
    e0, _ = _cells(trained, shifts=[(0, 0)])
    e1, _ = _cells(trained, shifts=[(0.5, 0.25)])
    both, sdata = _cells(trained, shifts=[(0, 0), (0.5, 0.25)])
    tiled = sdata.tables["table"].obs[Keys.CELL_TILE].to_numpy() >= 0
    for s in SCALES:
        np.testing.assert_allclose(both[s][tiled], (e0[s][tiled] + e1[s][tiled]) / 2, atol=1e-5)
        moved = np.abs(e1[s][tiled] - e0[s][tiled]).max(1) > 1e-4
        assert moved.mean() > 0.3, s  # the shifted grid cuts other neighbourhoods
    # tile embeddings keep the section's own grid
    plain, sdata_plain = _cells(trained)
    for s in SCALES:
        key = Keys.EMB_ST.format(scale=s)
        np.testing.assert_array_equal(
            sdata.tables[Keys.TILE_TABLE].obsm[key], sdata_plain.tables[Keys.TILE_TABLE].obsm[key]
        )


def test_integer_shifts_are_the_regular_offsets(trained):
    grid, sdata = _cells(trained, shifts=2)
    listed, _ = _cells(trained, shifts=[(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)])
    assert sdata.tables["table"].uns["sigmma"]["embed"]["shifts"] == [[0, 0], [0.5, 0], [0, 0.5], [0.5, 0.5]]
    for s in SCALES:
        np.testing.assert_allclose(grid[s], listed[s], atol=1e-6)


@pytest.mark.parametrize(
    ("shifts", "error", "match"),
    [
        (0, ValueError, ">= 1"),
        (True, TypeError, "bool"),
        ([(1.0, 0.0)], ValueError, r"\[0, 1\)"),
        ([(-0.25, 0.0)], ValueError, r"\[0, 1\)"),
        ([(0.5,)], ValueError, "pairs"),
        ([], ValueError, "pairs"),
        ([(0.0, float("nan"))], ValueError, r"\[0, 1\)"),
        ([(0.5, 0.5), (0.5, 0.5)], ValueError, "twice"),
        ("half", TypeError, "could not be read"),
    ],
)
def test_bad_shifts_raise_before_any_work(trained, shifts, error, match):
    sdata, model = trained
    cells, tiles = sdata.tables["table"], sdata.tables[Keys.TILE_TABLE]
    before = (set(cells.obsm), set(tiles.obsm), set(cells.uns.get("sigmma", {})), set(tiles.uns.get("sigmma", {})))
    with pytest.raises(error, match=match):
        sg.tl.embed(sdata, model, shifts=shifts)
    assert before == (set(cells.obsm), set(tiles.obsm), set(cells.uns["sigmma"]), set(tiles.uns["sigmma"]))


def test_shifts_need_the_cell_table(trained):
    sdata, model = trained
    with pytest.raises(ValueError, match="table_key"):
        sg.tl.embed(sdata, model, table_key=None, shifts=2)
    assert not any(k.startswith("X_sigmma") for k in sdata.tables[Keys.TILE_TABLE].obsm)
