from __future__ import annotations

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64, "lr": 1e-3}


@pytest.fixture(scope="module")
def _prepared():
    sdata = make_section(n_cells=700, image_px=200, rotation_deg=8.0)
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    sg.tl.featurize(sdata, backbone="test_efficientnet", pretrained=False)
    return sdata


@pytest.fixture
def prepared(_prepared):
    import spatialdata as sd

    sdata = sd.deepcopy(_prepared)
    sdata.attrs["sigmma"] = {"um_per_unit": {"global": 0.5}}
    return sdata


def test_featurize_cache_reused(prepared, caplog):
    import logging

    tiles = prepared.tables[Keys.TILE_TABLE]
    before = tiles.obsm[Keys.BACKBONE.format(scale="micro")].copy()
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        sg.tl.featurize(prepared, backbone="test_efficientnet", pretrained=False)
    assert "Reusing cached" in caplog.text
    assert np.array_equal(before, tiles.obsm[Keys.BACKBONE.format(scale="micro")])
    assert tiles.uns["sigmma"]["backbone"]["name"] == "test_efficientnet"
    for s in SCALES:
        assert tiles.obsm[Keys.BACKBONE.format(scale=s)].shape == (tiles.n_obs, 256)


def test_train_embed_shapes_loss_and_history(prepared):
    model = sg.tl.train_sigmma(prepared, epochs=6, **TINY)
    hist = prepared.tables[Keys.TILE_TABLE].uns["sigmma"]["training"]["history"]
    assert len(hist["train_loss"]) == 6
    assert np.isfinite(hist["train_loss"]).all()
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    sg.tl.embed(prepared, model)
    tiles, cells = prepared.tables[Keys.TILE_TABLE], prepared.tables["table"]
    for s in SCALES:
        zi = tiles.obsm[Keys.embedding()["image"][s]]
        zs = tiles.obsm[Keys.embedding()["st"][s]]
        zc = cells.obsm[Keys.embedding()["cell"][s]]
        assert zi.shape == zs.shape == (tiles.n_obs, 16)
        assert zc.shape == (cells.n_obs, 16)
        assert np.allclose(np.linalg.norm(zi, axis=1), 1, atol=1e-4)
        assert np.isfinite(zc[cells.obs[Keys.CELL_TILE] >= 0]).all()


def test_seed_determinism_and_save_load(prepared, tmp_path):
    import spatialdata as sd

    m1 = sg.tl.train_sigmma(prepared, epochs=2, seed=3, **TINY)
    other = sd.deepcopy(prepared)
    m2 = sg.tl.train_sigmma(other, epochs=2, seed=3, **TINY)
    sg.tl.embed(prepared, m1)
    sg.tl.embed(other, m2)
    key = Keys.embedding()["cell"]["meso"]
    assert np.array_equal(prepared.tables["table"].obsm[key], other.tables["table"].obsm[key], equal_nan=True)
    m1.save(tmp_path / "model.pt")
    loaded = sg.model.SigmmaModel.load(tmp_path / "model.pt")
    third = sd.deepcopy(prepared)
    sg.tl.embed(third, loaded)
    for k in (Keys.embedding()["image"]["micro"], Keys.embedding()["st"]["macro"]):
        assert np.array_equal(third.tables[Keys.TILE_TABLE].obsm[k], prepared.tables[Keys.TILE_TABLE].obsm[k])


def test_image_only_embedding(prepared):
    model = sg.tl.train_sigmma(prepared, epochs=1, **TINY)
    sg.tl.embed(prepared, model, table_key=None)
    tiles = prepared.tables[Keys.TILE_TABLE]
    assert Keys.embedding()["image"]["macro"] in tiles.obsm
    assert Keys.embedding()["st"]["macro"] not in tiles.obsm


def test_train_before_preprocessing(section):
    with pytest.raises(KeyError, match="run `sg.pp.tile` first"):
        sg.tl.train_sigmma(section, **TINY)
    sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    with pytest.raises(KeyError, match="run `sg.pp.cell_graph` first"):
        sg.tl.train_sigmma(section, **TINY)


def test_too_few_training_tiles():
    sdata = make_section(n_cells=100, image_px=64)
    sg.pp.tile(sdata, image_key="he", tile_size_um=40.0, pixel_size_um=1.0)
    assert sdata.tables[Keys.TILE_TABLE].n_obs == 1
    sg.pp.cell_graph(sdata, n_comps=4)
    with pytest.raises(ValueError, match="at least 2"):
        sg.tl.train_sigmma(sdata, epochs=1, **TINY)


def test_embed_with_mismatched_model(prepared):
    model = sg.tl.train_sigmma(prepared, epochs=1, **TINY)
    sg.pp.cell_graph(prepared, n_comps=5)  # other node-feature width
    with pytest.raises(ValueError, match="trained on 8"):
        sg.tl.embed(prepared, model)
    sg.pp.cell_graph(prepared, n_comps=8)
    sg.tl.featurize(prepared, backbone="test_vit", pretrained=False, overwrite=True)
    with pytest.raises(ValueError, match="overwrite=True"):
        sg.tl.embed(prepared, model)


def test_new_section_projected_with_training_pca(prepared):
    """A second section gets node features in the training section's PCA space."""
    sg.pp.cell_graph(prepared, n_comps=8)
    pca = prepared.tables["table"].uns["sigmma"]["cell_graph"]["pca"]
    new = make_section(n_cells=300, image_px=200, seed=5)
    sg.pp.tile(new, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(new, pca_from=pca)
    X = new.tables["table"].obsm[Keys.FEATURES]
    assert X.shape[1] == 8
    fresh = sg.pp.cell_graph(new, n_comps=8, inplace=False)[2]
    assert not np.allclose(fresh, X)  # a refit would differ
    bad = dict(pca)
    bad["var_names"] = np.array([f"X{i}" for i in range(len(pca["var_names"]))])
    with pytest.raises(ValueError, match="genes of this section differ"):
        sg.pp.cell_graph(new, pca_from=bad)


def test_finetune_through_tl(prepared, tmp_path):
    """finetune_blocks reads tile images into the bundle, trains the last block, and embed encodes pixels."""
    model = sg.tl.train_sigmma(prepared, epochs=1, finetune_blocks=1, **TINY)
    assert model.finetuned
    sg.tl.embed(prepared, model)
    tiles = prepared.tables[Keys.TILE_TABLE]
    z = tiles.obsm[Keys.embedding()["image"]["micro"]]
    assert z.shape == (tiles.n_obs, 16)
    assert np.isfinite(z).all()
    model.save(tmp_path / "ft.pt")
    again = sg.model.SigmmaModel.load(tmp_path / "ft.pt")
    import spatialdata as sd

    other = sd.deepcopy(prepared)
    sg.tl.embed(other, again)
    assert np.allclose(other.tables[Keys.TILE_TABLE].obsm[Keys.embedding()["image"]["micro"]], z, atol=1e-5)


def test_model_from_a_bundle_embeds_with_its_features(prepared, tmp_path):
    """The GPU-node path: a saved bundle -> SigmmaModel.from_bundle -> fit -> embed on the section."""
    from sigmma_sc.model import SigmmaModel, TrainingBundle

    bundle, _ = sg.data.build_bundle(prepared)
    bundle.save(tmp_path / "bundle.pt")
    back = TrainingBundle.load(tmp_path / "bundle.pt")
    assert back.meta["backbone_pretrained"] is False  # how the cached features were computed
    assert back.meta["backbone_info"]["input_size"] == prepared.tables["sigmma_tiles"].uns["sigmma"]["backbone"]["input_size"]
    model = SigmmaModel.from_bundle(back, hidden=8, out_dim=8, steps=2)
    assert model.config.backbone == "test_efficientnet"
    assert model.config.backbone_pretrained is False
    model.fit(back, progress=False)
    sg.tl.embed(prepared, model, key_added="from_bundle")  # accepted: the features match the model's
    assert "X_from_bundle_macro_image" in prepared.tables["sigmma_tiles"].obsm
    # an explicit setting still wins
    assert SigmmaModel.from_bundle(back, hidden=8, out_dim=8, backbone_pretrained=True).config.backbone_pretrained


def test_embed_refuses_features_computed_otherwise(prepared):
    """A model trained on 32 px crops must not embed features cached at another crop size."""
    model = sg.tl.train_sigmma(prepared, epochs=1, **TINY)
    sg.tl.featurize(prepared, backbone="test_efficientnet", pretrained=False, input_size=32, overwrite=True)
    with pytest.raises(ValueError, match=r"crop input size: cached 32, model \d+"):
        sg.tl.embed(prepared, model)
    # a fresh section without cached features is featurized the model's way
    del prepared.tables[Keys.TILE_TABLE].uns["sigmma"]["backbone"]
    for s in SCALES:
        del prepared.tables[Keys.TILE_TABLE].obsm[Keys.BACKBONE.format(scale=s)]
    sg.tl.embed(prepared, model)
    assert (
        prepared.tables[Keys.TILE_TABLE].uns["sigmma"]["backbone"]["input_size"]
        == model.config.backbone_info["input_size"]
    )


def test_save_load_resume_after_zarr_round_trip(prepared, tmp_path):
    """Read back from zarr, `.uns` holds numpy arrays; the model config and meta must stay plain JSON types."""
    import json

    import spatialdata as sd

    prepared.write(tmp_path / "section.zarr")
    back = sd.read_zarr(tmp_path / "section.zarr")
    assert isinstance(back.tables[Keys.TILE_TABLE].uns["sigmma"]["backbone"]["mean"], np.ndarray)  # the trap
    model = sg.tl.train_sigmma(back, epochs=1, checkpoint_dir=tmp_path / "ckpt", **TINY)
    json.dumps(model.config.to_dict())
    json.dumps(model.meta)
    model.save(tmp_path / "model.pt")
    loaded = sg.model.SigmmaModel.load(tmp_path / "model.pt")
    assert loaded.config == model.config
    resumed = sg.tl.train_sigmma(back, epochs=2, checkpoint_dir=tmp_path / "ckpt", resume=True, **TINY)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    sg.tl.embed(back, loaded)
    assert np.isfinite(back.tables[Keys.TILE_TABLE].obsm[Keys.embedding()["image"]["macro"]]).all()


def _assert_nothing_embedded(sdata):
    tiles = sdata.tables[Keys.TILE_TABLE]
    assert not any(k.startswith("X_sigmma") for k in tiles.obsm)
    assert not any(k.startswith("X_sigmma") for k in sdata.tables["table"].obsm)
    assert Keys.BACKBONE.format(scale="macro") not in tiles.obsm  # not even featurized


def _new_section(rgb=True, tile_size_um=8.0, n_genes=30):
    new = make_section(n_cells=300, image_px=200, seed=5, rgb=rgb, n_genes=n_genes)
    sg.pp.tile(new, image_key="he", tile_size_um=tile_size_um, pixel_size_um=0.25)
    return new


def test_embed_checks_a_new_section_before_writing(prepared):
    """Another tile size, modality, a refitted PCA or another gene panel: refused before anything is written."""
    model = sg.tl.train_sigmma(prepared, epochs=1, **TINY)
    pca = model.meta["pca"]

    other_size = _new_section(tile_size_um=12.0)
    sg.pp.cell_graph(other_size, pca_from=pca)
    with pytest.raises(ValueError, match=r"trained on 8 µm tiles.*sg.pp.tile\(sdata, tile_size_um=8, pixel_size_um=0.25"):
        sg.tl.embed(other_size, model)
    _assert_nothing_embedded(other_size)

    dapi = _new_section(rgb=False)
    sg.pp.cell_graph(dapi, pca_from=pca)
    with pytest.raises(ValueError, match="trained on an RGB brightfield image.*one-channel morphology stain"):
        sg.tl.embed(dapi, model)
    _assert_nothing_embedded(dapi)

    refit = _new_section()
    sg.pp.cell_graph(refit, n_comps=8)  # the default: a PCA fitted on the new section
    with pytest.raises(ValueError, match=r"not from the model's training PCA.*pca_from=model.meta\['pca'\]"):
        sg.tl.embed(refit, model)
    _assert_nothing_embedded(refit)
    sg.pp.cell_graph(refit, pca_from=pca)
    sg.tl.embed(refit, model)
    assert np.isfinite(refit.tables[Keys.TILE_TABLE].obsm[Keys.embedding()["st"]["macro"]]).all()

    panel = _new_section(n_genes=31)
    sg.pp.cell_graph(panel, n_comps=8)
    with pytest.raises(ValueError, match="genes differ from those the model was trained on"):
        sg.tl.embed(panel, model)
    _assert_nothing_embedded(panel)


def test_train_with_the_papers_candidate_rule(prepared):
    """``candidates='all'`` reaches ``build_bundle``: more candidates than the kNN rule, recorded on the model, and
    ``sg.tl.embed`` builds the evaluation graph with the same rule (its ST embedding is the 'all' bundle's)."""
    from sigmma_sc.data import build_bundle

    with pytest.raises(ValueError, match="'knn' or 'all'"):
        sg.tl.train_sigmma(prepared, epochs=1, candidates="every", **TINY)
    knn = sg.tl.train_sigmma(prepared, epochs=1, **TINY)
    model = sg.tl.train_sigmma(prepared, epochs=1, candidates="all", **TINY)
    assert model.meta["candidates"] == "all"
    assert knn.meta["candidates"] == "knn"
    n_cand = {r: build_bundle(prepared, candidates=r)[0].cand_macro.shape[1] for r in ("all", "knn")}
    assert n_cand["all"] > n_cand["knn"]  # every pair of the tile vs the nearest ones
    sg.tl.embed(prepared, model, key_added="all")
    tiles = prepared.tables[Keys.TILE_TABLE]
    written = tiles.uns["all"]["embed"]["keys"]["st"]["macro"]
    rows = tiles.obs[Keys.N_CELLS].to_numpy() > 0
    def unit(z):
        z = np.asarray(z, dtype=np.float64)[rows]
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    st = {r: unit(model.encode_st(build_bundle(prepared, candidates=r)[0])[0]["macro"]) for r in ("all", "knn")}
    np.testing.assert_allclose(unit(tiles.obsm[written]), st["all"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(st["all"], st["knn"], atol=1e-4)
