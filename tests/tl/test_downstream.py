"""Downstream analysis: microenvironment DE (planted chemokine programme), composition, cross-modal retrieval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sigmma_sc as sg
from sigmma_sc._constants import Keys

TINY = {"backbone": "test_vit", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64}


@pytest.fixture(scope="module")
def _synthetic(tmp_path_factory):
    """A small synthetic Xenium section, trained briefly, embedded and clustered at every scale."""
    progress, sg.settings.progress_bar = sg.settings.progress_bar, False
    path = sg.datasets.synthetic_xenium(
        tmp_path_factory.mktemp("xenium") / "run",
        n_cells=1500,
        n_genes=40,
        seed=0,
        transcripts=False,
        morphology=False,
        labels=False,
    )
    sdata = sg.io.xenium(path)
    sg.pp.tile(sdata, image_key="he", tile_size_um=96.0, pixel_size_um=2.0)
    sg.pp.cell_graph(sdata, n_comps=16)
    sg.tl.featurize(sdata, backbone=TINY["backbone"], pretrained=False)
    model = sg.tl.train_sigmma(sdata, epochs=8, **TINY)
    sdata.attrs["_test_model"] = model  # for the image-only tests; not written anywhere
    sg.tl.embed(sdata, model)
    sg.tl.microenvironments(sdata)
    truth = pd.read_parquet(path / "sigmma_truth.parquet").set_index("cell_id")
    cells = sdata.tables["table"]
    ids = cells.obs["cell_id"].astype(str)
    cells.obs["cell_type"] = pd.Categorical(truth.loc[ids, "cell_type"].astype(str).to_numpy())
    cells.obs["chemokine_high"] = pd.Categorical(truth.loc[ids, "chemokine_high"].astype(str).to_numpy())
    yield sdata
    sg.settings.progress_bar = progress


@pytest.fixture
def synthetic(_synthetic):
    return _synthetic  # the tests below only read it


def test_planted_chemokine_programme_tops_its_microenvironment(synthetic):
    cells = synthetic.tables["table"]
    X_before = cells.X.copy()
    frac = sg.tl.microenvironment_composition(synthetic, scale="micro", groupby="chemokine_high")["True"]
    niche = frac.idxmax()
    assert frac[niche] > 0.5, (
        f"no micro microenvironment is dominated by chemokine-high cells: {frac.round(2).to_dict()}"
    )
    de = sg.tl.microenvironment_de(synthetic, scale="micro", n_genes=5)
    top5 = de.loc[de["group"] == niche, "gene"].tolist()
    assert len(top5) == 5
    assert {"CXCL2", "CXCL6"} <= set(top5), top5
    # the same planted programme does not top any other microenvironment
    others = de[(de["group"] != niche) & (de.groupby("group", observed=True).cumcount() < 2)]
    assert not {"CXCL2", "CXCL6"} & set(others["gene"]), others
    # tidy table, the cell table untouched
    assert list(de.columns) == ["group", "gene", "score", "logfoldchange", "pval", "pval_adj", "pct_in", "pct_out"]
    niche_rows = de[de["group"] == niche].set_index("gene")
    assert (niche_rows.loc[["CXCL2", "CXCL6"], "logfoldchange"] > 1).all()
    assert (niche_rows.loc[["CXCL2", "CXCL6"], "pct_in"] > niche_rows.loc[["CXCL2", "CXCL6"], "pct_out"]).all()
    assert (np.diff(niche_rows["score"].to_numpy()) <= 0).all()
    assert (cells.X != X_before).nnz == 0
    assert "log1p" not in cells.uns


def test_de_against_a_reference_microenvironment(synthetic):
    frac = sg.tl.microenvironment_composition(synthetic, scale="micro", groupby="chemokine_high")["True"]
    niche, low = frac.idxmax(), frac.idxmin()
    de = sg.tl.microenvironment_de(synthetic, scale="micro", groups=[niche], reference=low, n_genes=None)
    assert set(de["group"]) == {niche}
    assert len(de) == synthetic.tables["table"].n_vars
    assert de["pct_out"].notna().all()
    assert {"CXCL2", "CXCL6"} <= set(de["gene"].head(10))
    with pytest.raises(ValueError, match="not a group"):
        sg.tl.microenvironment_de(synthetic, reference="no_such_group")


def test_composition_counts_and_fractions(synthetic):
    cells = synthetic.tables["table"]
    frac = sg.tl.microenvironment_composition(synthetic, scale="meso", groupby="cell_type")
    counts = sg.tl.microenvironment_composition(synthetic, scale="meso", groupby="cell_type", normalize=False)
    assert np.allclose(frac.sum(axis=1), 1)
    labelled = cells.obs[Keys.microenvironments()["meso"]].notna()
    assert counts.to_numpy().sum() == labelled.sum()
    assert frac.index.name == "sigmma_microenv_meso"
    assert frac.columns.name == "cell_type"
    assert counts.attrs["n_cells"] == {str(k): int(v) for k, v in counts.sum(axis=1).items()}
    with pytest.raises(KeyError, match="no_such_column"):
        sg.tl.microenvironment_composition(synthetic, groupby="no_such_column")


def test_retrieve_both_directions(synthetic):
    tiles = synthetic.tables[Keys.TILE_TABLE]
    hits = sg.tl.retrieve(synthetic, query="image", scale="macro", k=3)
    assert len(hits) == 3 * tiles.n_obs
    assert list(hits.columns) == ["query", "query_index", "rank", "hit", "hit_index", "score", "is_pair"]
    assert (hits.groupby("query")["score"].apply(lambda s: (np.diff(s.to_numpy()) <= 1e-7).all())).all()
    # scores are the cosine similarities of the stored embeddings
    zi = tiles.obsm[Keys.embedding()["image"]["macro"]]
    zs = tiles.obsm[Keys.embedding()["st"]["macro"]]
    row = hits.iloc[0]
    expected = (
        zi[row.query_index]
        @ zs[row.hit_index]
        / np.linalg.norm(zi[row.query_index])
        / np.linalg.norm(zs[row.hit_index])
    )
    assert row.score == pytest.approx(expected, abs=1e-5)
    best = (zi / np.linalg.norm(zi, axis=1, keepdims=True)) @ (zs / np.linalg.norm(zs, axis=1, keepdims=True)).T
    assert (hits[hits["rank"] == 1]["hit_index"].to_numpy() == best.argmax(1)).all()
    back = sg.tl.retrieve(synthetic, query="st", scale="micro", k=2, query_tiles=["tile_0", tiles.obs_names[3]])
    assert back["query"].unique().tolist() == ["tile_0", tiles.obs_names[3]]
    assert len(back) == 4


def test_retrieve_from_an_image_only_section(synthetic):
    """An H&E-only section (image embeddings only) queries the ST tiles of a reference section."""
    import spatialdata as sd

    shapes_key = Keys.tiling(image_key="he")["shapes"]
    image_only = sd.SpatialData(
        images=dict(synthetic.images),
        shapes={shapes_key: synthetic.shapes[shapes_key]},
        tables={Keys.TILE_TABLE: synthetic.tables[Keys.TILE_TABLE].copy()},
    )
    tiles = image_only.tables[Keys.TILE_TABLE]
    for s in ("micro", "meso", "macro"):
        del tiles.obsm[Keys.embedding()["st"][s]]
    hits = sg.tl.retrieve(image_only, query="image", reference=synthetic, k=4)
    assert "is_pair" not in hits
    assert len(hits) == 4 * tiles.n_obs
    with pytest.raises(KeyError, match="with the cell table"):
        sg.tl.retrieve(synthetic, query="image", reference=image_only)


def test_predict_expression_on_an_image_only_section(synthetic, tmp_path, caplog):
    """Tile, embed and predict an image-only section (the same H&E, no cells) with a probe fitted on the ST section."""
    import spatialdata as sd

    model = synthetic.attrs["_test_model"]
    keys = [Keys.embedding()["image"][s] for s in ("micro", "meso", "macro")]
    probe = sg.metrics.linear_probe(synthetic, keys, n_genes=10)
    image_only = sd.SpatialData(images={"he": synthetic.images["he"]})
    with pytest.raises(KeyError, match="run `sg.pp.tile` first"):
        sg.tl.predict_expression(image_only, probe)
    um = synthetic.attrs[Keys.UNS]["um_per_unit"]["global"]
    sg.pp.tile(image_only, image_key="he", table_key=None, tile_size_um=96.0, pixel_size_um=2.0, um_per_unit=um)
    tiles = image_only.tables[Keys.TILE_TABLE]
    assert tiles.n_vars == 0
    assert (tiles.obs[Keys.N_CELLS] == 0).all()
    with pytest.raises(KeyError, match=r"table_key=None"):
        sg.tl.predict_expression(image_only, probe)
    sg.tl.featurize(image_only, backbone=TINY["backbone"], pretrained=False)
    sg.tl.embed(image_only, model, table_key=None)
    assert sg.tl.predict_expression(image_only, probe, inplace=False).shape == (tiles.n_obs, 10)
    assert Keys.PREDICTED_EXPRESSION not in tiles.obsm  # inplace=False writes nothing
    sg.tl.predict_expression(image_only, probe)
    pred = tiles.obsm[Keys.PREDICTED_EXPRESSION]
    assert list(pred.columns) == probe.genes
    assert (pred.index == tiles.obs_names).all()
    record = tiles.uns[Keys.PREDICTED_EXPRESSION]
    assert record["protocol"] == "paper"
    assert record["target_sum"] == pytest.approx(np.median(np.asarray(st_train_totals(synthetic, probe))))
    assert record["fitted_tile_size_um"] == 96.0

    # every tissue tile is kept, so the ST section's test tiles are among them (same image, same grid) and get
    # exactly the probe's own test predictions
    st = synthetic.tables[Keys.TILE_TABLE]
    pos = {(r, c): i for i, (r, c) in enumerate(zip(tiles.obs["tile_row"], tiles.obs["tile_col"], strict=True))}
    test = st.obs.loc[probe.tiles["test"]]
    rows = [pos[(r, c)] for r, c in zip(test["tile_row"], test["tile_col"], strict=True)]
    np.testing.assert_allclose(pred.to_numpy()[rows], probe.y_pred, rtol=1e-4, atol=1e-4)
    assert tiles.n_obs >= st.n_obs

    import logging

    other = tiles.copy()  # the same tiles, recorded as cut at another size: warned
    other.uns["sigmma"] = {**other.uns["sigmma"], "tile": {**other.uns["sigmma"]["tile"], "tile_size_um": 48.0}}
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        sg.tl.predict_expression(other, probe, inplace=False)
    assert "tile_size_um = 96, this section was tiled with 48" in caplog.text

    image_only.write(tmp_path / "he_only.zarr")
    back = sd.read_zarr(tmp_path / "he_only.zarr").tables[Keys.TILE_TABLE].obsm[Keys.PREDICTED_EXPRESSION]
    np.testing.assert_array_equal(np.asarray(back), pred.to_numpy())

    hest = sg.metrics.linear_probe(synthetic, keys, protocol="hest", n_genes=10)
    out = sg.tl.predict_expression(image_only, hest, inplace=False).to_numpy()[rows]
    np.testing.assert_allclose(out, hest.y_pred + hest.train_mean, rtol=1e-4, atol=1e-4)  # intercept added back
    array_probe = sg.metrics.linear_probe(synthetic, np.asarray(st.obsm[keys[2]]), n_genes=10)
    with pytest.raises(ValueError, match="fitted on an array"):
        sg.tl.predict_expression(image_only, array_probe)
    with pytest.raises(TypeError, match="ProbeResult"):
        sg.tl.predict_expression(image_only, "probe")
    with pytest.raises(ValueError, match="fitted on"):
        probe.predict(np.zeros((2, 3)))


def st_train_totals(sdata, probe):
    st = sdata.tables[Keys.TILE_TABLE]
    return np.asarray(st[probe.tiles["train"]].X.sum(1)).ravel()


def test_errors_before_microenvironments(section):
    with pytest.raises(KeyError, match=r"run `sg.tl.microenvironments\(sdata, scale='micro'\)` first"):
        sg.tl.microenvironment_de(section)
    with pytest.raises(KeyError, match=r"run `sg.tl.microenvironments"):
        sg.tl.microenvironment_composition(section, groupby="region")
    sg.pp.tile(section, image_key="he", tile_size_um=16.0)
    with pytest.raises(KeyError, match=r"run `sg.tl.embed\(sdata, model\)` first"):
        sg.tl.retrieve(section)
    with pytest.raises(ValueError, match="'image' or 'st'"):
        sg.tl.retrieve(section, query="text")


def test_de_small_groups_and_counts_layer(section):
    cells = section.tables["table"]
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b"], cells.n_obs).astype(object)
    labels[0] = "tiny"  # a one-cell group is left out
    labels[1] = None  # an unlabelled cell is ignored
    cells.obs["sigmma_microenv_micro"] = pd.Categorical(labels)
    cells.layers["counts"] = cells.X.copy()
    cells.X = np.log1p(cells.X)  # .X log-transformed: the counts layer is used instead
    de = sg.tl.microenvironment_de(section, layer="counts", n_genes=3)
    assert set(de["group"]) == {"a", "b"}
    assert (de.groupby("group", observed=True).size() == 3).all()
    # any categorical column: the section's two spatial programmes (odd genes high right of the median x)
    x = section.shapes["cell_circles"].geometry.x.loc[cells.obs["cell_id"]].to_numpy()
    cells.obs["side"] = pd.Categorical(np.where(x > np.median(x), "right", "left"))
    de = sg.tl.microenvironment_de(section, key="side", groups=["right"], layer="counts", n_genes=5)
    assert all(int(g.removeprefix("GENE")) % 2 == 1 for g in de["gene"])


@pytest.mark.parametrize(
    "approximate",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # pynndescent's numba compilation: ~1 min on 2 cores
    ids=["exact", "pynndescent"],
)
def test_microenvironments_large_uses_working_knn(approximate, monkeypatch):
    """Both k-NN paths (exact, and pynndescent above the size limit) run and recover planted clusters."""
    from sigmma_sc.tl import _microenvironments

    if approximate:
        monkeypatch.setattr(_microenvironments, "EXACT_KNN_MAX_CELLS", 1000)
    exact = _microenvironments._knn_transformer(5000, 15, 0) == "sklearn"
    assert exact is not approximate
    import anndata as ad
    import pandas as pd
    import spatialdata as sd
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    n = 5000
    labels = rng.integers(0, 4, n)
    Z = rng.normal(size=(4, 16))[labels] + 0.3 * rng.normal(size=(n, 16))
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    table = ad.AnnData(
        obs=pd.DataFrame(index=[str(i) for i in range(n)]), obsm={"X_sigmma_micro": Z.astype(np.float32)}
    )
    sdata = sd.SpatialData(tables={"table": table})
    sg.tl.microenvironments(sdata, scale="micro")
    assert adjusted_rand_score(labels, sdata.tables["table"].obs["sigmma_microenv_micro"]) > 0.9


def test_de_with_many_groups_is_quiet(section):
    """scanpy fills its result frame one column per group and statistic; pandas' fragmentation warning
    (once per group past ~20 groups, seen on the real bone-marrow section) does not reach the user."""
    import warnings

    cells = section.tables["table"]
    n = 30
    assert cells.n_obs >= 3 * n
    cells.obs["sigmma_microenv_micro"] = pd.Categorical([f"g{i % n}" for i in range(cells.n_obs)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        de = sg.tl.microenvironment_de(section, n_genes=2)
    assert de["group"].nunique() == n


def test_microenvironments_key_added_is_the_stem_and_use_rep_a_full_obsm_key():
    """docs/keys.md: labels go to ``.obs[f'{key_added}_{scale}']``; ``use_rep`` may be a full ``.obsm`` key
    (scanpy's meaning); the older ``{scale}`` template writes the same columns with a FutureWarning."""
    import warnings

    import anndata as ad
    import spatialdata as sd

    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 3, n)
    Z = rng.normal(size=(3, 8))[labels] + 0.2 * rng.normal(size=(n, 8))
    obsm = {"X_pca": Z.astype(np.float32), "X_sigmma_micro": Z.astype(np.float32)}
    sdata = sd.SpatialData(tables={"table": ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]), obsm=obsm)})
    cells = sdata.tables["table"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*`key_added`", category=FutureWarning)
        sg.tl.microenvironments(sdata, scale="micro", key_added="stem")
        sg.tl.microenvironments(sdata, scale="micro", use_rep="X_pca", key_added="pca_env")
        sg.tl.microenvironments(sdata, scale="micro")
    assert Keys.microenvironments("stem", ("micro",))["micro"] == "stem_micro"
    assert {"stem_micro", "pca_env_micro", Keys.microenvironments()["micro"]} <= set(cells.obs)
    assert (cells.obs["pca_env_micro"].astype(str) == cells.obs["stem_micro"].astype(str)).all()  # same matrix
    with pytest.warns(FutureWarning, match="key_added='leiden'"):
        sg.tl.microenvironments(sdata, scale="micro", key_added="leiden_{scale}")
    assert (cells.obs["leiden_micro"].astype(str) == cells.obs["stem_micro"].astype(str)).all()
    assert cells.uns["sigmma"]["microenvironments"]["keys"]["micro"] == "leiden_micro"
