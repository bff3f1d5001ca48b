"""sg.metrics statistics: the bootstrap recomputes each metric on resampled tiles; paired comparisons; spatial k-fold."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sigmma_sc as sg
from sigmma_sc.metrics._bootstrap import (
    GenePccMetric,
    MeanMetric,
    RecallMetric,
    point,
    resample_counts,
)
from sigmma_sc.metrics._probe import rowwise_pcc


def _tiles(n: int = 200, n_genes: int = 60, dim: int = 16, seed: int = 0) -> ad.AnnData:
    """Tiles on a grid whose counts and 'emb' share a latent state ('noise' carries none); random 80/10/10 split."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    counts = rng.poisson(np.exp(rng.uniform(1, 4, n_genes) + z @ rng.normal(scale=0.6, size=(4, n_genes))))
    side = int(np.ceil(np.sqrt(n)))
    obs = pd.DataFrame(
        {
            "split": pd.Categorical(rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.15, 0.15])),
            "n_cells": rng.integers(5, 50, n),
            "x0": 100.0 * (np.arange(n) % side),
            "y0": 60.0 * (np.arange(n) // side),
        },
        index=[f"tile_{i}" for i in range(n)],
    )
    tiles = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    tiles.obsm["emb"] = z @ rng.normal(size=(4, dim)) + 0.3 * rng.normal(size=(n, dim))
    tiles.obsm["noise"] = rng.normal(size=(n, dim))
    for s in ("meso", "macro"):  # SIGMMA-like pairs: a good model ('X_sigmma_*') and a bad one ('X_bad_*')
        tiles.obsm[f"X_sigmma_{s}_image"] = tiles.obsm["emb"][:, :8]
        tiles.obsm[f"X_sigmma_{s}_st"] = tiles.obsm["emb"][:, :8] + 0.8 * rng.normal(size=(n, 8))
        tiles.obsm[f"X_bad_{s}_image"] = tiles.obsm["emb"][:, :8]
        tiles.obsm[f"X_bad_{s}_st"] = tiles.obsm["emb"][:, :8] + 4.0 * rng.normal(size=(n, 8))
    tiles.uns["bad"] = {
        "embed": {"keys": {k: {s: f"X_bad_{s}_{k}" for s in ("meso", "macro")} for k in ("image", "st")}}
    }
    return tiles


def _brute_recall(q: np.ndarray, t: np.ndarray, drawn: np.ndarray, p: float) -> float:
    """Recall@p% of the resample ``drawn`` (tile indices, repeats allowed), by the definition, one query at a time."""
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    n = drawn.size
    k = max(1, int(np.floor(p * n)))
    hits = []
    for i in drawn:  # each drawn copy is a query; the gallery is the drawn tiles, the partner counted once
        others = drawn[drawn != i]
        better = int((sim[i, others] > sim[i, i] + 1e-9).sum())
        ties = int((np.abs(sim[i, others] - sim[i, i]) <= 1e-9).sum())
        hits.append(np.clip((k - better) / (ties + 1), 0, 1))
    return float(np.mean(hits))


# ------------------------------------------------------------------------------------------ metrics on resamples
def test_recall_metric_matches_recall_at_and_the_definition_on_resamples():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(30, 5))
    t = q + rng.normal(size=(30, 5))
    t[3] = t[4]  # a tie
    for p in (0.05, 0.1, 0.2):
        m = RecallMetric(q, t, p)
        assert point(m) == pytest.approx(sg.metrics.recall_at(q, t, fractions=(p,))[f"R@{100 * p:g}%"])
        counts = resample_counts(30, 20, seed=1)
        got = m.values(counts)
        for b in range(20):
            drawn = np.repeat(np.arange(30), counts[:, b])
            assert got[b] == pytest.approx(_brute_recall(q, t, drawn, p))
        subset = np.zeros((30, 1))
        subset[:17] = 1  # a resample without repeats is the plain metric on those tiles
        want = sg.metrics.recall_at(q[:17], t[:17], fractions=(p,))[f"R@{100 * p:g}%"]
        assert m.values(subset)[0] == pytest.approx(want)


def test_gene_pcc_and_mean_metrics_equal_the_metric_on_repeated_rows():
    rng = np.random.default_rng(2)
    yt = rng.normal(size=(25, 6))
    yp = yt + rng.normal(size=(25, 6))
    yt[:, 5] = 3.0  # a constant gene: undefined, skipped as in HEST
    g, mean = GenePccMetric(yt, yp), MeanMetric(np.r_[rng.normal(size=24), np.nan])
    assert point(g) == pytest.approx(np.nanmean(rowwise_pcc(yt.T, yp.T)))
    counts = resample_counts(25, 10, seed=3)
    for b, (vg, vm) in enumerate(zip(g.values(counts), mean.values(counts), strict=True)):
        rows = np.repeat(np.arange(25), counts[:, b])
        assert vg == pytest.approx(np.nanmean(rowwise_pcc(yt[rows].T, yp[rows].T)))
        assert vm == pytest.approx(np.nanmean(mean.v[rows]))


def test_paired_bootstrap_identical_zero_and_clear_difference_resolved():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 8))
    good = sg.metrics.tile_metrics(image=img, st=img + 0.3 * rng.normal(size=(40, 8)))
    bad = sg.metrics.tile_metrics(image=img, st=rng.normal(size=(40, 8)))
    same = sg.metrics.paired_bootstrap(good, good, n_boot=300)
    assert (same["diff"] == 0).all()
    assert (same["ci_low"] == 0).all()
    assert (same["ci_high"] == 0).all()
    assert (same["p"] == 1).all()
    diff = sg.metrics.paired_bootstrap(good, bad, n_boot=300).set_index("metric")
    assert (diff["ci_low"] > 0).all()
    assert (diff["p"] < 0.01).all()
    assert (diff["n_tiles"] == 40).all()
    ci = sg.metrics.paired_bootstrap(bad, n_boot=300, seed=5)
    assert ((ci["ci_low"] <= ci["value"]) & (ci["value"] <= ci["ci_high"])).all()
    # chance level K / N lies inside the CI of an embedding without alignment
    r10 = ci.set_index("metric").loc["image->st R@10%"]
    assert r10["ci_low"] <= 0.1 <= r10["ci_high"]
    pd.testing.assert_frame_equal(ci, sg.metrics.paired_bootstrap(bad, n_boot=300, seed=5))
    assert not ci.equals(sg.metrics.paired_bootstrap(bad, n_boot=300, seed=6))
    with pytest.raises(ValueError, match="different numbers of tiles"):
        sg.metrics.paired_bootstrap(good, sg.metrics.tile_metrics(image=img[:30], st=img[:30]))


def test_paired_ci_is_narrower_than_the_unpaired_cis():
    """Shared tile difficulty cancels in the paired difference: that is why comparisons must be paired."""
    rng = np.random.default_rng(1)
    img = rng.normal(size=(60, 8))
    noise = rng.normal(size=(60, 8))
    a = sg.metrics.tile_metrics(image=img, st=img + 1.0 * noise)
    b = sg.metrics.tile_metrics(image=img, st=img + 1.1 * noise + 0.2 * rng.normal(size=(60, 8)))
    pa = sg.metrics.paired_bootstrap(a, n_boot=500).set_index("metric")
    pb = sg.metrics.paired_bootstrap(b, n_boot=500).set_index("metric")
    d = sg.metrics.paired_bootstrap(a, b, n_boot=500).set_index("metric")
    width = lambda df: df["ci_high"] - df["ci_low"]
    assert (width(d) < np.hypot(width(pa), width(pb))).mean() >= 0.5


# ------------------------------------------------------------------------------------------ evaluate and compare
def test_evaluate_reports_cis_around_each_score():
    tiles = _tiles()
    df = sg.metrics.evaluate(tiles, n_genes=20, n_boot=200)
    for col in ("image->st R@10%", "paper_pcc", "paper_gene_pcc", "hest_gene_pcc", "hest_mse_raw"):
        assert (df[f"{col}_ci_low"] <= df[col] + 1e-12).all()
        assert (df[col] <= df[f"{col}_ci_high"] + 1e-12).all()
        assert (df[f"{col}_ci_high"] > df[f"{col}_ci_low"]).all()
    plain = sg.metrics.evaluate(tiles, n_genes=20, n_boot=0)
    assert not any(c.endswith("_ci_low") for c in plain.columns)
    pd.testing.assert_frame_equal(plain, df[plain.columns])  # the scores do not depend on the bootstrap


def test_compare_two_models_and_backbone():
    tiles = _tiles()
    res = sg.metrics.compare(tiles, a="sigmma", b="bad", n_genes=20, n_boot=300).set_index("metric")
    assert res.attrs["a"] == ["X_sigmma_meso_image", "X_sigmma_macro_image"]
    r = res.loc["image->st R@10%"]
    n = int(r["n_tiles"])
    assert n == int(((tiles.obs["split"] == "test") & (tiles.obs["n_cells"] > 0)).sum())
    assert r["diff"] > 0
    assert r["ci_low"] > 0
    assert r["p"] < 0.01
    # same image embeddings: the probes agree exactly, so their differences are 0
    assert res.loc["paper_pcc", "diff"] == 0
    assert res.loc["paper_pcc", "p"] == 1
    # against features without ST partners only the probes are compared
    vs = sg.metrics.compare(tiles, a="emb", b="noise", n_genes=20, n_boot=300).set_index("metric")
    assert not any("R@" in m for m in vs.index)
    assert vs.loc["paper_pcc", "ci_low"] > 0
    assert vs.loc["hest_gene_pcc", "ci_low"] > 0
    with pytest.raises(KeyError, match="neither a `.obsm` key"):
        sg.metrics.compare(tiles, a="nothing", b="emb")


# ------------------------------------------------------------------------------------------ spatial k-fold
def test_spatial_folds_are_contiguous_strips_covering_every_tile():
    tiles = _tiles()
    tiles.obs.loc["tile_3", "n_cells"] = 0
    fold = sg.metrics.spatial_folds(tiles, 4)
    assert fold[3] == -1
    assert set(fold[fold >= 0]) == {0, 1, 2, 3}
    assert np.ptp(np.bincount(fold[fold >= 0])) <= 1
    x = tiles.obs["x0"].to_numpy()  # the longer axis: x spans 1400, y 840
    spans = [(x[fold == f].min(), x[fold == f].max()) for f in range(4)]
    assert all(spans[f][1] <= spans[f + 1][0] for f in range(3))  # strips in order, not interleaved
    with pytest.raises(ValueError, match="folds >= 3"):
        sg.metrics.spatial_folds(tiles, 2)


def test_kfold_probe_scores_every_tile_once_and_never_fits_on_it():
    tiles = _tiles()
    df = sg.metrics.evaluate(tiles, embeddings=["emb", "noise"], n_genes=20, folds=4, n_boot=100)
    assert (df["n_probe_eval"] == tiles.n_obs).all()
    assert (df["n_eval"] < tiles.n_obs).all()
    assert df.loc["emb", "paper_pcc"] > df.loc["noise", "paper_pcc"]
    assert df.loc["emb", "hest_gene_pcc_ci_low"] > df.loc["noise", "hest_gene_pcc_ci_high"]
    # a fold's own counts cannot change its predictions: scramble fold 0's counts, the other folds' fits are
    # unchanged except where fold 0 trains them; fold 0's predictions must not move
    from sigmma_sc.metrics._folds import _fold_table

    fold = sg.metrics.spatial_folds(tiles, 4)
    before = sg.metrics.linear_probe(_fold_table(tiles, ["emb"], fold, 0, 4), "emb", n_genes=20)
    moved = tiles.copy()
    moved.X[fold == 0] = moved.X[fold == 0][::-1] * 3
    after = sg.metrics.linear_probe(_fold_table(moved, ["emb"], fold, 0, 4), "emb", n_genes=20)
    np.testing.assert_allclose(before.y_pred, after.y_pred)
    cmp = sg.metrics.compare(tiles, a="emb", b="noise", n_genes=20, folds=4, n_boot=100)
    assert set(cmp["tiles"]) == {"4-fold"}
    assert (cmp["n_tiles"] == tiles.n_obs).all()


def test_kfold_warns_for_embeddings_of_a_model_trained_here(caplog):
    import logging

    tiles = _tiles()
    with caplog.at_level(logging.WARNING, logger="sigmma_sc.metrics"):
        sg.metrics.evaluate(tiles, n_genes=20, folds=3, n_boot=0, protocols=("paper",))
    assert "not held-out" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sigmma_sc.metrics"):
        sg.metrics.evaluate(tiles, embeddings=["emb"], n_genes=20, folds=3, n_boot=0, protocols=("paper",))
    assert "not held-out" not in caplog.text


def test_bootstrap_intervals_cover_the_true_value_at_about_their_level():
    """Simulated sections with known truth: the 95% intervals cover it in about 95% of them."""
    rng = np.random.default_rng(0)
    hits = {"mean": 0, "gene_pcc": 0}
    reps, n, rho = 200, 40, 0.6
    for r in range(reps):
        v = rng.normal(loc=0.3, size=n)
        z = rng.normal(size=(n, 5))
        y_pred = rho * z + np.sqrt(1 - rho**2) * rng.normal(size=(n, 5))  # each gene correlates rho with its target
        metrics = {"mean": MeanMetric(v), "gene_pcc": GenePccMetric(z, y_pred)}
        ci = sg.metrics.paired_bootstrap(metrics, n_boot=300, seed=r).set_index("metric")
        hits["mean"] += ci.loc["mean", "ci_low"] <= 0.3 <= ci.loc["mean", "ci_high"]
        hits["gene_pcc"] += ci.loc["gene_pcc", "ci_low"] <= rho <= ci.loc["gene_pcc", "ci_high"]
    for name, k in hits.items():
        assert 0.87 <= k / reps <= 0.99, (name, k / reps)
