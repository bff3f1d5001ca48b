import pytest


@pytest.fixture(scope="module")
def bundle():
    from _toy import toy_bundle

    return toy_bundle(n_tiles=24, n_features=8, image_dim=12, seed=0)
