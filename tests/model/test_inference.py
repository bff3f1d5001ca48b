"""What a model carries for new slides: linear probes (collapsed PCA/scaler + ridge) and a retrieval reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sigmma_sc.model import LinearProbe, RetrievalReference, SigmmaModel


class _Probe:
    """The attributes of a ProbeResult that LinearProbe reads, around a real sklearn fit."""

    def __init__(self, protocol: str, rng):
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.x = rng.normal(size=(60, 16)) * rng.uniform(0.5, 3, 16) + rng.normal(size=16)
        y = self.x[:, :3] @ rng.normal(size=(3, 5)) + 2.0
        steps = [StandardScaler()] if protocol == "hest" else []
        self.reducer = make_pipeline(*steps, PCA(n_components=6, random_state=0)).fit(self.x)
        z = self.reducer.transform(self.x)
        reg = Ridge(alpha=0.5, fit_intercept=protocol == "paper").fit(z, y)
        self.protocol, self.genes = protocol, [f"G{i}" for i in range(5)]
        self.coef, self.intercept = reg.coef_, np.broadcast_to(reg.intercept_, (5,)).copy()
        self.train_mean = y.mean(0)
        self.embedding_keys = ["X_sigmma_macro_image"]
        self.target_sum, self.tiling = (100.0 if protocol == "paper" else None), {"tile_size_um": 96.0}

    def predict(self, x):
        pred = self.reducer.transform(x) @ self.coef.T + self.intercept
        return pred + self.train_mean if self.protocol == "hest" else pred

    def summary(self):
        return {"pcc": 0.5, "n_eval": 3}


@pytest.mark.parametrize("protocol", ["paper", "hest"])
def test_probe_collapses_exactly_into_one_affine_map(protocol):
    rng = np.random.default_rng(0)
    probe = _Probe(protocol, rng)
    lp = LinearProbe.from_probe_result(probe, check=probe.x)
    new = rng.normal(size=(7, 16)) * 4
    assert np.allclose(lp.predict(new), probe.predict(new), atol=1e-8)
    with pytest.raises(ValueError, match="16-dimensional"):
        lp.predict(new[:, :5])
    probe.embedding_keys = None
    with pytest.raises(ValueError, match="fitted on an array"):
        LinearProbe.from_probe_result(probe)


def test_model_saves_probes_and_reference_weights_only(bundle, small_config, tmp_path):
    rng = np.random.default_rng(1)
    m = SigmmaModel.from_bundle(bundle, **small_config)
    m.meta.update(tile_size_um=96.0, pixel_size_um=2.0, image_channels=3)
    probe = _Probe("paper", rng)
    m.add_probe(probe, check=probe.x)
    m.reference = RetrievalReference("macro", rng.normal(size=(10, 16)), [f"tile_{i}" for i in range(10)],
                                     rng.uniform(size=(10, 2)), "he")  # fmt: skip
    m.save(tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # plain python and tensors only
    assert set(raw["probes"]) == {"expression"}
    m2 = SigmmaModel.load(tmp_path / "m.pt")
    x = rng.normal(size=(4, 16))
    assert np.array_equal(m2.probes["expression"].predict(x), m.probes["expression"].predict(x))
    assert m2.probes["expression"].genes == probe.genes
    assert m2.probes["expression"].target_sum == 100.0
    assert m2.tiling["tile_size_um"] == 96.0
    assert m2.tiling["image_channels"] == 3
    idx, score = m2.reference.query(m.reference.embeddings[[3, 7]], 2)
    assert idx[:, 0].tolist() == [3, 7]  # each reference tile is its own closest tile
    assert np.allclose(score[:, 0], 1.0, atol=1e-5)
    assert (np.diff(score, axis=1) <= 1e-7).all()


def test_probe_must_read_the_models_image_embeddings(bundle, small_config):
    m = SigmmaModel.from_bundle(bundle, **small_config, scales=("macro",))
    probe = _Probe("paper", np.random.default_rng(2))
    # a probe may read the model's image embeddings or the frozen backbone's features (sg.tl.fit_probe chooses on
    # validation tiles), of the model's own scales only; the fine-tuned encoder's only for a fine-tuned model
    for keys in (["X_sigmma_micro_image"], ["sigmma_backbone_micro"], ["X_sigmma_macro_encoder"], ["X_sigmma_macro"]):
        probe.embedding_keys = keys
        with pytest.raises(ValueError, match="this model's scales"):
            m.add_probe(probe)
    probe.embedding_keys = ["sigmma_backbone_macro"]
    assert m.add_probe(probe).embedding_keys == ["sigmma_backbone_macro"]
