import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    """Tiny tensors: one intra-op thread is faster and immune to CPU contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bundle():
    from sigmma_sc.model import toy_bundle

    return toy_bundle(n_tiles=24, n_features=8, image_dim=12, seed=0)


@pytest.fixture
def small_config():
    """Tiny model hyper-parameters for CPU tests."""
    return {"hidden": 16, "out_dim": 16, "batch_size": 8, "epochs": 2, "dropout": 0.1}
