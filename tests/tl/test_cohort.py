"""Training on a cohort of sections: shared node features, section splits, held-out evaluation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import SCALES, Keys

TINY = {
    "backbone": "test_efficientnet",
    "pretrained": False,
    "input_size": 32,
    "hidden": 16,
    "out_dim": 16,
    "batch_size": 64,
    "lr": 1e-3,
}


def _section(seed: int, n_genes: int = 30, drop: tuple[int, ...] = ()):
    sdata = make_section(n_cells=300, image_px=128, seed=seed, n_genes=n_genes)
    if drop:
        table = sdata.tables["table"]
        keep = [g for i, g in enumerate(table.var_names) if i not in drop]
        sdata.tables["table"] = table[:, keep].copy()
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=6)
    return sdata


@pytest.fixture(scope="module")
def _cohort():
    # "b" lacks GENE0/GENE1, "c" has 4 genes more: 28 genes are shared
    out = {"a": _section(0), "b": _section(1, drop=(0, 1)), "c": _section(2, n_genes=34)}
    for s in out.values():
        sg.tl.featurize(s, backbone="test_efficientnet", pretrained=False, input_size=32)
    return out


@pytest.fixture
def cohort(_cohort):
    import spatialdata as sd

    out = {}
    for k, s in _cohort.items():
        out[k] = sd.deepcopy(s)
        out[k].attrs["sigmma"] = {"um_per_unit": {"global": 0.5}}
    return out


def test_cohort_spatial_split_shared_pca_and_embed(cohort, caplog):
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        model = sg.tl.train_sigmma(cohort, epochs=2, **TINY)
    assert "are not shared by every section and are dropped" in caplog.text
    assert model.meta["sections"] == ["a", "b", "c"]
    genes = [f"GENE{i}" for i in range(2, 30)]
    assert list(model.meta["pca"]["var_names"]) == genes
    n_tiles = 0
    for name, s in cohort.items():
        tiles, cells = s.tables[Keys.TILE_TABLE], s.tables["table"]
        assert (tiles.obs[Keys.SECTION] == name).all()
        assert set(tiles.obs[Keys.SPLIT]) == {"train", "val", "test"}  # the spatial split of every section
        graph = cells.uns["sigmma"]["cell_graph"]
        assert list(graph["pca"]["var_names"]) == genes  # one PCA, over the shared genes, in every section
        assert cells.obsm[Keys.FEATURES].shape[1] == model.config.n_features
        hist = tiles.uns["sigmma"]["training"]
        assert hist["cohort"]["sections"] == ["a", "b", "c"]
        assert len(hist["history"]["train_loss"]) == 2
        sg.tl.embed(s, model)
        assert np.isfinite(tiles.obsm[Keys.embedding()["st"]["macro"]]).all()
        n_tiles += tiles.n_obs
    # the same PCA applied to section "a" alone reproduces its features: it is the cohort's, not a refit
    a = cohort["a"].tables["table"]
    again = sg.pp.cell_graph(cohort["a"], pca_from=model.meta["pca"], inplace=False)[2]
    assert np.allclose(again, a.obsm[Keys.FEATURES], atol=1e-5)
    refit = sg.pp.cell_graph(cohort["a"], n_comps=model.config.n_features, inplace=False)[2]
    assert not np.allclose(refit, a.obsm[Keys.FEATURES], atol=1e-3)
    # a new section with a larger panel is projected on the shared genes and embedded
    new = _section(7, n_genes=32)
    sg.pp.cell_graph(new, pca_from=model.meta["pca"])
    sg.tl.embed(new, model)
    for s in SCALES:
        assert new.tables["table"].obsm[Keys.embedding()["cell"][s]].shape[1] == 16


def test_cohort_section_split_and_held_out_evaluation(cohort):
    spatial = {k: s.tables[Keys.TILE_TABLE].obs[Keys.SPLIT].astype(str).to_numpy() for k, s in cohort.items()}
    model = sg.tl.train_sigmma(cohort, epochs=2, split="section", val_sections="b", test_sections=["c"], **TINY)
    assert model.meta["cohort"] == {"split": "section", "val_sections": ["b"], "test_sections": ["c"]}
    for k, role in (("a", "train"), ("b", "val"), ("c", "test")):
        obs = cohort[k].tables[Keys.TILE_TABLE].obs
        assert (obs[Keys.SPLIT] == role).all()
        assert np.array_equal(obs[Keys.SPLIT_SPATIAL].astype(str).to_numpy(), spatial[k])
    # the PCA saw only section a's cells: refitting on them reproduces it
    a_only = sg.data._cohort.fit_cohort_pca(
        {"a": cohort["a"]}, {"a": np.full(cohort["a"].tables[Keys.TILE_TABLE].n_obs, "train")},
        list(model.meta["pca"]["var_names"]), n_comps=model.config.n_features,
    )  # fmt: skip
    assert np.allclose(np.abs(a_only["components"]), np.abs(np.asarray(model.meta["pca"]["components"])), atol=1e-4)
    for s in cohort.values():
        sg.tl.embed(s, model)
    scores = sg.metrics.evaluate(cohort, protocols=("paper",), n_genes=10, n_components=8)
    tiles_c = cohort["c"].tables[Keys.TILE_TABLE]
    assert int(scores["n_eval"].iloc[0]) == int((tiles_c.obs[Keys.N_CELLS] > 0).sum())  # only section c is scored
    assert np.isfinite(scores["image->st R@10%"]).all()
    assert np.isfinite(scores["paper_pcc"]).all()
    joined = sg.data.cohort_tile_table(cohort)
    assert list(joined.obs[Keys.SECTION].cat.categories) == ["a", "b", "c"]
    assert joined.n_vars == 28
    # split="spatial" afterwards trains on the spatial split again
    sg.tl.train_sigmma(cohort, epochs=1, **TINY)
    assert np.array_equal(cohort["c"].tables[Keys.TILE_TABLE].obs[Keys.SPLIT].astype(str).to_numpy(), spatial["c"])


def _state(cohort):
    return {
        k: (
            s.tables[Keys.TILE_TABLE].obs[Keys.SPLIT].astype(str).tolist(),
            Keys.SECTION in s.tables[Keys.TILE_TABLE].obs,
            s.tables["table"].obsm[Keys.FEATURES].copy(),
        )
        for k, s in cohort.items()
    }


def _same(a, b):
    return all(a[k][0] == b[k][0] and a[k][1] == b[k][1] and np.array_equal(a[k][2], b[k][2]) for k in a)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"split": "section", "test_sections": ["z"]}, ValueError, "Unknown sections"),
        ({"split": "section"}, ValueError, "needs the held-out sections"),
        ({"split": "section", "test_sections": ["a", "b", "c"]}, ValueError, "Every section is held out"),
        ({"test_sections": ["c"]}, ValueError, "split='section'"),
        ({"split": "sections"}, ValueError, "'spatial' or 'section'"),
        ({"features": "X_missing"}, KeyError, "has no `.obsm"),
    ],
)
def test_cohort_bad_inputs_leave_sections_unchanged(cohort, kwargs, error, match):
    before = _state(cohort)
    with pytest.raises(error, match=match):
        sg.tl.train_sigmma(cohort, epochs=1, **kwargs, **TINY)
    assert _same(before, _state(cohort))


def test_cohort_too_few_shared_genes_and_missing_graph(cohort):
    small = make_section(n_cells=200, image_px=160, seed=3, n_genes=12)
    small.tables["table"].var_names = [f"OTHER{i}" for i in range(8)] + [f"GENE{i}" for i in range(2, 6)]
    sg.pp.tile(small, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(small, n_comps=4)
    before = _state(cohort)
    with pytest.raises(ValueError, match="share only 4 genes"):
        sg.tl.train_sigmma([*cohort.values(), small], epochs=1, **TINY)
    assert _same(before, _state(cohort))
    bare = make_section(n_cells=100, image_px=160, seed=4)
    sg.pp.tile(bare, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    with pytest.raises(KeyError, match="Section 'section_1'.*run `sg.pp.cell_graph` first"):
        sg.tl.train_sigmma([cohort["a"], bare], epochs=1, **TINY)
    with pytest.raises(ValueError, match="apply to a cohort"):
        sg.tl.train_sigmma(cohort["a"], split="section", **TINY)


def test_cohort_bundles_sharded_over_ranks_and_resumed(cohort, tmp_path, caplog):
    from sigmma_sc.model import TrainingBundle
    from sigmma_sc.tl._cohort import save_cohort_bundles

    kw = {"backbone": "test_efficientnet", "pretrained": False, "input_size": 32}
    paths = save_cohort_bundles(cohort, tmp_path, shard=(1, 2), **kw)  # rank 1 of 2: only section "b"
    assert [p.exists() for p in paths] == [False, True, False]
    save_cohort_bundles(cohort, tmp_path, shard=(0, 2), **kw)  # rank 0: "a" and "c"
    assert all(p.exists() for p in paths)
    with caplog.at_level(logging.INFO, logger="sigmma_sc"):
        save_cohort_bundles(cohort, tmp_path, **kw)  # a restarted run: nothing left to do
    assert caplog.text.count("exists; skipped") == 3
    joined = TrainingBundle.load(paths)  # the ranks' bundles share one node-feature space
    assert joined.meta["sections"] == ["a", "b", "c"]
    assert joined.meta["pca"] is not None
