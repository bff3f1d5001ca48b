"""The training loop's budget, schedule, clipping, early stopping and health checks (issue 14)."""

import logging
import math

import numpy as np
import pytest
import torch
from _toy import toy_bundle

from sigmma_sc.model import SigmmaConfig, SigmmaModel
from sigmma_sc.train._diagnostics import (
    chance_loss,
    mean_pairwise_cosine,
    participation_ratio,
    partner_rank,
    training_diagnostics,
)
from sigmma_sc.train._schedule import lr_factor


@pytest.fixture(scope="module")
def learnable():
    return toy_bundle(n_tiles=60, seed=0)


def test_batch_capped_by_fraction_of_training_tiles():
    cfg = SigmmaConfig(n_features=4, image_dim=4)  # batch 256, at most a quarter of the training tiles
    assert cfg.batch_for(105) == 26
    assert cfg.batch_for(10_000) == 256
    assert cfg.batch_for(20) == 8  # at least 8 tiles ...
    assert cfg.batch_for(5) == 5  # ... or all of them
    paper = SigmmaConfig.preset("paper", n_features=4, image_dim=4)
    assert paper.batch_for(105) == 105  # full batches, as Table 3


def test_step_budget_and_warmup_cosine_schedule(learnable):
    model = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, steps=30, warmup=0.2, patience=None)
    history = model.fit(learnable, progress=False)
    # 48 training tiles, batches of 12 (a quarter): 4 steps per epoch, 30 steps = 7.5 epochs
    assert model.diagnostics["batch_size"] == 12
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24, 28, 30]
    assert model.diagnostics["stopped"] == "budget"
    factors = [lr_factor(i, total_steps=30, warmup_steps=6, schedule="cosine", steps_per_epoch=4, step_size=1,
                         gamma=0.1) for i in range(30)]  # fmt: skip
    assert factors[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])  # linear warm-up
    assert all(a >= b for a, b in zip(factors[5:], factors[6:], strict=False))  # then a monotone decay
    assert factors[-1] == pytest.approx(0.01, abs=0.01)
    # the recorded lr is the one of each epoch's first step
    assert history[0]["lr"] == pytest.approx(1e-3 * factors[0])
    assert history[2]["lr"] == pytest.approx(1e-3 * factors[8])


def test_paper_step_schedule():
    f = [lr_factor(i, total_steps=40, warmup_steps=0, schedule="step", steps_per_epoch=4, step_size=3, gamma=0.1)
         for i in range(40)]  # fmt: skip
    assert f[0] == f[11] == 1.0  # epochs 0-2
    assert f[12] == pytest.approx(0.1)  # epoch 3
    assert f[24] == pytest.approx(0.01)


@pytest.mark.parametrize(("select_by", "key"), [("retrieval", "val_rank"), ("loss", "val_loss")])
def test_early_stopping_keeps_best_and_stops(learnable, select_by, key):
    model = SigmmaModel.from_bundle(
        learnable, hidden=16, out_dim=16, steps=2000, patience=8, warmup=0, lr=3e-2, temperature=0.1,
        select_by=select_by,
    )  # fmt: skip
    history = model.fit(learnable, progress=False)
    steps = history[-1]["step"]
    assert steps < 2000
    assert model.diagnostics["stopped"] == "early stopping"
    vals = [h[key] for h in history]
    best = int(np.argmin(vals))  # the first of equal values: only a strict improvement resets the patience
    assert steps - history[best]["step"] >= 8  # stopped only after `patience` steps without improvement
    assert all(h["step"] - history[best]["step"] < 8 for h in history[:-1] if h["step"] > history[best]["step"])
    assert model.diagnostics["best_epoch"] == history[best]["epoch"]
    assert model.diagnostics[f"best_{key}"] == pytest.approx(vals[best])
    assert 0 <= min(h["val_rank"] for h in history) < 0.5  # the rank is recorded either way, and learns


def test_gradients_are_clipped_and_recorded(learnable):
    torch.manual_seed(0)
    clipped = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, epochs=1, max_grad_norm=1e-3, lr=1e-2)
    before = {k: v.clone() for k, v in clipped.state_dict().items()}
    history = clipped.fit(learnable, progress=False)
    assert history[0]["grad_norm"] > 1e-3  # the recorded norm is the one before clipping
    # AdamW's first step moves each parameter by about lr whatever the gradient's scale, so compare with SGD
    model = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, max_grad_norm=0.5)
    model.train()
    batch = learnable.select(torch.arange(12))
    model(batch).backward()
    from sigmma_sc.train._step import step_stats as _step_stats

    stats = _step_stats(model, 0.5)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert float(stats["grad_norm"]) > 0.5
    assert float(total) == pytest.approx(0.5, rel=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in clipped.state_dict().items())


def test_chance_level_matches_uninformative_embeddings():
    assert chance_loss([10], 3) == pytest.approx(3 * math.log(10))
    assert chance_loss([10, 30], 1) == pytest.approx((10 * math.log(10) + 30 * math.log(30)) / 40)
    from sigmma_sc.nn import info_nce

    z = torch.nn.functional.normalize(torch.ones(16, 8), dim=1)  # every tile the same: no information
    assert float(info_nce(z, z, temperature=0.1)) == pytest.approx(math.log(16), rel=1e-5)


def test_partner_rank_perfect_chance_and_collapsed():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 16, generator=g)
    assert partner_rank({"image/macro": z, "st/macro": z}, ["macro"]) == 0.0  # every partner is the nearest
    other = torch.randn(40, 16, generator=g)
    assert partner_rank({"image/macro": z, "st/macro": other}, ["macro"]) == pytest.approx(0.5, abs=0.06)
    same = torch.ones(40, 16)  # collapsed: all similarities tie, which is chance, not a perfect score
    assert partner_rank({"image/macro": same, "st/macro": same}, ["macro"]) == pytest.approx(0.5)
    # partners 1 and 2 swapped: by hand, tile 1's partner has 1 better and 1 tied other of 2 -> (1 + 0.5) / 2,
    # the same for tile 2, tile 0 ranks first; the same in both directions
    e = torch.eye(3)
    assert partner_rank({"image/micro": e, "st/micro": e[[0, 2, 1]]}, ["micro"]) == pytest.approx(0.5)
    # the mean over scales
    emb = {"image/micro": z, "st/micro": z, "image/macro": same, "st/macro": same}
    assert partner_rank(emb, ["micro", "macro"]) == pytest.approx(0.25)


def test_paper_preset_selects_on_the_validation_loss():
    assert SigmmaConfig(n_features=4, image_dim=4).select_by == "retrieval"
    assert SigmmaConfig.preset("paper", n_features=4, image_dim=4).select_by == "loss"
    with pytest.raises(ValueError, match="select_by"):
        SigmmaConfig(n_features=4, image_dim=4, select_by="recall")


def test_collapse_metrics():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(200, 32, generator=g)
    collapsed = torch.ones(200, 32) + 1e-3 * torch.randn(200, 32, generator=g)
    assert abs(mean_pairwise_cosine(spread)) < 0.05
    assert mean_pairwise_cosine(collapsed) > 0.99
    assert participation_ratio(spread) > 20
    line = torch.randn(200, 1, generator=g) * torch.ones(1, 32)
    assert participation_ratio(line) == pytest.approx(1.0, rel=1e-6)


def test_collapse_is_one_warning_naming_each_embedding(caplog):
    g = torch.Generator().manual_seed(0)
    emb = {
        "image/micro": torch.randn(50, 8, generator=g),
        "image/macro": torch.ones(50, 8) + 1e-4 * torch.randn(50, 8, generator=g),
        "st/macro": torch.ones(50, 8) + 1e-4 * torch.randn(50, 8, generator=g),
    }
    with caplog.at_level(logging.WARNING, logger="sigmma_sc"):
        d = training_diagnostics([], emb, tiles="val", stopped="budget")
    assert len(d["warnings"]) == 1
    assert "image macro" in d["warnings"][0]
    assert "st macro" in d["warnings"][0]
    assert "image micro" not in d["warnings"][0]
    assert caplog.text.count("have collapsed") == 1


def test_health_warnings_reach_the_user(learnable, caplog):
    # lr far too small: the model stays at chance and its embeddings stay near-identical
    model = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, steps=4, lr=1e-9, warmup=0)
    with caplog.at_level(logging.WARNING, logger="sigmma_sc.train._diagnostics"):
        model.fit(learnable, progress=False)
    d = model.diagnostics
    assert d["best_val_rank"] >= 0.9 * d["val_rank_chance"]  # retrieval at chance: the default criterion warns
    assert any("validation partner rank" in m and "within 10% of chance" in m for m in d["warnings"])
    assert "raise `lr`" in caplog.text
    assert not any("validation loss" in m for m in d["warnings"])  # one near-chance warning, the criterion's
    by_loss = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, steps=4, lr=1e-9, warmup=0, select_by="loss")
    by_loss.fit(learnable, progress=False)
    assert by_loss.diagnostics["best_val_loss"] >= 0.97 * by_loss.diagnostics["val_chance"]
    assert any("within 3% of its chance level" in m for m in by_loss.diagnostics["warnings"])
    assert set(d["mean_cosine"]) == {f"{m}_{s}" for m in ("image", "st") for s in model.scales}
    # a model that learns: well below chance, no warning
    good = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, steps=150, lr=3e-3, temperature=0.1)
    good.fit(learnable, progress=False)
    assert good.diagnostics["best_val_loss"] < 0.8 * good.diagnostics["val_chance"]
    assert good.diagnostics["best_val_rank"] < 0.25
    assert not [m for m in good.diagnostics["warnings"] if "chance" in m]


def test_diagnostics_and_new_history_survive_save_load(learnable, tmp_path):
    model = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, steps=8)
    model.fit(learnable, progress=False)
    model.save(tmp_path / "m.pt")
    back = SigmmaModel.load(tmp_path / "m.pt")
    assert back.diagnostics == model.diagnostics
    assert back.history == model.history


def test_corrupt_checkpoint_is_a_clear_error(learnable, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    model = SigmmaModel.from_bundle(learnable, hidden=16, out_dim=16, steps=4)
    with pytest.raises(ValueError, match="corrupt or not a SIGMMA checkpoint") as err:
        model.fit(learnable, progress=False, checkpoint_dir=tmp_path, resume=True)
    message = str(err.value)  # the fix leads; torch's advice to load with weights_only=False is not passed on
    assert message.index("delete it") < message.index("torch could not read it")
    assert "weights_only" not in message
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__


def test_same_seed_same_weights_with_several_threads():
    """Scatter-adds summed in thread order made 2-thread CPU runs differ; fit runs them deterministically.

    Without ``deterministic_on_cpu`` this set-up gives different weights on 2 threads (checked when written).
    """
    bundle = toy_bundle(n_tiles=48, n_features=50, image_dim=16, min_cells=40, max_cells=100, n_neighs=6, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = []
        for _ in range(2):
            m = SigmmaModel.from_bundle(
                bundle, hidden=128, out_dim=128, steps=12, warmup=0, patience=None, max_batch_fraction=1.0
            )
            m.fit(bundle, progress=False)
            states.append(m.state_dict())
    finally:
        torch.set_num_threads(threads)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored
