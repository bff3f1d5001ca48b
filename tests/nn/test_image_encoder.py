import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sigmma_sc._constants import SCALES
from sigmma_sc.nn import BackboneInfo, MultiCropEncoder, build_backbone, featurize
from sigmma_sc.nn._image_encoder import _effnet_lite0_file, _map_effnet_lite_keys


class _MeanBackbone(torch.nn.Module):
    """Fake backbone: per-channel mean of each crop, plus a trainable-looking block stack."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        return x.mean((2, 3))


def _fake(size=8):
    return MultiCropEncoder(_MeanBackbone(), BackboneInfo("fake", 3, size, (0.0,) * 3, (1.0,) * 3, is_vit=False))


@pytest.fixture(scope="module")
def effnet_random():
    return build_backbone("efficientnet_lite0", pretrained=False)


def test_build_default_backbone_random(effnet_random):
    model, info = effnet_random
    assert info.num_features == 1280
    assert info.input_size == 224
    assert not info.is_vit
    np.testing.assert_allclose(info.mean, [127 / 255] * 3)
    np.testing.assert_allclose(info.std, [128 / 255] * 3)
    assert BackboneInfo.from_dict(info.to_dict()) == info
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_effnet_key_mapping_is_complete(effnet_random):
    model, _ = effnet_random
    src = torch.load(_effnet_lite0_file(), map_location="cpu", weights_only=True)
    mapped = _map_effnet_lite_keys(src, model)  # classifier dropped: the model has no head
    assert set(mapped) == set(model.state_dict())
    assert len(mapped) == len(src) - 2
    broken = dict(src)
    broken.pop("_blocks.3._bn1.running_var")
    with pytest.raises(ValueError, match="unassigned target keys"):
        _map_effnet_lite_keys(broken, model)


def test_pretrained_effnet_classifies_the_cat():
    """The mapped weights are really pretrained: skimage's chelsea is an ImageNet cat (281-285)."""
    from skimage import data

    model, info = build_backbone(pretrained=True, num_classes=1000)
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(info.input_size,) * 2, mode="bilinear", antialias=True)
    img = (img - torch.tensor(info.mean)[:, None, None]) / torch.tensor(info.std)[:, None, None]
    with torch.no_grad():
        probs = model.eval()(img).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, top
    assert probs[281:286].sum() > 0.5


def test_unknown_backbone():
    with pytest.raises(ValueError, match="list_models"):
        build_backbone("not_a_model_xyz", pretrained=False)


def test_uni_access_error_is_explained(monkeypatch):
    import timm

    def fail(*args, **kwargs):
        raise OSError("401 Client Error: gated repo")

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(RuntimeError, match="huggingface-cli login"):
        build_backbone("uni", pretrained=True)


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    model, _ = build_backbone("resnet18", pretrained=False)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded, info = build_backbone("resnet18", weights=tmp_path / name)
        assert info.num_features == 512
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, sd[k])
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone("resnet34", weights=tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError):
        build_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_crop_layout_row_major():
    enc = _fake(size=4)
    # tile 16x16 whose 4x4 micro blocks hold their row-major index r * 4 + c
    idx = torch.arange(16.0).view(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1)
    tiles = torch.stack([idx, idx + 100, idx]).unsqueeze(0) / 255  # (1, 3, 16, 16)
    crops = enc.crops(tiles)
    assert crops.shape == (21, 3, 4, 4)
    np.testing.assert_allclose(crops[:16, 0].mean((1, 2)) * 255, np.arange(16.0), atol=1e-4)
    meso = crops[16:20, 0].mean((1, 2)) * 255
    np.testing.assert_allclose(meso, [2.5, 4.5, 10.5, 12.5], atol=1e-4)  # quadrant means, row-major
    out = enc(tiles)
    assert set(out) == set(SCALES)
    for s in SCALES:
        np.testing.assert_allclose(out[s][0, 0] * 255, 7.5, atol=1e-3)


def test_multicrop_input_types():
    enc = _fake()
    u8 = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    a = enc(u8)
    b = enc(u8.float() / 255)
    c = enc(u8.expand(-1, 3, -1, -1))
    for s in SCALES:
        torch.testing.assert_close(a[s], b[s])
        torch.testing.assert_close(a[s], c[s])
        assert a[s].shape == (2, 3)
    with pytest.raises(ValueError, match="C in"):
        enc(torch.zeros(1, 2, 8, 8))


def test_frozen_and_finetune(effnet_random):
    model, info = effnet_random
    info = dataclasses.replace(info, input_size=32)  # small crops: fast on the CPU
    enc = MultiCropEncoder(model, info)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.backbone.training
    assert not enc(torch.zeros(1, 3, 32, 32))["macro"].requires_grad
    tuned = MultiCropEncoder(build_backbone(pretrained=False)[0], info, finetune_blocks=1)
    trainable = {
        n.split(".")[0] + "." + n.split(".")[1] for n, p in tuned.backbone.named_parameters() if p.requires_grad
    }
    assert trainable == {"blocks.6", "conv_head.weight", "bn2.weight", "bn2.bias"}
    tuned.train()
    assert tuned.backbone.blocks[-1].training
    assert not tuned.backbone.blocks[0].training
    assert tuned(torch.zeros(1, 3, 32, 32))["micro"].requires_grad


def test_featurize_matches_encoder():
    enc = _fake()
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (3, 24, 24), dtype=np.uint8) for _ in range(5)]
    feats = featurize(iter(tiles), enc, batch_size=2, device="cpu")
    ref = enc(torch.from_numpy(np.stack(tiles)))
    for s in SCALES:
        assert feats[s].dtype == np.float32
        assert feats[s].shape == (5, 3)
        np.testing.assert_allclose(feats[s], ref[s].numpy(), rtol=1e-5)
    empty = featurize([], enc, device="cpu")
    assert empty["micro"].shape == (0, 3)


@pytest.mark.slow
def test_uni_architecture_random():
    model, info = build_backbone("uni", pretrained=False)
    assert info.is_vit
    assert info.num_features == 1024
    assert len(model.blocks) == 24


def test_random_backbone_is_reproducible_and_leaves_the_rng_alone():
    """Random weights come from a fixed seed (an image-only section featurized later gets the same features)."""
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, _ = build_backbone("test_vit", pretrained=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = build_backbone("test_vit", pretrained=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    c, _ = build_backbone("test_vit", pretrained=False, seed=1)  # another seed, other weights
    assert not torch.equal(a.state_dict()["patch_embed.proj.weight"], c.state_dict()["patch_embed.proj.weight"])
