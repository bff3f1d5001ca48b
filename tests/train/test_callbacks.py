"""The training layer's hooks: called when documented, and observing a run leaves it unchanged."""

from __future__ import annotations

import pytest
import torch
from _benchmarks import load_benchmark

from sigmma_sc.model import SigmmaModel
from sigmma_sc.train import Callback, Trainer

CFG = {"hidden": 16, "out_dim": 16, "batch_size": 8, "dropout": 0.1, "epochs": 3}


def _strip(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


class Recorder(Callback):
    """Counts every hook and reads what a benchmark would read (loss, statistics, validation embeddings)."""

    def __init__(self):
        self.calls = []
        self.losses, self.stats, self.records, self.val = [], [], [], []

    def on_fit_start(self, trainer):
        self.calls.append("fit_start")

    def on_train_batch_end(self, trainer, loss, stats):
        self.calls.append("batch")
        self.losses.append(float(loss))
        self.stats.append({k: float(v) for k, v in stats.items()})

    def on_epoch_end(self, trainer, record):
        self.calls.append("epoch")
        self.records.append(record)
        self.val.append(trainer.embed(trainer.val_idx))  # eval-mode embeddings of the validation tiles

    def on_checkpoint(self, trainer, path):
        self.calls.append("checkpoint")
        assert path.exists()

    def on_fit_end(self, trainer):
        self.calls.append("fit_end")


def test_hooks_are_called_in_order_and_see_the_run(bundle, tmp_path):
    rec = Recorder()
    m = SigmmaModel.from_bundle(bundle, **CFG, edge_addition=True)
    history = m.fit(bundle, progress=False, checkpoint_dir=tmp_path, callbacks=[rec])
    steps = history[-1]["step"]
    per_epoch = steps // len(history)
    epoch_calls = ["batch"] * per_epoch + ["checkpoint", "epoch"]
    assert rec.calls == ["fit_start", *epoch_calls * len(history), "fit_end"]
    assert rec.records == history
    # the per-step values average to the epoch's record: the hooks see the same numbers the history keeps
    sizes = [c.numel() for c in torch.arange(bundle.tiles_in("train").numel()).split(m.diagnostics["batch_size"])]
    assert len(sizes) == per_epoch
    for e, record in enumerate(history):
        step_losses = rec.losses[e * per_epoch : (e + 1) * per_epoch]
        mean = sum(v * n for v, n in zip(step_losses, sizes, strict=True)) / sum(sizes)  # tile-weighted
        assert mean == pytest.approx(record["train_loss"], rel=1e-5)
        probs = [s["edge_prob_meso"] for s in rec.stats[e * per_epoch : (e + 1) * per_epoch]]
        assert sum(probs) / per_epoch == pytest.approx(record["edge_prob_meso"], rel=1e-5)  # per-step mean
    assert set(rec.val[-1]) == {f"{m}/{s}" for m in ("image", "st") for s in ("micro", "meso", "macro")}
    assert rec.val[-1]["image/micro"].shape == (bundle.tiles_in("val").numel(), CFG["out_dim"])


def test_observing_leaves_the_trained_weights_bit_identical(bundle):
    plain = SigmmaModel.from_bundle(bundle, **CFG)
    h_plain = plain.fit(bundle, progress=False)
    watched = SigmmaModel.from_bundle(bundle, **CFG)
    rec = Recorder()
    h_watched = watched.fit(bundle, progress=False, callbacks=[rec])
    assert _strip(h_plain) == _strip(h_watched)
    for (k, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # the control: a hook that draws random numbers changes the run (so the equality above is informative)

    class Draws(Callback):
        def on_train_batch_end(self, trainer, loss, stats):
            torch.rand(1)

    drawn = SigmmaModel.from_bundle(bundle, **CFG)
    h_drawn = drawn.fit(bundle, progress=False, callbacks=[Draws()])
    assert _strip(h_drawn) != _strip(h_plain)


def test_trainer_runs_fit(bundle):
    m = SigmmaModel.from_bundle(bundle, **CFG)
    h = m.fit(bundle, progress=False)
    direct = SigmmaModel.from_bundle(bundle, **CFG)
    trainer = Trainer(direct, bundle, epochs=CFG["epochs"], steps=direct.config.steps, seed=direct.config.seed,
                      progress=False)  # fmt: skip
    assert _strip(trainer.fit()) == _strip(h)
    assert trainer.state.step == h[-1]["step"]
    assert trainer.selection.best_step > 0
    assert direct.diagnostics == m.diagnostics


def test_callbacks_must_subclass_callback(bundle):
    m = SigmmaModel.from_bundle(bundle, **CFG)
    with pytest.raises(TypeError, match="sigmma_sc.train.Callback"):
        m.fit(bundle, progress=False, callbacks=[object()])


def test_val_curve_benchmark_scores_every_epoch(bundle):
    """``benchmarks/val_curve.py`` observes validation retrieval through a callback (no monkeypatching)."""
    bench = load_benchmark("val_curve")
    cb = bench.ValidationRetrieval()
    m = SigmmaModel.from_bundle(bundle, **CFG)
    history = m.fit(bundle, progress=False, callbacks=[cb])
    assert len(cb.rows) == len(history)
    assert [r["val_loss"] for r in cb.rows] == [r["val_loss"] for r in history]
    assert all(0 <= r["R10_i2s"] <= 1 and 0 <= r["R10_s2i"] <= 1 for r in cb.rows)
