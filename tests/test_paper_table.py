"""benchmarks/paper_table.py runs end to end on a tiny synthetic section and writes every row."""

from __future__ import annotations

import json

from _benchmarks import load_benchmark


def _load():
    return load_benchmark("paper_table")


def test_paper_table_end_to_end(tmp_path):
    pt = _load()
    out = tmp_path / "table.md"
    argv = [
        "--dataset", "synthetic", "--synthetic-source", "section", "--n-cells", "600", "--quick",
        "--tile-size-um", "24", "--backbone", "test_efficientnet", "--no-pretrained", "--seeds", "0", "1",
        "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    assert pt.main(argv) == out
    text = out.read_text()
    for row in pt.ROWS:  # Table 5 layout and details, and the training table for trained rows
        assert text.count(f"| {row['label']} |") == (3 if "config" in row else 2), row["label"]
    for needle in ("Command: `python benchmarks/paper_table.py", "Machine:", "Runtime:", "HEST PCC", "R@15%"):
        assert needle in text
    # the paired CIs of the differences the ablation concludes from, and the budget's validation curve
    assert "## Paired differences (95 % CI)" in text
    assert "| `sigmma` − `bleep_multiscale` | I→ST R@10% |" in text
    assert "| `sigmma` − `rewired_tile` | HEST gene PCC |" in text
    assert "## Validation retrieval against the step" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    assert len(raw["results"]["sigmma"]) == 2
    assert len(raw["results"]["backbone_macro"]) == 1
    full = raw["results"]["sigmma"][0]
    assert set(full) == {"model", "macro", "config", "curve"}
    assert all(0 <= r <= 1 for _, r in full["curve"])
    assert full["model"]["steps"] >= 1
    assert full["model"]["best_step"] <= full["model"]["steps"]
    assert full["config"]["steps"] == 6
    assert full["config"]["schedule"] == "cosine"
    assert 0 <= full["model"]["image->st R@10%"] <= 1
    # the featurized section is cached: a second run reuses it
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    assert (cached[0] / "bundle.pt").exists()
    assert pt.main([*argv, "--rows", "backbone_macro", "--out", str(tmp_path / "again.md")]).exists()
    # the markdown can be re-rendered from the run's JSON
    out.unlink()
    assert pt.main(["--dataset", "synthetic", "--from-json", str(out.with_suffix(".json"))]) == out
    assert out.read_text() == text


def test_rows_run_the_papers_rows():
    """Each trained row's config is valid and runs the paper's row (Table 5)."""
    from sigmma_sc.model import SigmmaConfig

    pt = _load()
    rows = {r["name"]: SigmmaConfig(n_features=4, image_dim=4, **r["config"]) for r in pt.ROWS if "config" in r}
    assert (rows["bleep"].use_graph, rows["bleep"].scales) == (False, ("macro",))
    single = rows["graph"]  # one GNN over the tile's plain kNN graph, macro only
    assert (single.graph, single.scales, single.edge_addition, single.use_graph) == ("tile", ("macro",), False, True)
    multi = rows["graph_multiscale"]  # the hierarchy with fixed edges
    assert (multi.graph, multi.scales, multi.edge_addition) == ("hierarchical", pt.SCALES, False)
    full = rows["sigmma"]
    assert (full.graph, full.scales, full.edge_addition, full.use_graph) == ("hierarchical", pt.SCALES, True, True)
    # the controls change only the edges of the row they control
    assert rows["no_edges"].to_dict() == {**multi.to_dict(), "edges": "none"}
    assert rows["rewired"].to_dict() == {**full.to_dict(), "edges": "rewired"}


def test_paired_helpers_pool_seeds_and_folds(tmp_path):
    """``_bench``: a row compared with itself differs by exactly 0; a row that retrieves every partner beats one that
    retrieves none with a CI above 0; seeds are averaged on each resample and folds pooled by their tiles."""
    import numpy as np

    bench = load_benchmark("_bench")
    rng = np.random.default_rng(0)
    n, d = 40, 8
    img = rng.normal(size=(n, d))
    good = {"image": img, "st": img + 0.01 * rng.normal(size=(n, d))}  # every partner found
    bad = {"image": img, "st": rng.normal(size=(n, d))}  # partners at random
    store = {"good": [[good], [good]], "bad": [[bad], [bad]], "good2": [[good], [good]]}
    rows = {(r["a"], r["b"], r["metric"]): r for r in bench.paired_rows(store, [("good", "bad"), ("good", "good2")])}
    same = rows["good", "good2", "image->st R@10%"]
    assert (same["diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    better = rows["good", "bad", "image->st R@10%"]
    assert better["value_a"] == 1.0
    assert better["ci_low"] > 0.5
    assert bench.verdict(better) == "a higher"
    assert bench.verdict({"ci_low": -0.02, "ci_high": 0.01}, 0.03) == "equal within ±0.03"
    assert bench.verdict({"ci_low": -0.05, "ci_high": 0.01}, 0.03) == "undetermined"
    # seeds: the pooled point estimate is the mean of the seeds' metrics
    pooled = bench.pooled_metrics([[good], [bad]], ["image->st R@10%"])["image->st R@10%"]
    ones = np.ones((n, 1))
    assert np.isclose(pooled.values(ones)[0], (1.0 + bench.metrics_of(bad)["image->st R@10%"].values(ones)[0]) / 2)
    # folds: retrieval within each fold, pooled by tiles; two folds of the good row still retrieve every partner
    half = {k: v[: n // 2] for k, v in good.items()}, {k: v[n // 2 :] for k, v in good.items()}
    folded = bench.pooled_metrics([list(half)], ["image->st R@10%"])["image->st R@10%"]
    assert folded.n == n
    assert folded.values(ones)[0] == 1.0
    # the arrays survive the round trip through the .npz (float32)
    bench.save_arrays(tmp_path / "a.npz", store)
    back = bench.load_arrays(tmp_path / "a.npz")
    assert set(back) == set(store)
    assert len(back["good"]) == 2
    np.testing.assert_allclose(back["bad"][1][0]["st"], bad["st"], rtol=1e-6)


def test_kfold_splits_test_every_tile_once():
    """``--folds K``: fold f is the test split and fold f + 1 the validation split, so every tile with cells is tested
    exactly once and never trains the model that scores it; tiles without cells are unused; numbers pool by tiles."""
    from types import SimpleNamespace

    import anndata as ad
    import numpy as np
    import pandas as pd
    import torch

    pt = _load()
    n = 40
    xy = np.stack(np.meshgrid(np.arange(8), np.arange(5)), -1).reshape(-1, 2) * 64.0
    obs = pd.DataFrame({"x0": xy[:, 0], "y0": xy[:, 1], "n_cells": np.r_[np.zeros(2), np.full(n - 2, 10)]})
    obs["split"] = pd.Categorical(["train"] * n)
    tiles = ad.AnnData(obs=obs.set_index(pd.Index([str(i) for i in range(n)])))
    sdata = SimpleNamespace(tables={"sigmma_tiles": tiles})
    bundle = SimpleNamespace(n_tiles=n, split=torch.zeros(n, dtype=torch.int8))
    args = pt.parse_args(["--dataset", "synthetic", "--folds", "4"])
    splits = pt._fold_splits(sdata, bundle, args)
    assert len(splits) == 4
    tested = np.zeros(n, dtype=int)
    for names, codes in splits:
        assert (codes.numpy() == np.array([{"train": 0, "val": 1, "test": 2, "buffer": 3}[x] for x in names])).all()
        tested += names == "test"
        assert (names[:2] == "buffer").all()
        assert {int((names == "val").sum()), int((names == "test").sum())} <= {9, 10}  # 38 tiles in 4 strips
    assert (tested[2:] == 1).all()
    assert (tested[:2] == 0).all()
    pt._set_split(sdata, bundle, *splits[1])
    assert tiles.obs["split"].astype(str).tolist() == list(splits[1][0])
    assert torch.equal(bundle.split, splits[1][1])
    # pooling of one seed's folds: each number weighted by the fold's evaluation tiles
    runs = [{"model": {"x": 1.0, "n_eval": 10.0}}, {"model": {"x": 0.0, "n_eval": 30.0}}]
    pooled = pt._pool_folds(runs)
    assert pooled["model"]["x"] == 0.25
    assert pooled["model"]["n_eval"] == 40.0
    assert pooled["n_folds"] == 2
