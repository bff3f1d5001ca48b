"""Options against dimensional collapse (issue 25 item 2): learned temperature, uniformity term, head weight decay,
head depth, and ``sg.metrics.embedding_collapse``."""

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import sigmma_sc as sg
from sigmma_sc.model import SigmmaConfig, SigmmaModel
from sigmma_sc.model._finetune import optimizer_groups
from sigmma_sc.nn import ProjectionHead, info_nce
from sigmma_sc.nn._loss import uniformity_loss
from sigmma_sc.train import grad_cache_backward

TINY = {"hidden": 16, "out_dim": 16, "batch_size": 8, "dropout": 0.1}


def test_uniformity_loss_values():
    # all rows equal: every pair at distance 0, exp(0) = 1, log 1 = 0 (the maximum)
    same = F.normalize(torch.ones(6, 4), dim=-1)
    assert float(uniformity_loss(same)) == pytest.approx(0.0, abs=1e-6)
    # orthonormal rows: every squared distance is 2, so log exp(-2 * 2) = -4
    assert float(uniformity_loss(torch.eye(5))) == pytest.approx(-4.0, abs=1e-5)
    # against a brute-force mean over the distinct pairs
    z = F.normalize(torch.randn(9, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    d = torch.cdist(z, z).pow(2)
    iu = torch.triu_indices(9, 9, 1)
    brute = torch.log(torch.exp(-2 * d[iu[0], iu[1]]).mean())
    torch.testing.assert_close(uniformity_loss(z), brute, rtol=1e-5, atol=1e-6)


def test_uniformity_term_spreads_embeddings():
    """Gradient descent on the uniformity term alone spreads crowded embeddings: mean cosine falls, rank grows."""
    g = torch.Generator().manual_seed(0)
    x = (torch.ones(64, 8) + 0.05 * torch.randn(64, 8, generator=g)).requires_grad_(True)
    before = F.normalize(x.detach(), dim=-1)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        uniformity_loss(F.normalize(x, dim=-1)).backward()
        opt.step()
    after = F.normalize(x.detach(), dim=-1)
    cos = lambda z: float(((z.sum(0) @ z.sum(0)) - z.shape[0]) / (z.shape[0] * (z.shape[0] - 1)))
    assert cos(before) > 0.99
    assert abs(cos(after)) < 0.05


def test_projection_head_depth():
    one = ProjectionHead(7, 5, layers=1)
    assert [type(m).__name__ for m in one.net] == ["Linear"]
    torch.testing.assert_close(one(torch.randn(3, 7)).norm(dim=-1), torch.ones(3))
    assert len(ProjectionHead(7, 5).net) == 4
    with pytest.raises(ValueError, match="layers"):
        ProjectionHead(7, 5, layers=3)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("uniformity", -0.1, "uniformity"),
        ("head_weight_decay", -1.0, "head_weight_decay"),
        ("head_layers", 3, "head_layers"),
    ],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        SigmmaConfig(n_features=4, image_dim=4, **{field: value})


def test_learned_temperature_gets_gradients_under_grad_cache():
    """A parameter of the loss (the logit scale) gets the same gradient with and without micro-batches."""
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    enc = torch.nn.Linear(4, 3)
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    y = F.normalize(torch.randn(12, 3, generator=torch.Generator().manual_seed(2)), dim=-1)

    def encode(c):
        return {"a": F.normalize(enc(x[c]), dim=-1), "b": y[c]}

    def loss_fn(emb):
        return info_nce(emb["a"], emb["b"], 1 / log_scale.exp())

    loss_fn(encode(torch.arange(12))).backward()
    ref = (log_scale.grad.clone(), enc.weight.grad.clone())
    log_scale.grad, enc.weight.grad, enc.bias.grad = None, None, None
    grad_cache_backward(encode, list(torch.arange(12).split(5)), loss_fn)
    assert float(ref[0].abs()) > 0
    torch.testing.assert_close(log_scale.grad, ref[0])
    torch.testing.assert_close(enc.weight.grad, ref[1], rtol=1e-5, atol=1e-6)


def test_learned_temperature_trains_clamps_and_survives_save_load(bundle, tmp_path):
    fixed = SigmmaModel.from_bundle(bundle, **TINY, epochs=2, temperature=0.07)
    assert fixed.log_logit_scale is None
    assert fixed.temperature == 0.07
    m = SigmmaModel.from_bundle(bundle, **TINY, epochs=3, temperature=0.07, learn_temperature=True, lr=1e-2)
    assert m.temperature == pytest.approx(0.07)
    m.fit(bundle, seed=0)
    assert m.temperature != pytest.approx(0.07, abs=1e-6)  # it moved
    assert m.temperature >= 0.01 - 1e-9
    m.save(tmp_path / "m.pt")
    back = SigmmaModel.load(tmp_path / "m.pt")
    assert back.temperature == pytest.approx(m.temperature)
    # the clamp: a logit scale beyond 100 means a temperature of 0.01, with no gradient pushing it further
    with torch.no_grad():
        m.log_logit_scale.fill_(math.log(1e4))
    assert m.temperature == pytest.approx(0.01)
    # micro-batches train the same temperature (the loss's parameter gets its gradient under GradCache)
    mb = SigmmaModel.from_bundle(bundle, **TINY, epochs=3, temperature=0.07, learn_temperature=True, lr=1e-2,
                                 micro_batch=3)  # fmt: skip
    mb.fit(bundle, seed=0)
    assert mb.temperature == pytest.approx(back.temperature, rel=1e-4)


def test_head_weight_decay_groups_and_effect(bundle):
    base = SigmmaModel.from_bundle(bundle, **TINY, epochs=1)
    assert len(optimizer_groups(base, None, 1e-3, 1e-5)) == 1  # unchanged without the options
    m = SigmmaModel.from_bundle(bundle, **TINY, epochs=1, head_weight_decay=0.5, learn_temperature=True)
    groups = optimizer_groups(m, None, 1e-3, 1e-5)
    assert [g.get("weight_decay") for g in groups] == [None, 0.5, 0.0]
    heads = {id(p) for n in ("image_heads", "st_heads") for p in getattr(m, n).parameters()}
    assert {id(p) for p in groups[1]["params"]} == heads
    assert groups[2]["params"] == [m.log_logit_scale]
    assert sum(len(g["params"]) for g in groups) == len([p for p in m.parameters() if p.requires_grad])

    def head_norm(model):
        return float(sum(p.norm() ** 2 for n in ("image_heads", "st_heads") for p in getattr(model, n).parameters()))

    norms = {}
    for wd in (None, 50.0):
        model = SigmmaModel.from_bundle(bundle, **TINY, epochs=3, head_weight_decay=wd)
        model.fit(bundle, seed=0)
        norms[wd] = head_norm(model)
    assert norms[50.0] < 0.9 * norms[None]  # decoupled decay shrinks the heads


def test_uniformity_and_linear_heads_train(bundle):
    for kw in ({"uniformity": 0.5}, {"head_layers": 1}):
        m = SigmmaModel.from_bundle(bundle, **TINY, epochs=2, **kw)
        m.fit(bundle, seed=0)
        assert all(math.isfinite(h["train_loss"]) for h in m.history)
    # the uniformity term is part of the loss: on the same embeddings the loss grows by the weighted term
    m0 = SigmmaModel.from_bundle(bundle, **TINY, epochs=1)
    m1 = SigmmaModel.from_bundle(bundle, **TINY, epochs=1, uniformity=0.5)
    g = torch.Generator().manual_seed(0)
    emb = {
        f"{k}/{s}": F.normalize(torch.randn(10, 16, generator=g), dim=-1) for k in ("image", "st") for s in m0.scales
    }
    extra = sum(0.25 * uniformity_loss(emb[f"{k}/{s}"]) for k in ("image", "st") for s in m0.scales)
    torch.testing.assert_close(m1.loss_from_embeddings(emb), m0.loss_from_embeddings(emb) + extra)


def test_embedding_collapse_metric():
    rng = np.random.default_rng(0)
    n = 120
    split = np.array(["train"] * 60 + ["val"] * 30 + ["test"] * 30)
    obs = pd.DataFrame({"split": pd.Categorical(split), "n_cells": np.full(n, 5)}, index=[f"t{i}" for i in range(n)])
    tiles = ad.AnnData(X=np.zeros((n, 2), dtype=np.float32), obs=obs)
    tiles.obsm["spread"] = rng.normal(size=(n, 16))
    tiles.obsm["cone"] = 5 + 0.01 * rng.normal(size=(n, 16))
    tiles.obsm["val_only_line"] = np.where((split == "val")[:, None], rng.normal(size=(n, 1)) * np.ones((1, 16)),
                                           rng.normal(size=(n, 16)))  # fmt: skip
    df = sg.metrics.embedding_collapse(tiles, ["spread", "cone", "val_only_line"], split="val").set_index("key")
    assert (df["n_tiles"] == 30).all()
    assert (df["dim"] == 16).all()
    assert df.loc["spread", "participation_ratio"] > 8
    assert not df.loc["spread", "collapsed"]
    assert df.loc["cone", "mean_cosine"] > 0.99
    assert df.loc["cone", "collapsed"]
    assert df.loc["val_only_line", "participation_ratio"] == pytest.approx(1.0, rel=1e-6)  # only val tiles scored
    train = sg.metrics.embedding_collapse(tiles, "val_only_line", split="train")
    assert train["participation_ratio"].iloc[0] > 8
    with pytest.raises(KeyError, match="embed"):
        sg.metrics.embedding_collapse(tiles, "missing")
