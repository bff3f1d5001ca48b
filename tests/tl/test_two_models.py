"""One output contract: two models and two tilings side by side in one SpatialData, found through `.uns` records."""

from __future__ import annotations

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64, "lr": 1e-3}


@pytest.fixture(scope="module")
def two_models():
    """A section with two models (seeds 0 and 1) embedded under the prefixes 'seed0' and 'seed1'."""
    sdata = make_section(n_cells=700, image_px=200)
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    models = {}
    for seed in (0, 1):
        models[seed] = sg.tl.train_sigmma(sdata, epochs=2, seed=seed, **TINY)
        sg.tl.embed(sdata, models[seed], key_added=f"seed{seed}")
    return sdata, models


def _obsm_snapshot(sdata):
    return {name: (set(t.obsm), set(t.obs), set(t.uns)) for name, t in sdata.tables.items()}


def test_two_models_keep_their_own_keys(two_models):
    sdata, _ = two_models
    tiles, cells = sdata.tables[Keys.TILE_TABLE], sdata.tables["table"]
    for p in ("seed0", "seed1"):
        record = tiles.uns[p]["embed"]
        assert record["keys"] == Keys.embedding(p)  # the same record in both tables: every key the run wrote
        assert cells.uns[p]["embed"]["keys"]["cell"] == Keys.embedding(p)["cell"]
        for s in SCALES:
            assert tiles.obsm[f"X_{p}_{s}_image"].shape == (tiles.n_obs, 16)
            assert cells.obsm[f"X_{p}_{s}"].shape == (cells.n_obs, 16)
    assert not any(k.startswith("X_sigmma") for k in tiles.obsm)  # nothing under the default prefix
    for s in SCALES:  # two different models, not one written twice
        assert not np.allclose(tiles.obsm[f"X_seed0_{s}_st"], tiles.obsm[f"X_seed1_{s}_st"])
    assert tiles.uns["seed0"]["embed"]["config"]["seed"] == 0
    assert tiles.uns["seed1"]["embed"]["config"]["seed"] == 1


def test_embed_inplace_false_returns_what_it_would_write(two_models):
    sdata, models = two_models
    before = _obsm_snapshot(sdata)
    out = sg.tl.embed(sdata, models[0], key_added="other", inplace=False)
    assert _obsm_snapshot(sdata) == before
    tiles, cells = sdata.tables[Keys.TILE_TABLE], sdata.tables["table"]
    for s in SCALES:
        np.testing.assert_allclose(out["image"][s], tiles.obsm[f"X_seed0_{s}_image"], atol=1e-5)
        np.testing.assert_allclose(out["st"][s], tiles.obsm[f"X_seed0_{s}_st"], atol=1e-5)
        np.testing.assert_allclose(out["cell"][s], cells.obsm[f"X_seed0_{s}"], atol=1e-5)


def test_evaluate_compares_the_two_models(two_models):
    sdata, _ = two_models
    table = sg.metrics.evaluate(sdata, use_rep=["seed0", "seed1"], protocols=("paper",))
    expected = [f"{p} {s}" for p in ("seed0", "seed1") for s in (*SCALES, "all")]
    assert list(table.index) == expected
    assert np.isfinite(table["image->st R@10%"]).all()  # retrieval found each run's ST partners
    assert not np.allclose(table.loc["seed0 all"].to_numpy(float), table.loc["seed1 all"].to_numpy(float))
    one = sg.metrics.evaluate(sdata, use_rep="seed1", protocols=("paper",))
    assert list(one.index) == [*SCALES, "all"]
    np.testing.assert_allclose(one.loc["macro"].to_numpy(), table.loc["seed1 macro"].to_numpy())
    retrieval = sg.metrics.cross_modal_retrieval(sdata, use_rep="seed0")
    assert set(retrieval["scale"]) == {*SCALES, "all"}
    with pytest.raises(KeyError, match=r"key_added='sigmma'.*recorded here: \['seed0', 'seed1'\]"):
        sg.metrics.cross_modal_retrieval(sdata)  # the default prefix holds nothing here: named, not guessed


def test_microenvironments_and_plots_follow_use_rep(two_models):
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    sdata, _ = two_models
    cells = sdata.tables["table"]
    labels = sg.tl.microenvironments(sdata, scale="micro", use_rep="seed1", inplace=False)
    assert "seed1_microenv_micro" not in cells.obs
    sg.tl.microenvironments(sdata, scale=("micro", "macro"), use_rep="seed1")
    assert cells.uns["seed1"]["microenvironments"]["keys"] == {
        "micro": "seed1_microenv_micro",
        "macro": "seed1_microenv_macro",
    }
    assert cells.uns["seed1"]["microenvironments"]["use_rep"]["micro"] == "X_seed1_micro"
    written = cells.obs["seed1_microenv_micro"].astype(str).to_numpy()
    assert (written == np.asarray(labels["micro"]).astype(str)).all()  # seeded: the same labels
    ax = sg.pl.microenvironments(sdata, scale="micro", key="seed1", show_image=False)
    assert isinstance(ax, Axes)
    plt.close("all")
    with pytest.raises(KeyError, match=r"run `sg.tl.microenvironments\(sdata, scale='micro'\)` first"):
        sg.pl.microenvironments(sdata, scale="micro", show_image=False)  # nothing under the default prefix
    hits = sg.tl.retrieve(sdata, use_rep="seed0", k=2)
    assert hits["is_pair"].any()


def test_round_trip_through_zarr(two_models, tmp_path):
    import spatialdata as sd

    sdata, _ = two_models
    sdata.write(tmp_path / "two.zarr")
    back = sd.read_zarr(tmp_path / "two.zarr")
    a = sg.metrics.evaluate(sdata, use_rep=["seed0", "seed1"], protocols=("paper",))
    b = sg.metrics.evaluate(back, use_rep=["seed0", "seed1"], protocols=("paper",))
    np.testing.assert_allclose(a.to_numpy(dtype=float), b.to_numpy(dtype=float), equal_nan=True)
    assert dict(back.tables[Keys.TILE_TABLE].uns["seed1"]["embed"]["keys"]["image"]) == Keys.embedding("seed1")["image"]


def test_two_tilings_side_by_side():
    sdata = make_section(n_cells=500, image_px=200, seed=3)
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    cells = sdata.tables["table"]
    first = cells.obs[Keys.CELL_TILE].copy()
    sg.pp.tile(sdata, image_key="he", tile_size_um=16.0, pixel_size_um=0.25, key_added="coarse")
    assert {"he_sigmma_tiles", "he_coarse_tiles"} <= set(sdata.shapes)
    assert {"sigmma_tiles", "coarse_tiles"} <= set(sdata.tables)
    assert (cells.obs[Keys.CELL_TILE] == first).all()  # the first tiling is intact
    assert {"coarse_tile", "coarse_micro_block", "coarse_meso_block"} <= set(cells.obs)
    assert sdata.tables["coarse_tiles"].uns["coarse"]["tile"]["keys"] == Keys.tiling("coarse", "he")
    assert sdata.tables["coarse_tiles"].n_obs < sdata.tables["sigmma_tiles"].n_obs
    sg.pp.cell_graph(sdata, n_comps=8)
    sg.pp.cell_graph(sdata, tile_key="coarse_tiles", key_added="coarse", n_comps=8)
    assert {"sigmma_connectivities", "coarse_connectivities"} <= set(cells.obsp)
    fine, _ = sg.data.build_bundle(sdata, require_image_features=False)
    coarse, _ = sg.data.build_bundle(sdata, tile_key="coarse_tiles", graph_key="coarse", require_image_features=False)
    assert len(fine.cell_ptr) - 1 == sdata.tables["sigmma_tiles"].n_obs
    assert len(coarse.cell_ptr) - 1 == sdata.tables["coarse_tiles"].n_obs
    with pytest.raises(ValueError, match=r"built on tile table 'sigmma_tiles', not 'coarse_tiles'"):
        sg.data.build_bundle(sdata, tile_key="coarse_tiles", require_image_features=False)
    out = sg.pp.tile(sdata, image_key="he", tile_size_um=32.0, pixel_size_um=0.25, key_added="x", inplace=False)
    assert "x_tiles" not in sdata.tables
    assert "x_tile" in out[2]
    with pytest.raises(ValueError, match="`key_added` must be a non-empty name"):
        sg.pp.tile(sdata, image_key="he", key_added="a/b")
