"""sg.metrics.graph_reliance on a trained model: perturbed ST embeddings against the unperturbed, with paired CIs."""

from __future__ import annotations

import numpy as np
import pytest
from _section import make_section

import sigmma_sc as sg
from sigmma_sc._constants import Keys

TINY = {"backbone": "test_efficientnet", "pretrained": False, "hidden": 16, "out_dim": 16, "batch_size": 64, "lr": 1e-3}


@pytest.fixture(scope="module")
def trained():
    sdata = make_section(n_cells=700, image_px=200)
    sg.pp.tile(sdata, image_key="he", tile_size_um=8.0, pixel_size_um=0.25)
    sg.pp.cell_graph(sdata, n_comps=8)
    sg.tl.featurize(sdata, backbone="test_efficientnet", pretrained=False)
    gnn = sg.tl.train_sigmma(sdata, epochs=1, **TINY)
    mlp = sg.tl.train_sigmma(sdata, epochs=1, use_graph=False, **TINY)
    sg.tl.embed(sdata, gnn)
    sg.tl.embed(sdata, mlp, key_added="mlp")
    return sdata, gnn, mlp


def test_graph_reliance_of_a_gnn_and_of_the_no_graph_control(trained):
    sdata, gnn, mlp = trained
    tiles = sdata.tables[Keys.TILE_TABLE]
    n_test = int(((tiles.obs["split"] == "test") & (tiles.obs["n_cells"] > 0)).sum())
    res = sg.metrics.graph_reliance(sdata, gnn, n_boot=200)
    assert set(res["perturbation"]) == {"permute_features", "no_edges", "rewire"}
    assert set(res["scale"]) == {"micro", "meso", "macro", "all"}
    assert (res["n_tiles"] == n_test).all()
    cos = res[res["metric"] == "cosine to unperturbed"].set_index(["perturbation", "scale"])
    np.testing.assert_allclose(cos["unperturbed"], 1.0, atol=1e-6)
    assert cos.loc[("no_edges", "macro"), "perturbed"] < 0.999  # the GNN uses its edges
    assert cos.loc[("no_edges", "macro"), "changed"] == 1.0
    rec = res[res["metric"] == "image->st R@10%"].set_index(["perturbation", "scale"])
    assert ((rec["ci_low"] <= rec["diff"] + 1e-12) & (rec["diff"] <= rec["ci_high"] + 1e-12)).all()
    # the control: a model that reads only the tile's composition does not change at all
    ctrl = sg.metrics.graph_reliance(
        sdata, mlp, use_rep="mlp", n_boot=50, perturbations=["permute_features", "rewire", "no_edges"]
    )
    np.testing.assert_allclose(ctrl["diff"], 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="subset of"):
        sg.metrics.graph_reliance(sdata, gnn, perturbations=["shuffle"])
    with pytest.raises(ValueError, match="not written by this model"):  # the embeddings of another model
        sg.metrics.graph_reliance(sdata, gnn, use_rep="mlp")
    with pytest.raises(KeyError, match="run `sg.tl.embed"):
        sg.metrics.graph_reliance(sdata, gnn, use_rep="nothing")


def test_graph_reliance_unperturbed_equals_embed(trained):
    """The unperturbed reference is the model's own embedding of the test tiles (the pairing is exact)."""
    sdata, gnn, _ = trained
    tiles = sdata.tables[Keys.TILE_TABLE]
    direct = sg.metrics.cross_modal_retrieval(sdata, scales=["macro"], include_all=False).set_index("direction")
    res = sg.metrics.graph_reliance(sdata, gnn, perturbations=["no_edges"], n_boot=20, fractions=(0.05, 0.1, 0.15))
    mine = res[(res["scale"] == "macro")].set_index("metric")
    for direction in ("image->st", "st->image"):
        for label in ("R@5%", "R@10%", "R@15%"):
            assert mine.loc[f"{direction} {label}", "unperturbed"] == pytest.approx(direct.loc[direction, label])
    assert "X_sigmma_macro_st" in tiles.obsm
