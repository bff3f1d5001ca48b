"""sg.metrics: retrieval and linear probes against hand-computed cases; the probe never fits on test tiles."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

import sigmma_sc as sg
from sigmma_sc.metrics._probe import rowwise_pcc


def _tile_table(n: int = 300, n_genes: int = 80, dim: int = 24, seed: int = 0, noise: float = 0.3) -> ad.AnnData:
    """Tiles whose counts and embeddings share a 4-d latent state; random 80/10/10 split."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    w = rng.normal(scale=0.6, size=(4, n_genes))
    base = rng.uniform(1, 5, size=n_genes)
    counts = rng.poisson(np.exp(base + z @ w)).astype(np.float32)
    split = rng.choice(["train", "val", "test"], size=n, p=[0.8, 0.1, 0.1])
    obs = pd.DataFrame(
        {"split": pd.Categorical(split, categories=["train", "val", "test"]), "n_cells": rng.integers(5, 50, n)},
        index=[f"tile_{i}" for i in range(n)],
    )
    tiles = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    tiles.obsm["emb"] = z @ rng.normal(size=(4, dim)) + noise * rng.normal(size=(n, dim))
    tiles.obsm["noise"] = rng.normal(size=(n, dim))
    for s in ("micro", "meso", "macro"):
        tiles.obsm[f"sigmma_backbone_{s}"] = tiles.obsm["emb"] + rng.normal(size=(n, dim))
    return tiles


# ------------------------------------------------------------------------------------------ recall
def test_recall_perfect_alignment():
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert sg.metrics.recall_at(x, 3 * x) == {"R@5%": 1.0, "R@10%": 1.0, "R@15%": 1.0}


def test_recall_random_is_chance():
    rng = np.random.default_rng(1)
    n, reps = 200, 60
    out = [sg.metrics.recall_at(rng.normal(size=(n, 16)), rng.normal(size=(n, 16))) for _ in range(reps)]
    for label, p in (("R@5%", 0.05), ("R@10%", 0.10), ("R@15%", 0.15)):
        mean = np.mean([o[label] for o in out])
        # standard error of the mean of reps * n Bernoulli(p) draws
        assert abs(mean - p) < 4 * np.sqrt(p * (1 - p) / (n * reps)), (label, mean)


def test_recall_hand_computed():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    t = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # targets 0 and 1 coincide
    # query 0: partner cos 0, targets 2 and 3 better (0.71), target 1 tied -> 2 better, 1 tie
    # query 1: partner cos 1, tied with target 1 -> 0 better, 1 tie; queries 2 and 3: partner strictly best
    # N = 4, K = floor(p * N) (at least 1); a tie shares the remaining slots: clip((K - better) / (ties + 1), 0, 1)
    out = sg.metrics.recall_at(q, t, fractions=(0.05, 0.25, 0.5, 0.75))
    assert out == pytest.approx({"R@5%": 2.5 / 4, "R@25%": 2.5 / 4, "R@50%": 3 / 4, "R@75%": 3.5 / 4})
    # queries swapped with targets: ST -> image is a different problem
    assert sg.metrics.recall_at(t, q, fractions=(0.25,))["R@25%"] == pytest.approx(3 / 4)


def test_recall_ties_score_chance():
    q = np.ones((20, 3))
    out = sg.metrics.recall_at(q, q, fractions=(0.05, 0.5))
    assert out == {"R@5%": pytest.approx(1 / 20), "R@50%": pytest.approx(10 / 20)}


@pytest.mark.parametrize(
    ("q", "t", "kw", "match"),
    [
        (np.zeros((5, 2)), np.zeros((4, 2)), {}, "same shape"),
        (np.zeros((1, 2)), np.zeros((1, 2)), {}, "at least 2"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"fractions": (0.0,)}, "fractions"),
        (np.full((5, 2), np.nan), np.zeros((5, 2)), {}, "finite"),
    ],
)
def test_recall_bad_input(q, t, kw, match):
    with pytest.raises(ValueError, match=match):
        sg.metrics.recall_at(q, t, **kw)


def test_cross_modal_retrieval_per_scale_and_all():
    tiles = _tile_table(n=120)
    rng = np.random.default_rng(0)
    for s in ("micro", "meso", "macro"):
        z = rng.normal(size=(tiles.n_obs, 8))
        tiles.obsm[f"X_sigmma_{s}_image"] = z
        tiles.obsm[f"X_sigmma_{s}_st"] = z + (0.01 if s == "macro" else 10.0) * rng.normal(size=z.shape)
    df = sg.metrics.cross_modal_retrieval(tiles)
    assert list(df["scale"].unique()) == ["micro", "meso", "macro", "all"]
    assert set(df["direction"]) == {"image->st", "st->image"}
    n_test = int((tiles.obs["split"] == "test").sum())
    assert (df["n"] == n_test).all()
    macro = df[df["scale"] == "macro"]
    assert (macro[["R@5%", "R@10%", "R@15%"]].to_numpy() == 1).all()
    # test tiles only: the same numbers as recall_at on the test rows
    test = (tiles.obs["split"] == "test").to_numpy()
    expected = sg.metrics.recall_at(tiles.obsm["X_sigmma_micro_image"][test], tiles.obsm["X_sigmma_micro_st"][test])
    got = df[(df["scale"] == "micro") & (df["direction"] == "image->st")].iloc[0]
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    with pytest.raises(KeyError, match="sg.tl.embed"):
        sg.metrics.cross_modal_retrieval(_tile_table(n=50))


# ------------------------------------------------------------------------------------------ probes
def test_rowwise_pcc_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 50)), rng.normal(size=(6, 50))
    expected = [pearsonr(a[i], b[i])[0] for i in range(6)]
    assert rowwise_pcc(a, b) == pytest.approx(expected)
    assert np.isnan(rowwise_pcc(np.ones((1, 5)), b[:1, :5]))[0]


@pytest.mark.parametrize("protocol", ["paper", "hest"])
def test_probe_scores_match_definitions(protocol):
    tiles = _tile_table()
    res = sg.metrics.linear_probe(tiles, "emb", protocol=protocol, n_genes=20)
    test = (tiles.obs["split"] == "test").to_numpy()
    assert res.y_true.shape == (test.sum(), 20)
    assert len(res.genes) == 20
    assert res.tiles["test"] == list(tiles.obs_names[test])
    pred = res.y_pred + (res.train_mean if protocol == "hest" else 0)
    # eq. 1-2 per test tile across genes; gene-wise PCC across tiles (scipy)
    for i in range(3):
        assert res.tile_pcc[i] == pytest.approx(pearsonr(res.y_true[i], pred[i])[0])
        assert res.tile_mse[i] == pytest.approx(np.mean((res.y_true[i] - pred[i]) ** 2))
    for g in range(3):
        assert res.gene_pcc[g] == pytest.approx(pearsonr(res.y_true[:, g], res.y_pred[:, g])[0])
    s = res.summary()
    assert s["pcc"] == pytest.approx(res.tile_pcc.mean())
    assert s["pcc_std"] == pytest.approx(res.tile_pcc.std())
    assert s["mse"] == pytest.approx(res.tile_mse.mean())
    assert s["n_eval"] == test.sum()
    # the embedding carries the latent state: far better than noise features
    noise = sg.metrics.linear_probe(tiles, "noise", protocol=protocol, n_genes=20).summary()
    assert s["gene_pcc"] > 0.6 > noise["gene_pcc"] + 0.3


def test_paper_targets_and_alpha_on_validation():
    tiles = _tile_table()
    res = sg.metrics.linear_probe(tiles, "emb", protocol="paper", n_genes=20, n_components=8)
    train = (tiles.obs["split"] == "train").to_numpy()
    counts = np.asarray(tiles.X, dtype=np.float64)
    totals = counts.sum(1)
    y = np.log1p(counts / totals[:, None] * np.median(totals[train]))
    test = (tiles.obs["split"] == "test").to_numpy()
    assert res.y_true == pytest.approx(y[test][:, [tiles.var_names.get_loc(g) for g in res.genes]])
    assert res.alpha == min(res.val_mse, key=res.val_mse.get)
    assert len(res.val_mse) == 17
    # refit by hand: PCA on train, ridge with intercept on train with the chosen alpha
    x = tiles.obsm["emb"]
    pca = PCA(8, random_state=0).fit(x[train])
    genes = [tiles.var_names.get_loc(g) for g in res.genes]
    reg = Ridge(alpha=res.alpha).fit(pca.transform(x[train]), y[train][:, genes])
    assert res.y_pred == pytest.approx(reg.predict(pca.transform(x[test])), rel=1e-6, abs=1e-8)


def test_hest_protocol_exact_and_intercept_effect():
    tiles = _tile_table()
    res = sg.metrics.linear_probe(tiles, "emb", protocol="hest", n_genes=20)
    train = (tiles.obs["split"] == "train").to_numpy()
    test = (tiles.obs["split"] == "test").to_numpy()
    x = tiles.obsm["emb"]
    n_comp = min(256, int(train.sum()), x.shape[1])
    assert res.n_components == n_comp
    assert res.alpha == pytest.approx(100 / (n_comp * 20))
    assert res.notes
    assert "capped" in res.notes[0]
    # HEST, verbatim: StandardScaler -> PCA -> Ridge(lsqr, no intercept) on log1p counts
    scaler = StandardScaler().fit(x[train])
    pca = PCA(n_comp, random_state=0).fit(scaler.transform(x[train]))
    genes = [tiles.var_names.get_loc(g) for g in res.genes]
    y = np.log1p(np.asarray(tiles.X, dtype=np.float64))[:, genes]
    reg = Ridge(solver="lsqr", alpha=res.alpha, fit_intercept=False, random_state=0, max_iter=1000)
    reg.fit(pca.transform(scaler.transform(x[train])), y[train])
    hest_pred = reg.predict(pca.transform(scaler.transform(x[test])))
    assert res.y_pred == pytest.approx(hest_pred, rel=1e-6, abs=1e-8)
    # genes: >= 10% of training tiles, scanpy HVGs in panel order
    assert genes == sorted(genes)
    # the missing intercept = ridge with intercept minus the training mean (PCA scores are centred)
    # (exact with a direct solver; HEST's iterative lsqr stops at tol=1e-4, so close but not equal)
    x_tr, x_te = pca.transform(scaler.transform(x[train])), pca.transform(scaler.transform(x[test]))
    no_int = Ridge(alpha=res.alpha, solver="svd", fit_intercept=False).fit(x_tr, y[train]).predict(x_te)
    with_int = Ridge(alpha=res.alpha, solver="svd").fit(x_tr, y[train]).predict(x_te)
    assert no_int + res.train_mean == pytest.approx(with_int, rel=1e-9, abs=1e-9)
    assert np.abs(res.y_pred + res.train_mean - with_int).max() < 0.05
    s = res.summary()
    # gene-wise PCC is shift-invariant; raw MSE carries the squared training means
    assert s["mse_raw"] == pytest.approx(np.mean((y[test] - hest_pred) ** 2))
    assert s["mse_raw"] > s["mse"] + 0.5 * np.mean(res.train_mean**2)


@pytest.mark.parametrize("protocol", ["paper", "hest"])
def test_probe_never_fits_on_test_tiles(protocol):
    tiles = _tile_table()
    ref = sg.metrics.linear_probe(tiles, "emb", protocol=protocol, n_genes=20)
    test = (tiles.obs["split"] == "test").to_numpy()
    rng = np.random.default_rng(7)
    bad = tiles.copy()
    bad.obsm["emb"] = bad.obsm["emb"].copy()
    bad.obsm["emb"][test] = 1e3 * rng.normal(size=(test.sum(), bad.obsm["emb"].shape[1]))
    x = np.asarray(bad.X).copy()
    x[test] = rng.poisson(1e4, size=(test.sum(), x.shape[1]))
    bad.X = x
    got = sg.metrics.linear_probe(bad, "emb", protocol=protocol, n_genes=20)
    assert got.genes == ref.genes
    assert got.alpha == ref.alpha
    assert got.val_mse == ref.val_mse
    np.testing.assert_array_equal(got.coef, ref.coef)
    np.testing.assert_array_equal(got.intercept, ref.intercept)
    np.testing.assert_array_equal(got.train_mean, ref.train_mean)
    assert not np.allclose(got.y_pred, ref.y_pred)  # the test tiles did change


def test_hest_ignores_validation_tiles_too():
    tiles = _tile_table()
    ref = sg.metrics.linear_probe(tiles, "emb", protocol="hest", n_genes=20)
    val = (tiles.obs["split"] == "val").to_numpy()
    bad = tiles.copy()
    bad.obsm["emb"] = bad.obsm["emb"].copy()
    bad.obsm["emb"][val] = 0.0
    np.testing.assert_array_equal(sg.metrics.linear_probe(bad, "emb", protocol="hest", n_genes=20).coef, ref.coef)


def test_probe_inputs_and_errors():
    tiles = _tile_table()
    concat = sg.metrics.linear_probe(tiles, ["sigmma_backbone_micro", "sigmma_backbone_macro"], n_genes=10)
    assert concat.embedding == "sigmma_backbone_micro+sigmma_backbone_macro"
    arr = sg.metrics.linear_probe(tiles, tiles.obsm["emb"], n_genes=10)
    assert arr.summary()["gene_pcc"] == pytest.approx(
        sg.metrics.linear_probe(tiles, "emb", n_genes=10).summary()["gene_pcc"]
    )
    with pytest.raises(KeyError, match="sg.tl"):
        sg.metrics.linear_probe(tiles, "X_sigmma_macro_image")
    with pytest.raises(ValueError, match="protocol"):
        sg.metrics.linear_probe(tiles, "emb", protocol="bleep")
    bad = tiles.copy()
    bad.obsm["emb"] = bad.obsm["emb"].copy()
    bad.obsm["emb"][0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sg.metrics.linear_probe(bad, "emb")
    with pytest.raises(KeyError, match="split"):
        sg.metrics.linear_probe(ad.AnnData(np.ones((4, 2))), np.ones((4, 2)))


def test_mean_baseline_and_evaluate():
    tiles = _tile_table()
    base = sg.metrics.mean_baseline(tiles, n_genes=20)
    probe = sg.metrics.linear_probe(tiles, "emb", n_genes=20).summary()
    assert probe["mse"] < base["mse"]
    rng = np.random.default_rng(0)
    for s in ("meso", "macro"):
        tiles.obsm[f"X_sigmma_{s}_image"] = tiles.obsm["emb"][:, :8]
        tiles.obsm[f"X_sigmma_{s}_st"] = tiles.obsm["emb"][:, :8] + 0.01 * rng.normal(size=(tiles.n_obs, 8))
    df = sg.metrics.evaluate(tiles, n_genes=20)
    assert list(df.index) == ["meso", "macro", "all"]
    assert (df["image->st R@5%"] == 1).all()
    assert (df["st->image R@15%"] == 1).all()
    assert {"paper_pcc", "paper_mse_std", "hest_gene_pcc", "hest_mse_raw"} <= set(df.columns)
    df2 = sg.metrics.evaluate(tiles, embeddings={"bb": "sigmma_backbone_macro"}, protocols=("hest",), n_genes=20)
    assert df2["image->st R@5%"].isna().all()
    assert "paper_pcc" not in df2
    assert df2.loc["bb", "hest_gene_pcc"] == pytest.approx(
        sg.metrics.linear_probe(tiles, "sigmma_backbone_macro", protocol="hest", n_genes=20).summary()["gene_pcc"]
    )


def test_ridge_path_matches_sklearn():
    from sigmma_sc.metrics._probe import _ridge_path_mse

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 12)), rng.normal(size=(40, 3))
    xv, yv = rng.normal(size=(9, 12)), rng.normal(size=(9, 3))
    path = _ridge_path_mse(x, y, xv, yv, (0.01, 1.0, 100.0))
    for a, mse in path.items():
        assert mse == pytest.approx(np.mean((Ridge(alpha=a).fit(x, y).predict(xv) - yv) ** 2))


def test_evaluate_errors_on_too_few_tiles_name_the_fix():
    """Two training tiles and one test tile: the errors say how to get more tiles (smaller tiles)."""
    tiles = _tile_table(n=3)
    tiles.obs["split"] = pd.Categorical(["train", "train", "test"], categories=["train", "val", "test"])
    tiles.uns["sigmma"] = {"tile": {"tile_size_um": 128.0}}
    with pytest.raises(ValueError, match=r"at least 2 'test' tiles.*3 tiles of 128 µm \(train/val/test 2/0/1\).*"
                       r"smaller `tile_size_um`"):  # fmt: skip
        sg.metrics.evaluate(tiles, embeddings=["emb"])
    with pytest.raises(ValueError, match=r"no 'val' tiles.*smaller `tile_size_um`"):
        sg.metrics.linear_probe(tiles, "emb", protocol="paper")
