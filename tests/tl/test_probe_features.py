"""``sg.tl.fit_probe`` chooses its input on validation tiles: SIGMMA's image embedding, the fine-tuned encoder's pooled
features or the frozen backbone's (issue 25 item 3); ``predict_slide`` computes the chosen ones on a new slide."""

from __future__ import annotations

import numpy as np
import pytest

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {"backbone": "test_vit", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64}


@pytest.fixture(scope="module")
def _tuned(tmp_path_factory):
    progress, sg.settings.progress_bar = sg.settings.progress_bar, False
    root = tmp_path_factory.mktemp("probe_features")
    path = sg.datasets.synthetic_xenium(
        root / "run", n_cells=1200, n_genes=30, seed=0, transcripts=False, morphology=False, labels=False
    )
    sdata = sg.io.xenium(path)
    sg.pp.tile(sdata, image_key="he", tile_size_um=48.0, pixel_size_um=2.0)
    sg.pp.cell_graph(sdata, n_comps=16)
    model = sg.tl.train_sigmma(sdata, epochs=1, input_size=32, finetune_blocks=1, **TINY)
    sg.tl.embed(sdata, model)
    yield sdata, model
    sg.settings.progress_bar = progress


@pytest.fixture
def tuned(_tuned):
    import copy

    import spatialdata as sd

    sdata, model = _tuned
    return sd.deepcopy(sdata), copy.deepcopy(model)


def _informative(tiles, width, rng):
    """Tile features that carry the tile's expression (a random linear map of log counts, little noise)."""
    y = np.log1p(np.asarray(tiles.X.todense() if hasattr(tiles.X, "todense") else tiles.X, dtype=np.float64))
    return (y @ rng.normal(size=(y.shape[1], width)) + 0.01 * rng.normal(size=(y.shape[0], width))).astype(np.float32)


@pytest.mark.parametrize("better", ["backbone", "sigmma"])
def test_auto_chooses_the_better_features_on_validation_tiles(tuned, better, caplog):
    sdata, model = tuned
    tiles = sdata.tables[Keys.TILE_TABLE]
    assert (tiles.obs[Keys.SPLIT] == "val").sum() >= 3
    rng = np.random.default_rng(0)
    for s in SCALES:  # one source carries the expression, the other is noise
        for source, key in (("backbone", Keys.BACKBONE.format(scale=s)), ("sigmma", Keys.embedding()["image"][s])):
            width = tiles.obsm[key].shape[1]
            noise = rng.normal(size=(tiles.n_obs, width)).astype(np.float32)
            tiles.obsm[key] = _informative(tiles, width, rng) if source == better else noise
    with caplog.at_level("INFO", logger="sigmma_sc.tl._slide"):
        probe = sg.tl.fit_probe(sdata, model, n_genes=8, protocol="hest")
    record = tiles.uns[Keys.UNS]["probes"]["expression"]
    assert record["features"] == better
    assert record["chosen_on"] == "validation"
    val = record["validation"]
    assert set(val) == {"sigmma", "encoder", "backbone"}  # a fine-tuned model offers its encoder too
    assert val[better]["gene_pcc"] == max(v["gene_pcc"] for v in val.values())
    assert val[better]["gene_pcc"] > val["backbone" if better == "sigmma" else "sigmma"]["gene_pcc"] + 0.2
    assert f"reads the {better} features" in caplog.text
    keys = [Keys.BACKBONE.format(scale=s) if better == "backbone" else Keys.embedding()["image"][s] for s in SCALES]
    assert probe.embedding_keys == keys
    assert model.probes["expression"].embedding_keys == keys
    assert all(f"X_sigmma_{s}_encoder" in tiles.obsm for s in SCALES)  # computed to be compared


def test_given_features_and_errors(tuned):
    sdata, model = tuned
    probe = sg.tl.fit_probe(sdata, model, n_genes=8, features="sigmma")
    assert probe.embedding_keys == [Keys.embedding()["image"][s] for s in SCALES]
    assert sdata.tables[Keys.TILE_TABLE].uns[Keys.UNS]["probes"]["expression"]["chosen_on"] == "given"
    with pytest.raises(ValueError, match="`features` must be"):
        sg.tl.fit_probe(sdata, model, features="uni")
    frozen = sg.model.SigmmaModel.from_bundle(sg.data.build_bundle(sdata)[0], hidden=16, out_dim=16)
    sg.tl.embed(sdata, frozen)
    with pytest.raises(ValueError, match="needs a fine-tuned model"):
        sg.tl.fit_probe(sdata, frozen, features="encoder")
    sg.tl.fit_probe(sdata, frozen, n_genes=8)  # a frozen model: SIGMMA's embedding or the backbone's features
    assert set(sdata.tables[Keys.TILE_TABLE].uns[Keys.UNS]["probes"]["expression"]["validation"]) == {
        "sigmma",
        "backbone",
    }


@pytest.mark.parametrize("features", ["encoder", "backbone"])
def test_predict_slide_computes_the_probe_features(tuned, features):
    """An image-only slide (the training H&E): the probe's features are computed there and give the same predictions."""
    import spatialdata as sd

    src, model = tuned
    probe = sg.tl.fit_probe(src, model, n_genes=8, features=features)
    image_only = sd.SpatialData(images={"he": src.images["he"]})
    image_only.attrs[Keys.UNS] = {"um_per_unit": dict(src.attrs[Keys.UNS]["um_per_unit"])}
    new = sg.tl.predict_slide(image_only, model, retrieve=0).tables[Keys.TILE_TABLE]
    old = src.tables[Keys.TILE_TABLE]
    assert all(k in new.obsm for k in probe.embedding_keys)
    pos_old = {(r, c): i for i, (r, c) in enumerate(zip(old.obs[Keys.TILE_ROW], old.obs[Keys.TILE_COL], strict=True))}
    pairs = [(i, pos_old[(r, c)]) for i, (r, c) in enumerate(zip(new.obs[Keys.TILE_ROW], new.obs[Keys.TILE_COL],
                                                                  strict=True)) if (r, c) in pos_old]  # fmt: skip
    a, b = np.array(pairs).T
    expected = probe.predict(np.hstack([old.obsm[k] for k in probe.embedding_keys])[b])
    np.testing.assert_allclose(new.obsm[Keys.PREDICTED_EXPRESSION].to_numpy()[a], expected, atol=1e-3)
