import dataclasses
import logging

import numpy as np
import pytest
import torch
from _toy import toy_bundle

from sigmma_sc._constants import SCALES
from sigmma_sc.model import SigmmaConfig, SigmmaModel, TrainingBundle
from sigmma_sc.train import grad_cache_backward


def _equal_dicts(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_config_json_roundtrip():
    cfg = SigmmaConfig(n_features=4, image_dim=6, scales=["macro", "micro"], micro_batch=8)
    assert cfg.scales == ("micro", "macro")
    back = SigmmaConfig.from_json(cfg.to_json())
    assert back == cfg
    assert (cfg.lr, cfg.weight_decay, cfg.temperature, cfg.steps, cfg.epochs) == (1e-3, 1e-3, 0.01, 1000, None)
    paper = SigmmaConfig.preset("paper", n_features=4, image_dim=6)
    assert (paper.lr, paper.batch_size, paper.epochs, paper.steps, paper.schedule) == (1e-4, 1280, 100, None, "step")
    assert (paper.step_size, paper.gamma, paper.warmup, paper.patience, paper.max_grad_norm) == (100, 0.1, 0, None, None)
    assert SigmmaConfig.from_json(paper.to_json()) == paper
    assert SigmmaConfig.preset("default", n_features=4, image_dim=6, epochs=7).steps is None  # epochs alone: epochs
    with pytest.raises(ValueError, match="budget"):
        SigmmaConfig(n_features=4, image_dim=6, steps=None)
    with pytest.raises(ValueError, match="preset"):
        SigmmaConfig.preset("fast", n_features=4, image_dim=6)
    with pytest.raises(ValueError, match="schedule"):
        SigmmaConfig(n_features=4, image_dim=6, schedule="linear")
    with pytest.raises(ValueError, match="max_grad_norm"):
        SigmmaConfig(n_features=4, image_dim=6, max_grad_norm=0)
    with pytest.raises(ValueError, match="subset"):
        SigmmaConfig(n_features=4, image_dim=6, scales=("nano",))
    with pytest.raises(ValueError, match="batch_size"):
        SigmmaConfig(n_features=4, image_dim=6, batch_size=1)
    with pytest.raises(TypeError, match="Unknown"):
        SigmmaConfig.from_dict({"n_features": 1, "image_dim": 1, "foo": 2})


def test_shapes(bundle, small_config):
    model = SigmmaModel.from_bundle(bundle, **small_config)
    tiles, cells = model.encode_st(bundle)
    img = model.encode_image(bundle)
    for s in SCALES:
        assert tiles[s].shape == (bundle.n_tiles, 16)
        assert cells[s].shape == (bundle.n_cells, 16)
        assert img[s].shape == (bundle.n_tiles, 16)
        torch.testing.assert_close(img[s].norm(dim=1), torch.ones(bundle.n_tiles))
    assert model.training  # encode_* restore the mode
    assert "SigmmaModel(" in repr(model)


def test_fit_loss_decreases_on_learnable_signal():
    b = toy_bundle(n_tiles=40, seed=0)
    model = SigmmaModel.from_bundle(
        b, hidden=32, out_dim=16, batch_size=16, epochs=30, dropout=0.0, lr=3e-3, temperature=0.1
    )
    history = model.fit(b, progress=False, device="cpu")
    assert [h["epoch"] for h in history] == list(range(1, 31))
    base = {"epoch", "step", "train_loss", "train_chance", "val_loss", "val_chance", "val_rank", "lr", "grad_norm",
            "seconds"}  # fmt: skip
    assert base <= set(history[0])
    losses = np.array([h["train_loss"] for h in history])
    vals = np.array([h["val_loss"] for h in history])
    assert np.isfinite(losses).all()
    assert np.isfinite(vals).all()
    assert losses[-3:].mean() < 0.6 * losses[:3].mean()
    assert vals.min() < 0.8 * vals[0]
    # the learned spaces retrieve the paired tile far above chance (1 / 40)
    img, (st, _) = model.encode_image(b), model.encode_st(b)
    top1 = (img["micro"] @ st["micro"].T).argmax(1) == torch.arange(b.n_tiles)
    assert top1.float().mean() > 0.25
    assert model.history == history
    assert not model.training


def test_same_seed_identical_embeddings(bundle, small_config):
    runs = []
    for _ in range(2):
        m = SigmmaModel.from_bundle(bundle, **small_config)
        m.fit(bundle, progress=False)
        runs.append((m.encode_st(bundle), m.encode_image(bundle), m.history))
    (t1, c1), i1, h1 = runs[0]
    (t2, c2), i2, h2 = runs[1]
    _equal_dicts(t1, t2)
    _equal_dicts(c1, c2)
    _equal_dicts(i1, i2)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in h1] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in h2
    ]
    other = SigmmaModel.from_bundle(bundle, **small_config, seed=1)
    assert not torch.equal(other.encode_image(bundle)["micro"], i1["micro"])


def test_fit_leaves_global_rng_untouched(bundle, small_config):
    state = torch.get_rng_state()
    SigmmaModel.from_bundle(bundle, **small_config).fit(bundle, progress=False, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_save_load_identical(bundle, small_config, tmp_path):
    m = SigmmaModel.from_bundle(bundle, **small_config)
    m.fit(bundle, progress=False, epochs=1)
    m.save(tmp_path / "sub" / "model.pt")
    raw = torch.load(tmp_path / "sub" / "model.pt", weights_only=True)
    assert raw["format"] == "sigmma_sc.SigmmaModel"
    assert "config" in raw
    m2 = SigmmaModel.load(tmp_path / "sub" / "model.pt", map_location="cpu")
    assert m2.config == m.config
    assert m2.history == m.history
    assert m2.meta == m.meta
    _equal_dicts(m.encode_st(bundle)[0], m2.encode_st(bundle)[0])
    _equal_dicts(m.encode_st(bundle)[1], m2.encode_st(bundle)[1])
    _equal_dicts(m.encode_image(bundle), m2.encode_image(bundle))


def test_image_only_embedding(bundle, small_config):
    m = SigmmaModel.from_bundle(bundle, **small_config).eval()
    feats = {s: f.numpy() for s, f in bundle.image_features.items()}
    out = m.encode_image(feats, batch_size=5)
    ref = m.encode_image({s: torch.from_numpy(f) for s, f in feats.items()})
    for s in SCALES:
        torch.testing.assert_close(out[s], ref[s])
    with pytest.raises(ValueError, match="missing"):
        m.encode_image({"micro": feats["micro"]})


@pytest.mark.parametrize(
    ("kwargs", "scales"),
    [
        ({"use_graph": False}, SCALES),
        ({"edge_addition": False}, SCALES),
        ({"scales": ("macro",)}, ("macro",)),
    ],
)
def test_ablations_train_and_embed(bundle, small_config, kwargs, scales):
    m = SigmmaModel.from_bundle(bundle, **{**small_config, **kwargs})
    history = m.fit(bundle, progress=False, epochs=1)
    assert np.isfinite(history[0]["train_loss"])
    tiles, cells = m.encode_st(bundle)
    assert tuple(tiles) == scales == tuple(m.encode_image(bundle))
    assert set(m.image_heads) == set(m.st_heads) == set(scales)
    names = [n for n, _ in m.named_parameters()]
    if kwargs.get("edge_addition") is False or kwargs.get("use_graph") is False:
        assert not any("samplers" in n for n in names)
    if kwargs.get("use_graph") is False:
        assert not any("convs" in n for n in names)


def test_grad_cache_equals_full_batch(bundle, small_config):
    """Dropout 0 and eval-mode edges: micro-batched gradients equal full-batch gradients."""
    m = SigmmaModel.from_bundle(bundle, **{**small_config, "dropout": 0.0}).eval()
    idx = torch.arange(16)
    m(bundle.select(idx)).backward()
    full = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    loss = grad_cache_backward(lambda c: m.embed_batch(bundle.select(c)), list(idx.split(5)), m.loss_from_embeddings)
    torch.testing.assert_close(loss, m(bundle.select(idx)).detach())
    assert full
    for n, p in m.named_parameters():
        if n in full:
            torch.testing.assert_close(p.grad, full[n], rtol=1e-4, atol=1e-6)


def test_fit_with_micro_batches(bundle, small_config):
    m = SigmmaModel.from_bundle(bundle, **{**small_config, "micro_batch": 3})
    history = m.fit(bundle, progress=False, epochs=2)
    assert all(np.isfinite(h["train_loss"]) for h in history)


def test_micro_batches_train_the_same_model(bundle, small_config, monkeypatch):
    """GradCache micro-batches take their dropout masks and edge-sampling noise from the whole batch's draw, so
    the same seed trains the same model whether the batch fits in memory or is split (the CPU memory planner
    picks the split from the free memory; it must not change the result)."""
    cfg = {**small_config, "dropout": 0.2, "edge_addition": True, "epochs": 3, "steps": None, "warmup": 0}
    every = torch.arange(bundle.n_tiles)
    runs = {}
    for mb in (None, 3, 5):
        m = SigmmaModel.from_bundle(bundle, seed=0, **{**cfg, "micro_batch": mb})
        history = m.fit(bundle, progress=False)
        with torch.no_grad():
            runs[mb] = (history, m.eval().embed_batch(bundle.select(every)))
    # compared through the embeddings: the attention pools' last gate bias has no gradient in exact arithmetic
    # (the softmax ignores a shift), so Adam moves it by float noise; the outputs do not see it
    for mb in (3, 5):
        for a, b in zip(runs[None][0], runs[mb][0], strict=True):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
            assert b["val_rank"] == pytest.approx(a["val_rank"], abs=1e-6)
        for k, v in runs[None][1].items():
            torch.testing.assert_close(runs[mb][1][k], v, rtol=1e-3, atol=1e-4)
    # the control: without the whole batch's draws the micro-batched run is another model
    from sigmma_sc.train import _noise as N

    class Unaligned:  # every micro-batch draws its own noise, as GradCache did before
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

        def start_step(self, *args):
            pass

        start_chunk = end_chunk = end_step = start_step

    monkeypatch.setattr(N, "rank_noise", lambda model, counts: Unaligned())
    m = SigmmaModel.from_bundle(bundle, seed=0, **{**cfg, "micro_batch": 3})
    h = m.fit(bundle, progress=False)
    assert h[-1]["train_loss"] != pytest.approx(runs[None][0][-1]["train_loss"], rel=1e-4)


def test_resume_equals_uninterrupted(bundle, small_config, tmp_path):
    from sigmma_sc.train import Callback

    cfg = {**small_config, "epochs": 4, "steps": None, "schedule": "step", "step_size": 2, "gamma": 0.5, "warmup": 0}
    full = SigmmaModel.from_bundle(bundle, **cfg)
    h_full = full.fit(bundle, progress=False, checkpoint_dir=tmp_path / "a")
    part = SigmmaModel.from_bundle(bundle, **cfg)
    saves = []

    class KilledAfterTwoEpochs(Callback):
        def on_checkpoint(self, trainer, path):
            saves.append(trainer.state.epoch)
            if len(saves) == 2:
                raise KeyboardInterrupt  # the job is killed after its second checkpoint

    with pytest.raises(KeyboardInterrupt):
        part.fit(bundle, progress=False, checkpoint_dir=tmp_path / "b", callbacks=[KilledAfterTwoEpochs()])
    assert saves == [1, 2]
    resumed = SigmmaModel.from_bundle(bundle, **cfg)
    h_res = resumed.fit(bundle, progress=False, checkpoint_dir=tmp_path / "b", resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(h_full) == strip(h_res)
    assert [r["lr"] for r in h_full] == [1e-3, 1e-3, 5e-4, 5e-4]
    _equal_dicts(full.state_dict(), resumed.state_dict())
    ckpt = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 4
    assert len(ckpt["history"]) == 4
    assert not list((tmp_path / "a").glob(".*tmp"))


def test_best_validation_state_restored(bundle, small_config, tmp_path):
    m = SigmmaModel.from_bundle(bundle, **{**small_config, "epochs": 3})
    history = m.fit(bundle, progress=False, checkpoint_dir=tmp_path)
    best = min(history, key=lambda h: h["val_rank"])  # the default criterion: validation retrieval
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    _equal_dicts(m.state_dict(), ckpt["best_state"])
    from sigmma_sc.train._validation import evaluate

    val, chance, rank = evaluate(m, bundle, bundle.tiles_in("val"), m.diagnostics["batch_size"])
    assert val == pytest.approx(best["val_loss"], rel=1e-5)
    assert chance == pytest.approx(best["val_chance"])
    assert rank == pytest.approx(best["val_rank"], abs=1e-9)
    assert m.diagnostics["best_epoch"] == best["epoch"]
    assert m.diagnostics["select_by"] == "retrieval"


def test_oom_halves_micro_batch(bundle, small_config, monkeypatch, caplog):
    original = SigmmaModel.embed_batch

    def flaky(self, batch):
        if self.training and batch.num_tiles > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, batch)

    monkeypatch.setattr(SigmmaModel, "embed_batch", flaky)
    m = SigmmaModel.from_bundle(bundle, **small_config)
    with caplog.at_level(logging.WARNING, logger="sigmma_sc.train._step"):
        history = m.fit(bundle, progress=False, epochs=1)
    assert np.isfinite(history[0]["train_loss"])
    assert "micro_batch=4" in caplog.text
    assert "micro_batch=2" in caplog.text

    def always(self, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(SigmmaModel, "embed_batch", always)
    with pytest.raises(RuntimeError, match="micro-batch of 1"):
        SigmmaModel.from_bundle(bundle, **small_config).fit(bundle, progress=False, epochs=1)


def test_tiles_with_zero_or_one_cell(small_config):
    b = toy_bundle(n_tiles=20, min_cells=1, max_cells=3, n_empty=3, seed=4)
    m = SigmmaModel.from_bundle(b, **small_config)
    history = m.fit(b, progress=False, epochs=2)
    assert np.isfinite(history[-1]["train_loss"])
    tiles, cells = m.encode_st(b)
    for s in SCALES:
        assert torch.isfinite(tiles[s]).all()
        assert torch.isfinite(cells[s]).all()


def test_fit_errors(bundle, small_config, tmp_path):
    m = SigmmaModel.from_bundle(bundle, **small_config)
    parts = {k: getattr(bundle, k) for k in ("x", "cell_ptr", "pos", "edge_index", "cand_meso", "cand_macro")}
    one_train = TrainingBundle(
        **parts, image_features=bundle.image_features, split=torch.tensor([0] + [1] * (bundle.n_tiles - 1))
    )
    with pytest.raises(ValueError, match="at least 2 training tiles"):
        m.fit(one_train, progress=False)
    with pytest.raises(ValueError, match="image features"):
        m.fit(TrainingBundle(**parts), progress=False)
    wide = TrainingBundle(**{**parts, "x": torch.cat([bundle.x, bundle.x], 1)}, image_features=bundle.image_features)
    with pytest.raises(ValueError, match="n_features"):
        m.fit(wide, progress=False)
    narrow = TrainingBundle(**parts, image_features={s: f[:, :5] for s, f in bundle.image_features.items()})
    with pytest.raises(ValueError, match="image_dim"):
        m.fit(narrow, progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        m.fit(bundle, progress=False, resume=True)
    with pytest.raises(ValueError, match="image_dim"):  # fine-tuning: tests/model/test_finetune.py
        SigmmaModel(dataclasses.replace(m.config, finetune_blocks=1, backbone_pretrained=False))
    m.fit(bundle, progress=False, epochs=1, checkpoint_dir=tmp_path)
    other = SigmmaModel.from_bundle(bundle, **{**small_config, "hidden": 8})
    with pytest.raises(ValueError, match="different config"):
        other.fit(bundle, progress=False, checkpoint_dir=tmp_path, resume=True)


def test_tile_graph_config_train_save_load(bundle, small_config, tmp_path):
    tile = {"graph": "tile", "scales": ("macro",), "edge_addition": False}
    cfg = SigmmaConfig(n_features=4, image_dim=6, **tile)
    assert SigmmaConfig.from_json(cfg.to_json()) == cfg
    assert SigmmaConfig(n_features=4, image_dim=6).graph == "hierarchical"
    with pytest.raises(ValueError, match="edge_addition=False"):
        SigmmaConfig(n_features=4, image_dim=6, graph="tile", scales=("macro",))
    with pytest.raises(ValueError, match="one of"):
        SigmmaConfig(n_features=4, image_dim=6, graph="flat")
    m = SigmmaModel.from_bundle(bundle, **small_config, **tile)
    names = [n for n, _ in m.named_parameters()]
    assert not any("samplers" in n or "convs.micro" in n or "convs.meso" in n for n in names)
    assert "graph='tile'" in repr(m)
    m.fit(bundle, progress=False, epochs=1)
    tiles, cells = m.encode_st(bundle)
    assert tuple(tiles) == tuple(cells) == ("macro",)
    assert cells["macro"].shape == (bundle.n_cells, 16)
    m.save(tmp_path / "tile.pt")
    m2 = SigmmaModel.load(tmp_path / "tile.pt")
    assert m2.config == m.config
    assert m2.config.graph == "tile"
    _equal_dicts(m.encode_st(bundle)[0], m2.encode_st(bundle)[0])
    _equal_dicts(m.encode_st(bundle)[1], m2.encode_st(bundle)[1])
    # a config saved before the switch existed loads with the default
    old = {k: v for k, v in m.config.to_dict().items() if k != "graph"} | {"scales": list(SCALES)}
    old |= {"edge_addition": True}
    assert SigmmaConfig.from_dict(old).graph == "hierarchical"


@pytest.mark.parametrize("edges", ["none", "rewired", "rewired_tile"])
def test_edge_controls_train_save_load(bundle, small_config, tmp_path, edges):
    """The no-edges / rewired-edges controls: same parameters as the spatial model, trained, saved and loaded."""
    cfg = SigmmaConfig(n_features=4, image_dim=6, edges=edges)
    assert SigmmaConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="use_graph"):
        SigmmaConfig(n_features=4, image_dim=6, edges=edges, use_graph=False)
    with pytest.raises(ValueError, match="one of"):
        SigmmaConfig(n_features=4, image_dim=6, edges="random")
    m = SigmmaModel.from_bundle(bundle, **small_config, edges=edges)
    ref = SigmmaModel.from_bundle(bundle, **small_config)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert f"edges={edges!r}" in repr(m)
    history = m.fit(bundle, progress=False, epochs=1)
    assert np.isfinite(history[0]["train_loss"])
    m.save(tmp_path / "control.pt")
    m2 = SigmmaModel.load(tmp_path / "control.pt")
    assert m2.config.edges == edges
    _equal_dicts(m.encode_st(bundle)[0], m2.encode_st(bundle)[0])
    # the same weights with spatial edges embed differently: the control changes what the GNN sees
    ref.load_state_dict(m.state_dict())
    assert not np.allclose(ref.encode_st(bundle)[0]["macro"], m.encode_st(bundle)[0]["macro"])
    old = {k: v for k, v in m.config.to_dict().items() if k != "edges"}
    assert SigmmaConfig.from_dict(old).edges == "spatial"


def test_edge_scores_report_every_scored_candidate(bundle, small_config):
    from sigmma_sc.model import edge_scores

    m = SigmmaModel.from_bundle(bundle, **small_config)
    scores = edge_scores(m, bundle, batch_size=5)  # several chunks
    assert set(scores) == {"meso", "macro"}
    for s, d in scores.items():
        cand = getattr(bundle, f"cand_{s}")
        got = set(zip(d["src"].tolist(), d["dst"].tolist(), strict=True))
        assert got == set(zip(*[a.tolist() for a in cand], strict=True))  # bundle rows, every candidate once
        assert ((d["prob"] > 0) & (d["prob"] < 1)).all()
        np.testing.assert_array_equal(d["kept"], (d["prob"] > 0.5).astype(np.float32))  # the evaluation threshold
        pos = bundle.pos.numpy()
        np.testing.assert_allclose(d["distance"], np.linalg.norm(pos[d["src"]] - pos[d["dst"]], axis=1), rtol=1e-6)
        tile_of = np.repeat(np.arange(bundle.n_tiles), np.diff(bundle.cell_ptr.numpy()))
        np.testing.assert_array_equal(d["tile"], tile_of[d["src"]])
    with pytest.raises(ValueError, match="edge scorer"):
        edge_scores(SigmmaModel.from_bundle(bundle, **small_config, edge_addition=False), bundle)


def test_edge_evaluation_config(bundle, small_config):
    cfg = SigmmaConfig(n_features=4, image_dim=6, edge_evaluation="expected")
    assert SigmmaConfig.from_json(cfg.to_json()) == cfg
    assert SigmmaConfig(n_features=4, image_dim=6).edge_evaluation == "threshold"
    with pytest.raises(ValueError, match="edge_evaluation"):
        SigmmaConfig(n_features=4, image_dim=6, edge_evaluation="mean")
    thr = SigmmaModel.from_bundle(bundle, **small_config)
    exp = SigmmaModel.from_bundle(bundle, **small_config, edge_evaluation="expected")
    exp.load_state_dict(thr.state_dict())
    assert not np.allclose(thr.encode_st(bundle)[0]["macro"], exp.encode_st(bundle)[0]["macro"])
