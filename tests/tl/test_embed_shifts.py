"""``sg.tl.embed(..., shifts=...)``: cell embeddings blended over shifted tile grids (on by default)."""

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
    return {s: cells.obsm[Keys.embedding()["cell"][s]].copy() for s in SCALES}, sdata


def test_no_shift_is_the_plain_embedding(trained):
    plain, _ = _cells(trained, shifts=None)
    one, _ = _cells(trained, shifts=1)  # the first offset of the sequence is the section's own grid
    same, sdata = _cells(trained, shifts=[(0, 0)])  # re-tiled in memory, graph rebuilt: the same grid
    tiled = sdata.tables["table"].obs[Keys.CELL_TILE].to_numpy() >= 0
    for s in SCALES:
        np.testing.assert_allclose(one[s][tiled], plain[s][tiled], atol=1e-5)
        np.testing.assert_allclose(same[s][tiled], plain[s][tiled], atol=1e-5)
        assert np.isnan(same[s][~tiled]).all()
    assert sdata.tables["table"].uns["sigmma"]["embed"]["shifts"] == [[0.0, 0.0]]


def test_shifted_embedding_is_the_tent_weighted_blend_of_per_shift_embeddings(trained):
    from sigmma_sc.tl._shifts import BLEND_POWER, blend_weights

    second = (1.5, 2.25)
    e0, _ = _cells(trained, shifts=[(0, 0)])
    e1, _ = _cells(trained, shifts=[second])
    both, sdata = _cells(trained, shifts=[(0, 0), second])
    cells = sdata.tables["table"]
    params = sdata.tables[Keys.TILE_TABLE].uns["sigmma"]["tile"]
    tiled = cells.obs[Keys.CELL_TILE].to_numpy() >= 0
    xy = np.asarray(cells.obsm[Keys.tiling()["cell_spatial"]])[tiled]
    size, (x0, y0) = float(params["tile_size"]), params["grid_origin"]
    for s in SCALES:
        w0 = blend_weights(xy, (x0, y0), size, s, BLEND_POWER)
        w1 = blend_weights(xy, (x0 - second[0] * size / 4, y0 - second[1] * size / 4), size, s, BLEND_POWER)
        assert w0.min() >= 1e-3
        assert w0.max() <= 1
        assert w0.std() > 0.1  # tents, not constants
        expected = (w0[:, None] * e0[s][tiled] + w1[:, None] * e1[s][tiled]) / (w0 + w1)[:, None]
        np.testing.assert_allclose(both[s][tiled], expected, atol=1e-5)
        moved = np.abs(e1[s][tiled] - e0[s][tiled]).max(1) > 1e-4
        assert moved.mean() > 0.3, s  # the shifted grid cuts other neighbourhoods
    # tile embeddings keep the section's own grid
    plain, sdata_plain = _cells(trained, shifts=None)
    for s in SCALES:
        key = Keys.embedding()["st"][s]
        np.testing.assert_array_equal(
            sdata.tables[Keys.TILE_TABLE].obsm[key], sdata_plain.tables[Keys.TILE_TABLE].obsm[key]
        )


def test_blend_weights_are_tents_over_the_scale_block():
    from sigmma_sc.tl._shifts import blend_weights

    xy = np.array([[2.0, 2.0], [0.0, 2.0], [1.0, 1.0], [4.0, 4.0], [3.0, 1.0]])
    np.testing.assert_allclose(blend_weights(xy, (0, 0), 8.0, "micro"), [1e-3, 1e-3, 1.0, 1e-3, 1.0])
    np.testing.assert_allclose(blend_weights(xy, (0, 0), 8.0, "meso"), [1.0, 1e-3, 0.25, 1e-3, 0.25])
    np.testing.assert_allclose(blend_weights(xy, (0, 0), 8.0, "macro"), [0.25, 1e-3, 0.0625, 1.0, 0.1875])
    np.testing.assert_allclose(blend_weights(xy, (0, 0), 8.0, "macro", 2.0), [0.0625, 1e-3, 0.0625**2, 1.0, 0.1875**2])


def test_integer_shifts_are_the_low_discrepancy_offsets(trained):
    from sigmma_sc.tl._shifts import AUTO_SHIFTS, auto_shifts

    offsets = auto_shifts(5)
    assert offsets[0] == (0.0, 0.0)
    xs, ys = np.array(offsets).T
    assert ((xs >= 0) & (xs < 4) & (ys >= 0) & (ys < 4)).all()
    assert len({round(x % 1, 3) for x in xs}) == 5  # distinct micro-block phases too
    grid, sdata = _cells(trained, shifts=3)
    listed, _ = _cells(trained, shifts=auto_shifts(3))
    assert sdata.tables["table"].uns["sigmma"]["embed"]["shifts"] == [list(p) for p in auto_shifts(3)]
    for s in SCALES:
        np.testing.assert_allclose(grid[s], listed[s], atol=1e-6)
    _, sdata = _cells(trained)  # the default
    assert sdata.tables["table"].uns["sigmma"]["embed"]["shifts"] == [list(p) for p in auto_shifts(AUTO_SHIFTS)]


@pytest.mark.parametrize(
    ("shifts", "error", "match"),
    [
        (0, ValueError, ">= 1"),
        (True, TypeError, "bool"),
        ([(4.0, 0.0)], ValueError, r"\[0, 4\)"),
        ([(-0.25, 0.0)], ValueError, r"\[0, 4\)"),
        ([(0.5,)], ValueError, "pairs"),
        ([], ValueError, "pairs"),
        ([(0.0, float("nan"))], ValueError, r"\[0, 4\)"),
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
    with pytest.raises(ValueError, match=r"`shifts=2` re-tiles the cells, but `table_key=None` embeds no cells"):
        sg.tl.embed(sdata, model, table_key=None, shifts=2)
    assert not any(k.startswith("X_sigmma") for k in sdata.tables[Keys.TILE_TABLE].obsm)
    sg.tl.embed(sdata, model, table_key=None)  # the default needs no cells: image embeddings only
    assert any(k.endswith("_image") for k in sdata.tables[Keys.TILE_TABLE].obsm)
    assert not any(k.startswith("X_sigmma") for k in sdata.tables["table"].obsm)


@pytest.mark.parametrize("budget", [0, -1.0, True, "1 min"])
def test_bad_time_budget_raises_before_any_work(trained, budget):
    sdata, model = trained
    with pytest.raises(ValueError, match="`time_budget_s` must be a positive number"):
        sg.tl.embed(sdata, model, time_budget_s=budget)
    assert not any(k.startswith("X_sigmma") for k in sdata.tables[Keys.TILE_TABLE].obsm)


def test_time_budget_caps_auto_shifts_and_warns_on_explicit_ones(trained, caplog):
    from sigmma_sc.tl._shifts import AUTO_SHIFTS

    sdata, model = trained
    with caplog.at_level("WARNING", logger="sigmma_sc.tl._shifts"):
        sg.tl.embed(sdata, model, time_budget_s=1e-6)  # the default 'auto': only what fits (at least one grid)
    assert f"Blending {AUTO_SHIFTS} shifted grids would take about" in caplog.text
    assert "blending the first 1" in caplog.text
    assert sdata.tables["table"].uns["sigmma"]["embed"]["shifts"] == [[0.0, 0.0]]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sigmma_sc.tl._shifts"):
        sg.tl.embed(sdata, model, shifts=3, time_budget_s=1e-6)  # asked for: all run, after a warning
    assert "3 shifted grids will take about" in caplog.text
    assert "running them all as asked" in caplog.text
    assert len(sdata.tables["table"].uns["sigmma"]["embed"]["shifts"]) == 3
    caplog.clear()
    with caplog.at_level("WARNING", logger="sigmma_sc.tl._shifts"):
        sg.tl.embed(sdata, model, shifts=3, time_budget_s=None)
    assert "time_budget_s" not in caplog.text


def test_microenvironments_at_a_scale_the_model_was_not_trained_at():
    sdata = make_section(n_cells=300, image_px=128, seed=1)
    sg.pp.tile(sdata, image_key="he", tile_size_um=16.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    sg.tl.featurize(sdata, backbone="test_efficientnet", pretrained=False)
    model = sg.tl.train_sigmma(sdata, epochs=1, scales=("macro",), **TINY)
    sg.tl.embed(sdata, model, shifts=2)
    cells = sdata.tables["table"]
    with pytest.raises(ValueError, match=r"trained at scale\(s\) \('macro',\) only.*\['micro'\]"):
        sg.tl.microenvironments(sdata, scale=("micro", "macro"))
    assert not any(k.startswith("sigmma_microenv") for k in cells.obs)
    sg.tl.microenvironments(sdata)  # the default: the scales embedded
    assert [k for k in cells.obs if k.startswith("sigmma_microenv")] == ["sigmma_microenv_macro"]
    assert cells.uns["sigmma"]["microenvironments"]["resolution"] == {"macro": 0.1}
    with pytest.raises(ValueError, match="`resolution` must be a positive number"):
        sg.tl.microenvironments(sdata, resolution=0)
