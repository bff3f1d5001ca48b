import pytest
import torch


@pytest.fixture(scope="module")
def toy_batch():
    from _toy import toy_bundle

    bundle = toy_bundle(n_tiles=12, n_features=6, image_dim=10, n_empty=1, seed=1)
    return bundle.select(torch.arange(bundle.n_tiles))
