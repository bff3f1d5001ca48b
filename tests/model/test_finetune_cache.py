"""Cached fine-tuning: the frozen part of the backbone runs once per tile, a step runs only the trainable blocks."""

import dataclasses

import numpy as np
import pytest
import torch
from _toy import toy_bundle

from sigmma_sc._constants import SCALES
from sigmma_sc.model import SigmmaModel
from sigmma_sc.model._finetune import (
    BoundaryCache,
    build_boundary_cache,
    cache_dtype,
    check_finetune,
    plan_boundary_cache,
)
from sigmma_sc.nn import MultiCropEncoder, build_backbone

# tiny random backbones, no file or network access: the offline default architecture (EfficientNet-Lite0) at a
# small crop size, and timm's tiny ViT
BACKBONES = [("efficientnet_lite0", 32), ("test_vit", None)]


@pytest.fixture(scope="module")
def tiled():
    return toy_bundle(n_tiles=10, n_features=6, image_dim=10, tile_size=16, seed=0)


def _encoder(name, blocks, input_size=None):
    model, info = build_backbone(name, pretrained=False, seed=1)
    if input_size is not None:
        info = dataclasses.replace(info, input_size=input_size)
    return MultiCropEncoder(model, info, finetune_blocks=blocks)


def _tuned(bundle, name, input_size, blocks=1, **kw):
    with torch.random.fork_rng(devices=[]):
        _, info = build_backbone(name, pretrained=False)
    info = dataclasses.replace(info, input_size=input_size or info.input_size).to_dict()
    config = {"hidden": 16, "out_dim": 16, "batch_size": 5, "epochs": 1, "dropout": 0.0, "backbone": name,
              "backbone_pretrained": False, "finetune_blocks": blocks, "backbone_info": info, "backbone_lr": 1e-3,
              "lr": 3e-3, **kw}  # fmt: skip
    return SigmmaModel.from_bundle(bundle, **config)


def _plan(encoder, n, mode="memory", device="cpu", **kw):
    return plan_boundary_cache(encoder, n, SCALES, mode=mode, device=device, **kw)


@pytest.mark.parametrize(("name", "size"), BACKBONES)
@pytest.mark.parametrize("blocks", [1, 2])
def test_cached_features_equal_full_encoding(tiled, name, size, blocks):
    enc = _encoder(name, blocks, size).eval()
    tiles = tiled.tiles[:4]
    with torch.no_grad():
        full = enc(tiles)
        boundary = enc.frozen_crops(tiles)
        cached = enc.forward_cached(boundary)
    assert boundary.shape == (4, 21, *enc.boundary_shape())
    for s in SCALES:
        torch.testing.assert_close(cached[s], full[s], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a subset of scales: the cache holds only their crops
        part = enc.forward_cached(enc.frozen_crops(tiles, ("macro",)), ("macro",))
    torch.testing.assert_close(part["macro"], full["macro"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "size"), BACKBONES)
def test_cached_gradients_equal_full_encoding(tiled, name, size):
    """The same loss and the same gradients, heads and trainable blocks included, from the cache as from the pixels."""
    model = _tuned(tiled, name, size, blocks=2).eval()  # eval: no dropout, deterministic edges
    idx = torch.arange(tiled.n_tiles)
    enc = model.image_encoder
    cache = build_boundary_cache(enc, tiled.tiles, idx, model.scales, _plan(enc, tiled.n_tiles))
    grads = []
    for data in (tiled, tiled.with_boundary_cache(cache)):
        model.zero_grad()
        batch = data.select(torch.tensor([7, 2, 5, 0, 9]))
        assert (batch.boundary is not None) == (data is not tiled)
        loss = model(batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_full, g_full), (loss_cached, g_cached) = grads
    torch.testing.assert_close(loss_cached, loss_full, rtol=1e-5, atol=1e-5)
    assert g_full.keys() == g_cached.keys()
    assert any(n.startswith("image_encoder.backbone.blocks.") for n in g_full)
    for n, g in g_full.items():
        assert (g_cached[n] - g).norm() <= 1e-4 * g.norm() + 1e-7, n


@pytest.mark.parametrize(("name", "size"), BACKBONES)
def test_training_from_cache_moves_only_trainable_blocks(tiled, name, size):
    model = _tuned(tiled, name, size, blocks=1)
    enc = model.image_encoder
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    model.fit(tiled, progress=False, device="cpu", epochs=2)
    after = enc.backbone.state_dict()
    n = len(enc.backbone.blocks)
    trainable = (f"blocks.{n - 1}.", "norm.", "conv_head.", "bn2.")
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed
    assert all(k.startswith(trainable) for k in changed), sorted(changed)
    assert any(k.startswith(f"blocks.{n - 1}.") for k in changed)
    for k in after:  # the frozen part stays bit-identical
        if not k.startswith(trainable):
            assert torch.equal(before[k], after[k]), k


def test_cache_off_memory_disk_train_the_same_model(tiled, tmp_path):
    """The cache changes where the frozen part's outputs come from, not the model (same seed, float rounding)."""
    runs = {}
    for mode in ("off", "memory", "disk"):
        m = _tuned(tiled, "efficientnet_lite0", 32, blocks=2, finetune_cache=mode, cache_dir=str(tmp_path / "c"))
        history = m.fit(tiled, progress=False, device="cpu", epochs=2)
        runs[mode] = (np.array([h["train_loss"] for h in history]), m.state_dict())
    assert list((tmp_path / "c").iterdir()) == []  # the memory-mapped file was unlinked when mapped
    for mode in ("memory", "disk"):
        np.testing.assert_allclose(runs[mode][0], runs["off"][0], rtol=1e-4)
        for k, v in runs["off"][1].items():
            torch.testing.assert_close(runs[mode][1][k], v, rtol=1e-3, atol=1e-5)


def test_disk_cache_bf16_storage_dry_run(tiled, tmp_path):
    """The CUDA path stores the cache in bf16 (numpy has no bf16: uint16 in the memmap); run on the CPU here."""
    assert cache_dtype("cuda") == torch.bfloat16
    assert cache_dtype("cpu") == torch.float32
    enc = _encoder("test_vit", 1).eval()
    idx = torch.tensor([4, 1, 8])
    plan = _plan(enc, idx.numel(), mode="disk", device="cuda", cache_dir=tmp_path)
    assert plan["dtype"] == torch.bfloat16
    assert plan["bytes"] == 3 * 21 * int(np.prod(enc.boundary_shape())) * 2
    cache = build_boundary_cache(enc, tiled.tiles, idx, SCALES, plan)
    assert cache.mode == "disk"
    assert list(tmp_path.iterdir()) == []
    got = cache.gather(torch.tensor([8, 4]))
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        ref = enc.frozen_crops(tiled.tiles[[8, 4]])
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)
        feats = enc.forward_cached(got)  # bf16 storage, float32 compute on the CPU
        full = enc(tiled.tiles[[8, 4]])
    for s in SCALES:
        torch.testing.assert_close(feats[s], full[s], rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="not in the fine-tuning cache"):
        cache.gather(torch.tensor([0]))


def test_cache_plan_memory_disk_or_refuse(caplog):
    enc = _encoder("efficientnet_lite0", 1, 32)
    shape = enc.boundary_shape()
    need = 100 * 21 * int(np.prod(shape)) * 4
    with caplog.at_level("INFO", logger="sigmma_sc.model._finetune"):
        plan = _plan(enc, 100, mode="auto", available=4 * need, free_disk=0)
    assert plan["mode"] == "memory"
    assert plan["bytes"] == need
    assert "100 tiles x 21 crops" in caplog.text
    assert _plan(enc, 100, mode="auto", available=need, free_disk=2 * need)["mode"] == "disk"
    with pytest.raises(MemoryError, match="finetune_cache='off'"):
        _plan(enc, 100, mode="auto", available=need, free_disk=need // 2)
    with pytest.raises(MemoryError, match="cache_dir="):
        _plan(enc, 100, mode="memory", available=need)
    with pytest.raises(MemoryError, match="does not fit"):
        _plan(enc, 100, mode="disk", free_disk=need)


def test_cache_errors_before_anything_slow(tiled):
    # no blocks at all; blocks that cannot be split from the frozen part; more blocks than the backbone has
    with pytest.raises(ValueError, match="no `blocks`.*finetune_blocks=0"):
        check_finetune("test_resnet", 1, n_tiles=10, scales=SCALES)
    with pytest.raises(ValueError, match="cannot be split.*finetune_cache='off'"):
        check_finetune("test_vit_relpos", 1, n_tiles=10, scales=SCALES)
    assert check_finetune("test_vit_relpos", 1, n_tiles=10, scales=SCALES, finetune_cache="off") is None
    with pytest.raises(ValueError, match="only 7 blocks.*between 1 and 7"):
        check_finetune("efficientnet_lite0", 9, n_tiles=10, scales=SCALES)
    plan = check_finetune("uni", 2, n_tiles=6000, scales=SCALES, finetune_cache="disk", device="cuda")
    assert plan["shape"] == (197, 1024)  # ViT-L/16 tokens, shape from the meta device (nothing computed)
    assert plan["bytes"] == 6000 * 21 * 197 * 1024 * 2
    # through training: the cache is planned before the frozen part is run
    model = _tuned(tiled, "test_vit_relpos", None, blocks=1)
    with pytest.raises(ValueError, match="cannot be split"):
        model.fit(tiled, progress=False, device="cpu")
    with pytest.raises(ValueError, match="finetune_cache"):
        _tuned(tiled, "efficientnet_lite0", 32, finetune_cache="gpu")


def test_cache_object_memory(tiled):
    enc = _encoder("efficientnet_lite0", 1, 32)
    idx = torch.tensor([3, 6])
    cache = BoundaryCache(idx, tiled.n_tiles, _plan(enc, 2))
    assert cache.mode == "memory"
    assert cache.nbytes == 2 * 21 * int(np.prod(enc.boundary_shape())) * 4
    cache.write(0, torch.ones(2, 21, *enc.boundary_shape()))
    assert torch.equal(cache.gather(torch.tensor([6, 3, 6])), torch.ones(3, 21, *enc.boundary_shape()))


def test_cached_training_step_has_no_host_sync(tiled):
    """The GPU path: a cached step (gather on the host, copy to the device, trainable blocks) never reads the device;
    on the ``meta`` device any data-dependent shape or host read raises."""
    from sigmma_sc.model._finetune import optimizer_groups
    from sigmma_sc.train._step import train_step as _train_step

    model = _tuned(tiled, "test_vit", None, blocks=1)
    enc = model.image_encoder
    idx = torch.arange(tiled.n_tiles)
    cache = build_boundary_cache(enc, tiled.tiles, idx, model.scales, _plan(enc, tiled.n_tiles))
    model.to("meta").train()
    data = tiled.to("meta", tiles=False).with_boundary_cache(cache)
    assert data.select(torch.arange(3)).boundary.device.type == "meta"
    opt = torch.optim.AdamW(optimizer_groups(model, enc, 1e-3, 1e-5))
    for micro_batch in (None, 3):
        loss, stats = _train_step(model, data, torch.arange(8), opt, {"micro_batch": micro_batch})
        assert loss.device.type == "meta"
        assert stats["grad_norm"].device.type == "meta"
