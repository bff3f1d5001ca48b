import pytest


@pytest.fixture(scope="module")
def bundle():
    from _toy import toy_bundle

    return toy_bundle(n_tiles=24, n_features=8, image_dim=12, seed=0)


@pytest.fixture
def small_config():
    """Tiny model hyper-parameters for CPU tests."""
    return {"hidden": 16, "out_dim": 16, "batch_size": 8, "epochs": 2, "dropout": 0.1}
