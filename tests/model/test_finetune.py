"""Fine-tuning the last backbone blocks, bundle tile images and the sync-free training step."""

import dataclasses

import numpy as np
import pytest
import torch
from _toy import toy_bundle

from sigmma_sc._constants import SCALES
from sigmma_sc.model import SigmmaModel, TrainingBundle
from sigmma_sc.model._finetune import optimizer_groups
from sigmma_sc.nn import build_backbone
from sigmma_sc.nn._edges import _pair_uniform, pair_ids
from sigmma_sc.train import grad_cache_backward
from sigmma_sc.train._step import train_step as _train_step

EFFNET = "test_efficientnet"  # tiny timm models, random weights: no file or network access
VIT = "test_vit"


@pytest.fixture(scope="module")
def tiled():
    return toy_bundle(n_tiles=12, n_features=6, image_dim=10, tile_size=16, seed=0)


def _info(name, input_size=None):
    with torch.random.fork_rng(devices=[]):
        _, info = build_backbone(name, pretrained=False)
    return dataclasses.replace(info, input_size=input_size or info.input_size).to_dict()


def _tuned(bundle, name=EFFNET, blocks=1, input_size=24, **kw):
    config = {
        "hidden": 16,
        "out_dim": 16,
        "batch_size": 8,
        "epochs": 1,
        "dropout": 0.0,
        "backbone": name,
        "backbone_pretrained": False,
        "finetune_blocks": blocks,
        "backbone_info": _info(name, input_size),
        "backbone_lr": 1e-3,
        **kw,
    }
    return SigmmaModel.from_bundle(bundle, **config)


def _parts(b, **kw):
    keys = ("x", "cell_ptr", "pos", "edge_index", "cand_meso", "cand_macro", "image_features", "split", "tiles")
    return {k: getattr(b, k) for k in keys} | kw


# ---------------------------------------------------------------------- bundle tile images
def test_bundle_tiles_select_save_load(tiled, tmp_path):
    assert tiled.tiles.dtype == torch.uint8
    assert tiled.tiles.shape == (12, 3, 16, 16)
    assert "tile images (3, 16, 16) uint8" in repr(tiled)
    idx = [3, 0, 3, 7]
    torch.testing.assert_close(tiled.select(torch.tensor(idx)).tiles, tiled.tiles[idx])
    assert tiled.to("cpu", tiles=False).tiles is None
    assert tiled.to("cpu", tiles=False).select(idx).tiles is None
    tiled.save(tmp_path / "b.pt")
    back = TrainingBundle.load(tmp_path / "b.pt")
    assert torch.equal(back.tiles, tiled.tiles)
    toy_bundle(n_tiles=4).save(tmp_path / "plain.pt")
    assert "tiles" not in torch.load(tmp_path / "plain.pt", weights_only=True)  # readable by older versions
    gray = toy_bundle(n_tiles=4, tile_size=8, channels=1)
    assert gray.tiles.shape == (4, 1, 8, 8)
    numpy_tiles = TrainingBundle(**_parts(gray, tiles=gray.tiles.numpy()))
    assert torch.equal(numpy_tiles.tiles, gray.tiles)


@pytest.mark.parametrize(
    ("tiles", "match"),
    [
        (torch.zeros(12, 3, 16, 16), "uint8"),
        (torch.zeros(11, 3, 16, 16, dtype=torch.uint8), "T = 12"),
        (torch.zeros(12, 2, 16, 16, dtype=torch.uint8), "C in"),
        (torch.zeros(12, 3, 16, dtype=torch.uint8), "shape"),
        (torch.zeros(12, 3, 2, 2, dtype=torch.uint8), "4x4"),
    ],
)
def test_bundle_tiles_validation(tiled, tiles, match):
    with pytest.raises(ValueError, match=match):
        TrainingBundle(**_parts(tiled, tiles=tiles))


# ---------------------------------------------------------------------- fine-tuning
def test_finetune_trains_exactly_the_last_blocks(tiled):
    model = _tuned(tiled, blocks=2)
    enc = model.image_encoder
    assert model.finetuned
    assert model.config.image_dim == enc.info.num_features == 256
    assert model.config.backbone_info["input_size"] == 24
    groups = optimizer_groups(model, enc, model.config.lr, model.config.backbone_lr)
    assert [g["lr"] for g in groups] == [model.config.lr, 1e-3]
    assert all(p.requires_grad for g in groups for p in g["params"])
    n_blocks = len(enc.backbone.blocks)
    trainable = tuple(f"blocks.{i}." for i in range(n_blocks - 2, n_blocks)) + ("conv_head.", "bn2.")
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    heads = {k: v.clone() for k, v in model.image_heads.state_dict().items()}
    model.fit(tiled, progress=False, device="cpu", epochs=1)
    after = enc.backbone.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed, "the fine-tuned blocks did not move"
    assert all(k.startswith(trainable) for k in changed), sorted(changed)
    assert not any("running_" in k for k in changed)  # BatchNorm statistics stay frozen
    for prefix in trainable:
        assert any(k.startswith(prefix) for k in changed), prefix
    for name, p in enc.backbone.named_parameters():
        assert p.requires_grad == name.startswith(trainable), name
    assert any(not torch.equal(heads[k], v) for k, v in model.image_heads.state_dict().items())


def test_finetune_vit_last_block_and_norm():
    b = toy_bundle(n_tiles=6, n_features=6, tile_size=16, seed=2)
    model = _tuned(b, name=VIT, blocks=1, input_size=None, batch_size=6)
    enc = model.image_encoder
    assert enc.info.is_vit
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    model.fit(b, progress=False, device="cpu", epochs=1)
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "") for k, v in
               enc.backbone.state_dict().items() if not torch.equal(before[k], v)}  # fmt: skip
    assert changed == {f"blocks.{len(enc.backbone.blocks) - 1}", "norm"}


def test_finetune_loss_finite_and_decreasing():
    b = toy_bundle(n_tiles=9, n_features=6, tile_size=16, seed=1)  # < 10 tiles: all train, one batch
    model = _tuned(b, batch_size=9, lr=3e-3, temperature=0.1, epochs=6)
    history = model.fit(b, progress=False, device="cpu")
    losses = np.array([h["train_loss"] for h in history])
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert (np.diff(losses) < 0).sum() >= 4


def test_finetune_seeded_and_leaves_global_rng(tiled):
    state = torch.get_rng_state()
    runs = []
    for _ in range(2):
        m = _tuned(tiled, dropout=0.1)
        m.fit(tiled, progress=False, device="cpu", epochs=1)
        runs.append(m.encode_image(tiled))
    assert torch.equal(torch.get_rng_state(), state)
    for s in SCALES:
        assert torch.equal(runs[0][s], runs[1][s])


def test_finetune_grad_cache_replays_rng_and_matches_full_batch(tiled):
    model = _tuned(tiled, dropout=0.3).train()
    idx = torch.arange(8)
    seen = []

    def encode(chunk):
        emb = model.embed_batch(tiled.select(chunk))
        seen.append({k: v.detach().clone() for k, v in emb.items()})
        return emb

    grad_cache_backward(encode, list(idx.split(3)), model.loss_from_embeddings)
    assert len(seen) == 6  # 3 chunks, no-grad pass then replay
    for first, replay in zip(seen[:3], seen[3:], strict=True):
        for k in first:
            assert torch.equal(first[k], replay[k]), k  # same dropout masks and Gumbel noise
    # without randomness (eval mode), micro-batched gradients equal the full-batch ones, backbone included
    model.eval().zero_grad()
    model(tiled.select(idx)).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("image_encoder.") for n in full)
    model.zero_grad()
    grad_cache_backward(lambda c: model.embed_batch(tiled.select(c)), list(idx.split(3)), model.loss_from_embeddings)
    for n, g in full.items():  # float32 summation order differs; exactly-zero gradients (softmax shift) are noise
        assert (model.get_parameter(n).grad - g).norm() <= 1e-3 * g.norm() + 1e-6, n


def test_finetune_save_load_identical_image_embeddings(tiled, tmp_path):
    model = _tuned(tiled)
    model.fit(tiled, progress=False, device="cpu", epochs=1)
    ref = model.encode_image(tiled)
    model.save(tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert any(k.startswith("image_encoder.backbone.blocks.0.") for k in raw["state_dict"])  # frozen weights too
    back = SigmmaModel.load(tmp_path / "m.pt")
    assert back.finetuned
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    for out in (back.encode_image(tiled), back.encode_image(tiles=tiled.tiles.numpy(), batch_size=5)):
        for s in SCALES:
            assert out[s].shape == (tiled.n_tiles, 16)
            torch.testing.assert_close(out[s], ref[s], rtol=1e-5, atol=1e-6)
    st_ref, st_back = model.encode_st(tiled)[0], back.encode_st(tiled)[0]
    for s in SCALES:
        assert torch.equal(st_ref[s], st_back[s])


def test_finetune_errors(tiled):
    no_tiles = TrainingBundle(**_parts(tiled, tiles=None))
    with pytest.raises(ValueError, match="tile images"):
        _tuned(no_tiles)
    model = _tuned(tiled)
    with pytest.raises(ValueError, match="tiles"):
        model.fit(no_tiles, progress=False, device="cpu")
    with pytest.raises(ValueError, match="no longer match"):
        model.encode_image(tiled.image_features)
    with pytest.raises(ValueError, match="no `tiles`"):
        model.encode_image(no_tiles)
    with pytest.raises(ValueError, match="either"):
        model.encode_image(tiled.image_features, tiles=tiled.tiles)
    frozen = SigmmaModel.from_bundle(tiled, hidden=16, out_dim=16)
    with pytest.raises(ValueError, match="holds no backbone"):
        frozen.encode_image(tiles=tiled.tiles)
    with pytest.raises(ValueError, match="only 5 blocks"):
        _tuned(tiled, blocks=9)
    with pytest.raises(ValueError, match="no `blocks`"):
        _tuned(tiled, name="test_resnet")
    with pytest.raises(ValueError, match="finetune_blocks"):
        _tuned(tiled, blocks=-1)


# ---------------------------------------------------------------------- sync-free step
@pytest.mark.parametrize(("finetune", "micro_batch"), [(False, None), (False, 3), (True, 3)])
def test_training_step_has_no_host_sync(tiled, finetune, micro_batch):
    """A step runs on the meta device, where any data-dependent shape or host read (``.item()``,
    boolean masks, ``nonzero``, ``unique``, ``repeat_interleave`` without ``output_size``) raises."""
    if finetune:
        model = _tuned(tiled, micro_batch=micro_batch)
    else:
        model = SigmmaModel.from_bundle(tiled, hidden=16, out_dim=16, micro_batch=micro_batch)
    model.to("meta").train()
    data = tiled.to("meta", tiles=finetune)
    opt = torch.optim.AdamW(optimizer_groups(model, model.image_encoder, 1e-3, 1e-5))
    loss, stats = _train_step(model, data, torch.arange(8), opt, {"micro_batch": micro_batch})
    assert loss.device.type == "meta"
    assert stats["grad_norm"].device.type == "meta"  # clipping and statistics stay on the device
    assert loss.shape == ()
    with torch.inference_mode():
        assert model.eval()(data.select(torch.arange(5))).device.type == "meta"


def test_sliced_batches_equal_masked_batches(tiled):
    """The bundle's section-ordered edges (slices) give the same graphs as the encoder's own masks."""
    model = SigmmaModel.from_bundle(tiled, hidden=16, out_dim=16).eval()
    batch = tiled.select(torch.tensor([5, 1, 1, 9, 0]))
    assert batch.edge_sections is not None
    assert sum(batch.edge_sections) == batch.edge_index.shape[1]
    masked = dataclasses.replace(batch, edge_sections=None, candidates_in_blocks=False)
    for mode_kw in ({"edge_addition": True}, {"edge_addition": False}):
        m = SigmmaModel.from_bundle(tiled, hidden=16, out_dim=16, **mode_kw).eval()
        with torch.no_grad():
            a, b = m.st_embeddings(batch), m.st_embeddings(masked)
        for s in SCALES:
            torch.testing.assert_close(a[0][s], b[0][s], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a[1][s], b[1][s], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="edge_sections"):
        model.st_encoder(batch.x, batch.pos, batch.batch, batch.edge_index, edge_sections=(1, 2, 3))


def test_pair_noise_shared_by_both_directions():
    torch.manual_seed(0)
    ei = torch.tensor([[0, 1, 2, 3, 1, 4], [1, 0, 3, 2, 4, 1]])
    u = _pair_uniform(pair_ids(ei, 5), torch.float32)
    assert u[0] == u[1]
    assert u[2] == u[3]
    assert u[4] == u[5]
    assert len({float(u[0]), float(u[2]), float(u[4])}) == 3
    assert ((u >= 0) & (u < 1)).all()
